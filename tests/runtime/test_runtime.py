"""The alternating runtime: eager agreement over the whole schedule, no per-step allocation, every refusal."""

import dataclasses

import pytest
import torch

from ertacache.engines import EngineMismatchError, UnknownBackendError
from ertacache.contract import load_manifest
from ertacache.errors import NumericalError, UserError
from ertacache.export import CACHED_STEP, FULL_STEP
from ertacache.export.runners import relative_l2
from ertacache.runtime import Runtime, StepTimes
from tests.runtime.conftest import copy_folder, edit_manifest, poison_cached_table


def torch_engine(tiny, backend="eager"):
    from ertacache.engines.torch_compile import TorchCompileEngine, step_modules

    return TorchCompileEngine(step_modules(tiny.adapter, tiny.profile, decoder=tiny.decoder), compile_backend=backend)


def test_onnxruntime_runtime_matches_eager_over_the_schedule(onnx_export, tiny, request_inputs, eager_latents):
    noise, text = request_inputs
    with Runtime(onnx_export.out, "onnxruntime") as rt:
        times = StepTimes()
        got = rt.sample(noise, text, times=times)
        assert relative_l2(got, eager_latents) <= 1e-4
        assert len(times.full_s) == sum(tiny.profile.mask) and len(times.cached_s) == tiny.profile.steps - len(times.full_s)
        frames = rt.decode()
        assert torch.equal(frames, tiny.decoder.decode(got.clone()))
        assert torch.equal(rt.sample(noise, text), got)  # a second request on the same buffers: identical


@pytest.mark.slow
def test_aoti_runtime_matches_eager_over_the_schedule(aoti_export, tiny, request_inputs, eager_latents):
    noise, text = request_inputs
    with Runtime(aoti_export.out, "aoti") as rt:
        assert relative_l2(rt.sample(noise, text), eager_latents) <= 1e-4
        assert rt.decode().shape == (1, 2, 8, 8, 3)


def test_torch_backend_matches_eager_over_the_schedule(onnx_export, tiny, request_inputs, eager_latents):
    """torch.compile(fullgraph=True) with the "eager" backend: dynamo tracing without Inductor's minutes of codegen."""
    noise, text = request_inputs
    with Runtime(onnx_export.out, "torch", engine=torch_engine(tiny)) as rt:
        assert relative_l2(rt.sample(noise, text), eager_latents) <= 1e-4


def test_onnxruntime_binds_the_runtime_buffers(onnx_export, request_inputs):
    """The IOBinding writes where the runtime allocated (allocation and syncs per step:
    tests/runtime/test_predictor.py, for K = 1 and K = 3)."""
    noise, text = request_inputs
    with Runtime(onnx_export.out, "onnxruntime") as rt:
        st = rt.state
        ptrs = {k: v.data_ptr() for k, v in st.buffers().items()}
        rt.sample(noise, text)
        assert {k: v.data_ptr() for k, v in st.buffers().items()} == ptrs
        binding = rt._calls[FULL_STEP, 0, 0].binding
        assert [o.data_ptr() for o in binding.get_outputs()] == [st.latents[1].data_ptr(), st.residual.data_ptr()]
        assert len(st.residuals) == 1 and len(rt._calls) == 4  # K = 1: the two parities of each step graph


def test_reset_and_use_outside_the_context(onnx_export, request_inputs):
    rt = Runtime(onnx_export.out, "onnxruntime")
    with pytest.raises(RuntimeError, match="not open"):
        rt.sample(*request_inputs)
    with rt:
        rt.sample(*request_inputs)
        rt.state.reset()
        assert all(not t.any() for t in rt.state.buffers().values())


# ---- refusals ---------------------------------------------------------------------------------------------------

def test_tampered_file_is_refused(onnx_export, tmp_path):
    folder = copy_folder(onnx_export.out, tmp_path / "f")
    with open(folder / "onnx" / "cached_step.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="onnx/cached_step.onnx does not match its sha256"):
        Runtime(folder, "onnxruntime")


def test_missing_file_is_refused(onnx_export, tmp_path):
    folder = copy_folder(onnx_export.out, tmp_path / "f")
    (folder / "profile" / "correction.safetensors").unlink()
    with pytest.raises(UserError, match="profile/correction.safetensors is missing"):
        Runtime(folder, "onnxruntime")


def test_other_schema_version_is_refused(onnx_export, tmp_path):
    folder = copy_folder(onnx_export.out, tmp_path / "f")
    edit_manifest(folder, lambda m: m.update(schema_version=4))
    with pytest.raises(UserError, match="schema_version 4 is not 2 or 3"):
        Runtime(folder, "onnxruntime")
    edit_manifest(folder, lambda m: m.update(schema_version=3))  # the two-expert schema needs the experts
    with pytest.raises(UserError, match="profile lacks the field 'experts'"):
        Runtime(folder, "onnxruntime")


def test_profile_of_other_weights_is_refused_naming_both(onnx_export, tmp_path):
    folder = copy_folder(onnx_export.out, tmp_path / "f")
    m = edit_manifest(folder, lambda m: m["model"].update(fingerprint="0123456789abcdef"))
    with pytest.raises(EngineMismatchError, match=r"model fingerprint \(0123456789abcdef\) differs from its profile's \(\w+\)"):
        Runtime(folder, "onnxruntime")
    assert m["model"]["fingerprint"] == "0123456789abcdef"


def test_torch_backend_refuses_other_weights(onnx_export, tiny, tmp_path, request_inputs):
    from ertacache.engines.torch_compile import StepModulesFromManifest

    loaded = load_manifest(onnx_export.out)
    manifest = dataclasses.replace(loaded, model=dataclasses.replace(loaded.model, id="wan2.1-tiny", path=None))
    with pytest.raises(EngineMismatchError, match=r"made from weights \w+ but wan2.1-tiny .* has weights \w+") as e:
        try:
            StepModulesFromManifest(onnx_export.out, manifest)()
        except UserError as err:  # the embedded testbed may not be loadable yet
            if isinstance(err, EngineMismatchError):
                raise
            pytest.skip(f"wan2.1-tiny does not load here: {err}")
        except Exception as err:  # noqa: BLE001 - the testbed weights are being (re)trained
            pytest.skip(f"wan2.1-tiny does not load here: {type(err).__name__}")
    assert tiny.profile.model_fingerprint in str(e.value)


def test_backend_without_artifacts_in_the_folder_is_refused(onnx_export):
    with pytest.raises(EngineMismatchError, match=r"has no aoti artifacts .*re-export with ertacache-export --targets aoti"):
        Runtime(onnx_export.out, "aoti")
    with pytest.raises(UnknownBackendError, match="unknown backend 'onnx'"):
        Runtime(onnx_export.out, "onnx")


def test_aoti_packages_of_another_torch_build_are_refused(aoti_export, tmp_path):
    folder = copy_folder(aoti_export.out, tmp_path / "f")
    edit_manifest(folder, lambda m: m["versions"].update(torch="2.5.0+cu124"))
    with pytest.raises(EngineMismatchError, match=r"compiled by torch 2\.5\.0\+cu124, this machine has torch"):
        Runtime(folder, "aoti")


@pytest.mark.parametrize("what, shape, match", [
    ("text", (1, 5, 16), r"text_embeds has shape \[1, 5, 16\] but this export folder takes \[2, 5, 16\] "
                         r"\(2 x batch 1 rows: cond rows, then uncond rows"),
    ("text", (2, 7, 16), r"text_embeds has shape \[2, 7, 16\]"),
    ("latents", (1, 4, 2, 8, 8), r"latents have shape \[1, 4, 2, 8, 8\] but this export folder takes \[1, 4, 2, 4, 4\]"),
])
def test_wrong_request_shapes_are_refused(onnx_export, request_inputs, what, shape, match):
    noise, text = request_inputs
    bad = torch.randn(shape)
    with Runtime(onnx_export.out, "onnxruntime") as rt, pytest.raises(UserError, match=match):
        rt.sample(bad, text) if what == "latents" else rt.sample(noise, bad)


def test_nan_text_embeds_are_refused_before_the_loop(onnx_export, request_inputs):
    noise, text = request_inputs
    text = text.clone()
    text[1, 2, 3] = float("nan")
    with Runtime(onnx_export.out, "onnxruntime") as rt, pytest.raises(UserError, match="text_embeds contain NaN"):
        rt.sample(noise, text)


def test_nan_in_the_loop_names_the_step_and_graph(onnx_export, tiny, tmp_path, request_inputs):
    """A baked correction table with NaN at one reused step (re-hashed, as a broken export would be)."""
    folder = copy_folder(onnx_export.out, tmp_path / "f")
    steps, bad_step = tiny.profile.steps, next(i for i, m in enumerate(tiny.profile.mask) if not m)
    assert poison_cached_table(folder, (steps, 2, 4), bad_step) >= 1  # corr_a / corr_b (T, nb, C)
    noise, text = request_inputs
    with Runtime(folder, "onnxruntime") as rt:
        with pytest.raises(NumericalError, match=rf"NaN/Inf in latents_out of graph '{CACHED_STEP}' at step {bad_step} "):
            rt.sample(noise, text)
