"""FLUX's step graphs: several conditioning inputs, each one named graph input, validated over the schedule.

The tiny ``FluxTransformer2DModel`` (guidance embedding on, so the ``guidance_scale`` input reaches
the model instead of a CFG mix) with a K = 3 predictor profile: the exported programs and their
ONNX Runtime sessions run the whole schedule and must equal the eager sampler,
and an ONNX export folder runs in the runtime with one buffer per conditioning input (its Triton
model: tests/serving); the command line still takes one text tensor and refuses such a folder.
"""

import pytest
import torch

from ertacache.contract import CACHED_STEP, FULL_STEP, cached_inputs, step_inputs
from ertacache.errors import UserError
from ertacache.export.graphs import BakeStepGraphs
from ertacache.export.runners import EagerRunner, relative_l2, run_schedule
from ertacache.models.adapter import adapter_for
from ertacache.sampling import CachedSampler
from tests.integrations.test_flux_pipeline import GUIDANCE, flux_profile
from tests.models.test_flux_adapter import tiny_flux

from tests.export.fixtures import FLUX_SHAPES as SHAPES  # one prompt's, without the batch axis
from tests.export.fixtures import aoti_runner, onnx_runner, program_runner


@pytest.fixture(scope="module")
def flux_graphs():
    model = tiny_flux(True).eval()
    profile = flux_profile(model, True)
    adapter = adapter_for(model)
    graphs = BakeStepGraphs(batch_size=1, dtype=torch.float32, text_shape=SHAPES)(adapter, profile)
    return model, adapter, profile, graphs


def _feeds(seed=21):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 4, 8, 8, generator=g)  # (B, C, H', W')
    cond = {"prompt_embeds": torch.randn(1, 5, 32, generator=g), "pooled_prompt_embeds": torch.randn(1, 12, generator=g)}
    return noise, cond


def _schedule_error(runner, adapter, profile, seed: int) -> float:
    """Relative L2 of ``runner`` over the whole schedule against the eager sampler, on fresh feeds."""
    noise, cond = _feeds(seed)
    with torch.no_grad():
        ref = CachedSampler(adapter, profile.tables(), profile.mask)(noise, cond, GUIDANCE).latents
        got = run_schedule(runner, profile.mask, noise, (cond["prompt_embeds"], cond["pooled_prompt_embeds"]),
                           GUIDANCE, profile.history)
    return relative_l2(got, ref)


def test_each_conditioning_tensor_is_a_named_graph_input(flux_graphs):
    _, _, profile, graphs = flux_graphs
    names = ("prompt_embeds", "pooled_prompt_embeds")
    assert graphs.conditioning == names
    assert graphs.specs[FULL_STEP].input_names == list(step_inputs(names))
    assert graphs.specs[CACHED_STEP].input_names == list(cached_inputs(profile.history, names))
    shapes = {s.name: tuple(s.shape) for s in graphs.specs[FULL_STEP].inputs}
    assert shapes["prompt_embeds"] == (1, 5, 32) and shapes["pooled_prompt_embeds"] == (1, 12)  # one branch


def test_exported_programs_equal_the_eager_sampler_over_the_schedule(flux_graphs):
    _, adapter, profile, graphs = flux_graphs
    noise, cond = _feeds()
    with torch.no_grad():
        ref = CachedSampler(adapter, profile.tables(), profile.mask)(noise, cond, GUIDANCE).latents
        flat = (cond["prompt_embeds"], cond["pooled_prompt_embeds"])
        eager = run_schedule(EagerRunner(graphs.modules), profile.mask, noise, flat, GUIDANCE, profile.history)
        exported = run_schedule(program_runner(graphs.programs), profile.mask, noise, flat, GUIDANCE, profile.history)
    torch.testing.assert_close(eager, ref, rtol=0, atol=1e-6)
    assert relative_l2(exported, ref) < 1e-5


@pytest.mark.slow  # ~17 s of ONNX export on 2 cores
def test_onnx_graphs_equal_the_eager_sampler_over_the_schedule(flux_graphs, tmp_path):
    _, adapter, profile, graphs = flux_graphs
    runner, _ = onnx_runner(graphs, tmp_path)
    assert _schedule_error(runner, adapter, profile, seed=22) < 1e-4


def test_bad_export_shapes_are_refused(flux_graphs):
    _, adapter, profile, _ = flux_graphs
    with pytest.raises(UserError, match="one shape per input"):
        BakeStepGraphs(batch_size=1, dtype=torch.float32, text_shape=(5, 32))(adapter, profile)
    with pytest.raises(UserError, match=r"no export shape for the conditioning input\(s\) \['pooled_prompt_embeds'\]"):
        BakeStepGraphs(batch_size=1, dtype=torch.float32, text_shape={"prompt_embeds": (5, 32)})(adapter, profile)


@pytest.mark.slow  # the ONNX export folder fixture (~45 s on 2 cores)
def test_a_flux_export_folder_runs_in_the_runtime_equal_to_the_eager_sampler(flux_onnx_export):
    """The folder records each conditioning input (no shapes.text_embeds), validates at export, passes the
    torch.compile check, and the runtime binds one buffer per input (each checked by name)."""
    from ertacache.contract import load_manifest
    from ertacache.runtime import Runtime

    out, adapter, profile = flux_onnx_export.out, flux_onnx_export.adapter, flux_onnx_export.profile
    manifest = load_manifest(out)
    assert manifest.conditioning == ("prompt_embeds", "pooled_prompt_embeds") and manifest.shapes.text_embeds is None
    assert manifest.spec(FULL_STEP, "pooled_prompt_embeds").shape == (1, 12)
    assert manifest.get("targets")["torch_compile"]["graph_breaks"] == {FULL_STEP: 0, CACHED_STEP: 0}

    noise, cond = _feeds(seed=24)
    with torch.no_grad():
        ref = CachedSampler(adapter, profile.tables(), profile.mask)(noise, cond, GUIDANCE).latents
    with Runtime(out, "onnxruntime") as rt:
        got = rt.sample(noise, cond).clone()
        assert relative_l2(got, ref) < 1e-4
        with pytest.raises(UserError, match=r"missing \['pooled_prompt_embeds'\], unknown \[\]"):
            rt.sample(noise, {"prompt_embeds": cond["prompt_embeds"]})
        with pytest.raises(UserError, match="pass a mapping"):
            rt.sample(noise, cond["prompt_embeds"])
        with pytest.raises(UserError, match=r"pooled_prompt_embeds has shape \[1, 11\]"):
            rt.sample(noise, {**cond, "pooled_prompt_embeds": torch.zeros(1, 11)})
        assert rt.decode().shape == (1, 1, 64, 64, 3)  # an image is a one-frame video (the 8x decoder)


@pytest.mark.slow  # the ONNX export folder fixture
def test_ertacache_run_takes_an_npz_per_input_and_writes_a_png(flux_onnx_export, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from ertacache.cli import run as run_cli
    from ertacache.contract import load_manifest
    from ertacache.runtime import Runtime
    from ertacache.runtime.inputs import noise_for

    out = flux_onnx_export.out
    _, cond = _feeds(seed=25)
    np.savez(tmp_path / "embeds.npz", **{n: t.numpy() for n, t in cond.items()})
    rc = run_cli.main(["--engines", str(out), "--text-embeds", str(tmp_path / "embeds.npz"), "--seed", "3",
                       "--out", str(tmp_path / "image.png")])
    assert rc == 0, capsys.readouterr().err
    with Runtime(out, "onnxruntime") as rt:
        rt.sample(noise_for(rt.manifest, 3), cond)
        want = rt.decode()[0, 0].numpy()  # (H, W, 3) uint8
    png = np.asarray(Image.open(tmp_path / "image.png").convert("RGB"))
    k = png.shape[0] // want.shape[0]  # small images are written enlarged by an integer nearest-neighbour factor
    assert k >= 1 and np.array_equal(png, want.repeat(k, axis=0).repeat(k, axis=1))

    np.save(tmp_path / "one.npy", cond["prompt_embeds"].numpy())
    np.savez(tmp_path / "partial.npz", prompt_embeds=cond["prompt_embeds"].numpy())
    for args, match in ((["--text-embeds", str(tmp_path / "one.npy")], "give --text-embeds an .npz with one array per"),
                        (["--text-embeds", str(tmp_path / "partial.npz")], "missing ['pooled_prompt_embeds']"),
                        (["--prompt", "a red circle"], "pass --text-embeds FILE.npz")):
        rc = run_cli.main(["--engines", str(out), *args, "--out", str(tmp_path / "bad.png")])
        assert rc == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()
    assert load_manifest(out).has_decode


@pytest.mark.slow
def test_aoti_packages_equal_the_eager_sampler_over_the_schedule(flux_graphs, tmp_path):
    """AOTInductor packages of the FLUX graphs (a minute or two of compiling on 2 cores)."""
    _, adapter, profile, graphs = flux_graphs
    assert _schedule_error(aoti_runner(graphs, tmp_path), adapter, profile, seed=23) < 1e-4
