"""A K = 3 predictor profile through every stage after the profile: contract, export, runtime, engines, verify.

The profile (tests/export/fixtures.py, ``k3_profile``) makes the first three steps full, extrapolates
the residual with order-2 Lagrange weights over the last three full steps and adds a small bias; its
mask wraps the runtime's residual ring (step 6 reads ring buffers 0, 2, 1).
"""

from __future__ import annotations

import onnx
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ertacache.contract import CACHED_STEP, FULL_STEP, ManifestError, cached_inputs, load_manifest, residual_slots
from ertacache.engines import EngineMismatchError
from ertacache.errors import NumericalError, UserError
from ertacache.export.runners import relative_l2
from ertacache.runtime import Runtime, measure_allocations
from ertacache.runtime.runtime import ring_rotations, validate_mask
from ertacache.sampling import CachedSampler
from tests.export.conftest import K3_MASK, TinyK3, k3_profile
from tests.runtime.conftest import copy_folder, edit_manifest, poison_cached_table


@pytest.fixture(scope="session")
def eager_k3(tiny_k3, request_inputs):
    noise, text = request_inputs
    return CachedSampler(tiny_k3.adapter, tiny_k3.profile.tables(), tiny_k3.profile.mask)(noise, text, 4.0).latents


def torch_engine(tiny_k3):
    from ertacache.engines.torch_compile import TorchCompileEngine, step_modules

    return TorchCompileEngine(step_modules(tiny_k3.adapter, tiny_k3.profile), compile_backend="eager")


class NoHostSync(TorchDispatchMode):
    """Fails on .item() / bool(tensor) / a device->host read: all dispatch aten._local_scalar_dense."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host sync inside the runtime loop")
        return func(*args, **(kwargs or {}))


# ---- export -----------------------------------------------------------------------------------------------

def test_k1_cached_step_graph_keeps_the_schema_1_inputs(onnx_export):
    model = onnx.load(str(onnx_export.out / "onnx" / "cached_step.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["latents", "step", "text_embeds", "guidance_scale", "residual"]
    assert not [t.name for t in model.graph.initializer if "pred_" in t.name]  # no prediction in the reuse graph
    assert load_manifest(onnx_export.out).schedule.history == 1


def test_k3_export_has_three_residual_slots_and_records_the_predictor(onnx_export_k3):
    m = load_manifest(onnx_export_k3.out)
    assert m.schedule.history == 3 and m.schedule.predictor == {"kind": "lagrange", "order": 2, "history": 3}
    assert tuple(m.graphs[CACHED_STEP].input_names) == cached_inputs(3)
    model = onnx.load(str(onnx_export_k3.out / "onnx" / "cached_step.onnx"), load_external_data=False)
    assert tuple(i.name for i in model.graph.input) == cached_inputs(3)
    assert {"tables.pred_w", "tables.pred_b"} <= {t.name for t in model.graph.initializer}
    out = m.spec(FULL_STEP, "residual_out")
    assert all(m.spec(CACHED_STEP, name) == type(out)(name, out.shape, out.dtype) for name in residual_slots(3))
    # the export validated the ONNX graphs over the whole schedule against the eager K = 3 sampler
    assert onnx_export_k3.validation["onnx"]["rel_l2"] <= 1e-4


def test_the_slots_are_not_interchangeable(tiny_k3):
    """The agreement tests below mean something only if binding the slots in another order changes the result."""
    from ertacache.sampling.steps import CachedStep

    gen = torch.Generator().manual_seed(0)
    step = CachedStep(tiny_k3.adapter, tiny_k3.profile.tables())
    x, text = torch.randn(1, 4, 2, 4, 4, generator=gen), torch.randn(2, 5, 16, generator=gen)
    r = [torch.randn(2, 8, 24, generator=gen) for _ in range(3)]
    args = (x, torch.tensor(6), text, torch.tensor(4.0))
    with torch.no_grad():
        assert not torch.allclose(step(*args, *r), step(*args, r[0], r[2], r[1]))


# ---- runtime, per backend, against the eager sampler over the whole schedule -----------------------------

def test_onnxruntime_k3_matches_eager_over_the_schedule(onnx_export_k3, request_inputs, eager_k3):
    noise, text = request_inputs
    with Runtime(onnx_export_k3.out, "onnxruntime") as rt:
        got = rt.sample(noise, text)
        assert relative_l2(got, eager_k3) <= 1e-4
        first = got.clone()
        assert torch.equal(rt.sample(noise, text), first)  # a second request on the same ring: identical


def test_torch_backend_k3_matches_eager_over_the_schedule(onnx_export_k3, tiny_k3, request_inputs, eager_k3):
    noise, text = request_inputs
    with Runtime(onnx_export_k3.out, "torch", engine=torch_engine(tiny_k3)) as rt:
        assert rt.engine.input_names(CACHED_STEP) == cached_inputs(3)
        assert relative_l2(rt.sample(noise, text), eager_k3) <= 1e-4


@pytest.mark.slow
def test_aoti_k3_matches_eager_over_the_schedule(aoti_export_k3, request_inputs, eager_k3):
    noise, text = request_inputs
    assert aoti_export_k3.validation["aoti"]["rel_l2"] <= 1e-4  # the export's own schedule walk
    with Runtime(aoti_export_k3.out, "aoti") as rt:
        assert relative_l2(rt.sample(noise, text), eager_k3) <= 1e-4


def test_torch_engine_of_a_k1_profile_is_refused_on_a_k3_folder(onnx_export_k3, tiny):
    from ertacache.engines.torch_compile import TorchCompileEngine, step_modules

    engine = TorchCompileEngine(step_modules(tiny.adapter, tiny.profile), compile_backend="eager")
    engine_k1 = Runtime(onnx_export_k3.out, "torch", engine=engine)
    with pytest.raises(EngineMismatchError, match=r"the torch engine's cached_step reads \[.*'residual'\], export "
                                                  r"folder .* reads \[.*'residual_2'\] \(K = 3 residual slots\)"):
        with engine_k1:
            pass


# ---- the residual ring: bound once, picked by the plan, no copy, no allocation, no host sync -------------------

def test_ring_rotations_follow_the_mask():
    #        mask: F  F  F  c  c  F  c  F  -> full steps write 0, 1, 2, 0, 1; cached steps read from the newest
    assert ring_rotations(K3_MASK, 3) == [0, 1, 2, 2, 2, 0, 0, 1]
    assert ring_rotations(K3_MASK, 1) == [0] * 8


def test_every_parity_and_rotation_is_bound_once_on_the_ring_buffers(onnx_export_k3):
    with Runtime(onnx_export_k3.out, "onnxruntime") as rt:
        st, k = rt.state, 3
        assert len(st.residuals) == k and len(rt._calls) == 4 * k  # 2K full-step and 2K cached-step calls
        ptr = [r.data_ptr() for r in st.residuals]
        assert len(set(ptr)) == k
        for parity in (0, 1):
            for r in range(k):
                full = rt._calls[FULL_STEP, parity, r].binding
                assert [o.data_ptr() for o in full.get_outputs()] == [st.latents[1 - parity].data_ptr(), ptr[r]]
        # which bound call each step runs: step i's (parity, rotation), from the mask alone
        rotations = ring_rotations(K3_MASK, k)
        for i, (_, call) in enumerate(rt.plan()):
            assert call is rt._calls[FULL_STEP if K3_MASK[i] else CACHED_STEP, i % 2, rotations[i]]


def test_cached_step_binds_the_ring_newest_first(onnx_export_k3, tiny_k3):
    """Feed distinct values to the three buffers; each rotation's cached call must equal the eager module on
    the slots (newest, older, oldest) = buffers (r, r-1, r-2)."""
    from ertacache.sampling.steps import CachedStep

    gen = torch.Generator().manual_seed(2)
    module = CachedStep(tiny_k3.adapter, tiny_k3.profile.tables())
    with Runtime(onnx_export_k3.out, "onnxruntime") as rt:
        st = rt.state
        st.latents[0].copy_(torch.randn(st.latents[0].shape, generator=gen))
        st.text_embeds.copy_(torch.randn(st.text_embeds.shape, generator=gen))
        for buf in st.residuals:
            buf.copy_(torch.randn(buf.shape, generator=gen))
        st.step.fill_(6)
        for r in range(3):
            rt._calls[CACHED_STEP, 0, r]()
            ring = [st.residuals[(r - j) % 3] for j in range(3)]
            with torch.no_grad():
                want = module(st.latents[0], st.step.clone(), st.text_embeds, st.guidance_scale, *ring)
            assert relative_l2(st.latents[1], want) <= 1e-5, r


@pytest.mark.parametrize("export", ["onnx_export", "onnx_export_k3"])
def test_the_loop_allocates_nothing_and_never_syncs(export, request, request_inputs):
    """K = 1 and K = 3 (the ring of residual slots): no torch allocation, no host sync, fixed buffers."""
    noise, text = request_inputs
    with Runtime(request.getfixturevalue(export).out, "onnxruntime") as rt:
        st = rt.state
        ptrs = {k: v.data_ptr() for k, v in st.buffers().items()}
        rt.load_inputs(noise, text)
        plan = rt.plan()
        steps = plan * 4  # the schedule four times over: a GC pass in the window is spread over ~30 steps
        report = measure_allocations(lambda n: rt.run_plan(steps[:n]), short=2, long=len(steps))
        assert report.torch_allocs_per_step == 0 and report.torch_bytes_per_step == 0, report
        assert abs(report.python_bytes_per_step) < 16, report
        rt.load_inputs(noise, text)
        with NoHostSync():
            assert rt.run_plan(plan) == len(rt.mask)
        assert {k: v.data_ptr() for k, v in st.buffers().items()} == ptrs


def test_nan_diagnosis_replays_the_ring(onnx_export_k3, tmp_path, request_inputs):
    """NaN in the predictor bias at step 6 (after the ring wrapped): the replay names that step and graph."""
    folder = copy_folder(onnx_export_k3.out, tmp_path / "f")
    assert poison_cached_table(folder, (8, 24), 6) == 1  # pred_b (T, D): exactly one such table
    noise, text = request_inputs
    with Runtime(folder, "onnxruntime") as rt:
        with pytest.raises(NumericalError, match=rf"NaN/Inf in latents_out of graph '{CACHED_STEP}' at step 6 "):
            rt.sample(noise, text)


# ---- refusals ------------------------------------------------------------------------------------------

#: steps 1 and 3 are cached after one and two full steps (reuse of step 0, the line through steps 2 and 0),
#: step 6 after four (the quadratic through 5, 4, 2, with the ring wrapped)
EARLY_MASK = [True, False, True, False, True, True, False, True]


def _token_width(tiny) -> int:
    """The residual's last dimension D, as TinyK3 sizes its bias table."""
    return tiny.model.config.num_attention_heads * tiny.model.config.attention_head_dim


def test_cached_steps_before_k_full_steps_match_eager_through_the_ring(tiny, tiny_k3, request_inputs, tmp_path):
    """The order grows as the slots fill: the export, and a second request that finds the first one's
    residuals in the empty slots (weight 0, zeroed per request), agree with the eager sampler."""
    early = TinyK3(tiny)
    early.profile = k3_profile(tiny.profile, _token_width(tiny), EARLY_MASK)
    assert early.profile.pred_w[3, :, 0].tolist() == [1.5, -0.5, 0.0]
    noise, text = request_inputs
    want = CachedSampler(early.adapter, early.profile.tables(), early.profile.mask)(noise, text, 4.0).latents
    pkg = early.export(tmp_path / "out", targets="onnx", timing_repeats=0, decode_graph=False)
    assert pkg.validation["onnx"]["rel_l2"] <= 1e-4  # the export's own replay of the schedule
    with Runtime(pkg.out, "onnxruntime") as rt:
        for buf in rt.state.residuals:  # what a first request could leave behind in the empty slots
            buf.fill_(float("nan"))
        assert relative_l2(rt.sample(noise, text), want) <= 1e-4
        assert relative_l2(rt.sample(noise, text), want) <= 1e-4


def test_weights_on_a_slot_no_full_step_has_filled_are_refused(tiny, tmp_path):
    assert validate_mask(EARLY_MASK, 8) == tuple(EARLY_MASK)
    with pytest.raises(UserError, match="the first step must compute"):
        validate_mask([False, *EARLY_MASK[1:]], 8)
    bad = TinyK3(tiny)
    bad.profile = k3_profile(tiny.profile, _token_width(tiny), EARLY_MASK)
    bad.profile.pred_w[3, :, 0] = torch.tensor([3.0, -3.0, 1.0])  # a quadratic through a third residual not there
    with pytest.raises(UserError, match=r"step 3 is cached after 2 full step\(s\) but its predictor weights read "
                                        r"residual slot 3 of 3, which holds no residual yet"):
        CachedSampler(bad.adapter, bad.profile.tables(), bad.profile.mask)
    with pytest.raises(UserError, match="step 3 is cached after 2 full step"):
        bad.export(tmp_path / "out", targets="onnx", timing_repeats=0, decode_graph=False)


@pytest.mark.parametrize("edit, match", [
    (lambda m: (m["profile"].update(history=2), m["profile"]["predictor"].update(history=2)),
     r"graph 'cached_step' has I/O .* \(profile.history is 2\)"),
    (lambda m: m["graphs"]["cached_step"]["inputs"][6].update(shape=[2, 8, 12]),
     r"cached_step's residual_2 \(\[2, 8, 12\] float32\) and full_step's residual_out \(\[2, 8, 24\] float32\) "
     r"differ"),
    (lambda m: m["graphs"]["cached_step"]["inputs"][5].update(dtype="float16"),
     r"cached_step's residual_1 .* float16\) and full_step's residual_out"),
])
def test_graph_slots_must_agree_with_the_manifest_history(onnx_export_k3, tmp_path, edit, match):
    folder = copy_folder(onnx_export_k3.out, tmp_path / "f")
    edit_manifest(folder, edit)
    with pytest.raises(ManifestError, match=match):
        Runtime(folder, "onnxruntime")


def test_manifest_predictor_is_checked_against_the_profile(onnx_export_k3, tmp_path):
    folder = copy_folder(onnx_export_k3.out, tmp_path / "f")
    edit_manifest(folder, lambda m: m["profile"]["predictor"].update(kind="reuse"))
    with pytest.raises(EngineMismatchError, match=r"the manifest's predictor kind \(reuse\) differs from its "
                                                  r"profile's \(lagrange\)"):
        Runtime(folder, "onnxruntime")


# ---- verify ---------------------------------------------------------------------------------------------

def test_verify_follows_k(onnx_export_k3, tiny_k3, request_inputs):
    from ertacache.runtime.verify import verify_runtime

    noise, text = request_inputs
    with Runtime(onnx_export_k3.out, "onnxruntime") as rt:
        report = verify_runtime(rt, tiny_k3.adapter, tiny_k3.profile, noise, text)
    assert report.ok and report.rel_l2 <= 1e-4 and report.full_steps == sum(K3_MASK)
    assert (report.history, report.predictor) == (3, "lagrange") and report.to_json()["history"] == 3


def test_export_summary_names_the_predictor_and_slots(onnx_export_k3, capsys):
    from ertacache.cli.export import print_summary

    print_summary(onnx_export_k3)
    assert ("predictor lagrange over the last 3 full-step residual(s), cached_step slots residual, residual_1, "
            "residual_2") in capsys.readouterr().out
