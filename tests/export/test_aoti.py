"""The AOTInductor target: .pt2 packages that load without the model's Python code."""

import subprocess
import sys

import pytest
import torch

from ertacache.export import CACHED_STEP, FULL_STEP, VAE_DECODE
from ertacache.export.graphs import BakeStepGraphs
from ertacache.export.runners import AotiRunner, EagerRunner, relative_l2, run_schedule
from tests.export.conftest import TEXT

pytestmark = pytest.mark.slow


def test_aoti_packages_match_eager_per_step_and_over_the_schedule(aoti_export, tiny):
    graphs = BakeStepGraphs(1, torch.float32, TEXT, decoder=tiny.decoder)(tiny.adapter, tiny.profile)
    folder = aoti_export.out / "aoti"
    assert sorted(p.name for p in folder.iterdir()) == ["cached_step.pt2", "full_step.pt2", "vae_decode.pt2"]
    aoti, eager = AotiRunner({n: folder / f"{n}.pt2" for n in graphs.specs}), EagerRunner(graphs.modules)
    latents, _, text, g = graphs.example_inputs[FULL_STEP]
    for i in range(tiny.profile.steps):
        step = torch.tensor(i)
        ref_x, ref_r = eager.full(latents, step, text, g)
        got_x, got_r = aoti.full(latents, step, text, g)
        torch.testing.assert_close(got_x, ref_x, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_r, ref_r, rtol=0, atol=1e-5)
        assert got_r.shape == tuple(aoti_export.manifest["graphs"][FULL_STEP]["outputs"][1]["shape"])
        torch.testing.assert_close(aoti.cached(latents, step, text, g, ref_r),
                                   eager.cached(latents, step, text, g, ref_r), rtol=0, atol=1e-5)
    mask = tiny.profile.mask
    assert relative_l2(run_schedule(aoti, mask, latents, text, 4.0), run_schedule(eager, mask, latents, text, 4.0)) <= 1e-4
    assert torch.equal(aoti.decode(latents), eager.decode(latents))
    assert aoti_export.validation["aoti"]["rel_l2"] <= 1e-4


def test_cached_step_package_runs_in_a_process_without_ertacache_or_diffusers(aoti_export, tmp_path):
    spec = {s["name"]: s for s in aoti_export.manifest["graphs"][CACHED_STEP]["inputs"]}
    feeds = [torch.randn(spec["latents"]["shape"]), torch.tensor(3), torch.randn(spec["text_embeds"]["shape"]),
             torch.tensor(4.0), torch.randn(spec["residual"]["shape"])]
    torch.save(feeds, tmp_path / "feeds.pt")
    code = (
        "import sys, torch\n"
        "feeds = torch.load(sys.argv[2])\n"
        "out = torch._inductor.aoti_load_package(sys.argv[1])(*feeds)  # the cached step returns one tensor\n"
        "assert not any(m.startswith(('ertacache', 'diffusers')) for m in sys.modules), 'model code was imported'\n"
        "print(tuple(out.shape))\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(aoti_export.out / "aoti" / "cached_step.pt2"),
                          str(tmp_path / "feeds.pt")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str(tuple(spec["latents"]["shape"]))


def test_vae_decode_is_listed_with_its_hash(aoti_export):
    assert f"aoti/{VAE_DECODE}.pt2" in aoti_export.manifest["files"]
