"""Wan2.2 A14B exported: a graph pair per expert in one folder, the runtime picking the pair by step.

Two tiny random Wan transformers of the same shape (different seeds) stand in for the high-noise and
low-noise experts. The exported schedule must equal the eager two-expert sampler (which equals
``WanPipeline`` with ``transformer_2``, tests/models/test_wan22_a14b.py), step by step on the expert
the nominal sigma table gives, with each expert's CFG scale; a folder whose switch or schema was
edited is refused before anything runs.
"""

import pytest
import torch

from ertacache.contract import (CACHED_STEP, FULL_STEP, expert_graph, graph_role, load_manifest, step_graph_names)
from ertacache.errors import UserError
from ertacache.export.graphs import BakeStepGraphs
from ertacache.export.runners import EagerRunner, relative_l2, run_schedule
from ertacache.models.experts import Experts
from ertacache.sampling import CachedSampler
from tests.export.fixtures import program_runner
from tests.models.test_wan22_a14b import GUIDANCE, GUIDANCE_2, _calibration_set

LATENT = (4, 2, 4, 6)  # (C, F', H', W') of the calibration set
STEPS = 12


@pytest.fixture(scope="module")
def a14b():
    """Both experts' adapters and a K = 2 profile with cached steps in both experts (open-loop Taylor calibration)."""
    from types import SimpleNamespace

    from ertacache.profile.calibrate import calibrate
    from ertacache.profile.config import CalibrationConfig
    from ertacache.profile.predictor import PredictorConfig
    from tests.integrations.test_wan_pipeline import make_profile
    from tests.conftest import tiny_wan

    cal, experts, sigmas = _calibration_set(steps=STEPS, prompts=2)
    config = CalibrationConfig(speedup=1.5, loop="open", batch_size=2, predictor=PredictorConfig(kind="taylor",
                                                                                                    order=1))
    res = calibrate(cal, config, progress=False, log=lambda s: None).result
    profile = make_profile(tiny_wan(), cal.adapter)
    profile.steps, profile.mask, profile.nominal_sigmas = STEPS, list(res.mask), [float(s) for s in sigmas]
    profile.sigmas, profile.phi = [float(s) for s in res.sigmas], [float(p) for p in res.phi]
    profile.corr_a, profile.corr_b, profile.pred_w, profile.pred_b = res.corr_a, res.corr_b, res.pred_w, res.pred_b
    profile.latent_shape, profile.experts = list(LATENT), experts
    profile.predictor = config.predictor.describe()
    b = experts.starts[1]
    assert not all(profile.mask[:b]) and not all(profile.mask[b:]), profile.mask  # both experts reuse
    adapters = [cal.adapter, *cal.more_adapters]
    graphs = BakeStepGraphs(batch_size=1, dtype=torch.float32, text_shape=(5, 16))(adapters, profile)
    return SimpleNamespace(adapters=adapters, profile=profile, experts=experts, graphs=graphs)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, *LATENT, generator=g), torch.randn(2, 5, 16, generator=g)  # noise, cond + uncond rows


def test_graph_names_per_expert():
    assert step_graph_names(1) == (FULL_STEP, CACHED_STEP)
    assert step_graph_names(2) == (FULL_STEP, CACHED_STEP, "full_step_2", "cached_step_2")
    assert [graph_role(n) for n in step_graph_names(2)] == [(FULL_STEP, 0), (CACHED_STEP, 0), (FULL_STEP, 1),
                                                             (CACHED_STEP, 1)]
    assert graph_role("full_step_1") == ("full_step_1", 0) and graph_role("vae_decode") == ("vae_decode", 0)
    assert graph_role("cached_step_02") == ("cached_step_02", 0)  # not a canonical expert name: unknown
    with pytest.raises(ValueError, match="only the step graphs"):
        expert_graph("vae_decode", 1)


def test_one_pair_per_expert_runs_the_two_expert_schedule(a14b):
    graphs, profile, experts = a14b.graphs, a14b.profile, a14b.experts
    assert graphs.names == list(step_graph_names(2)) and graphs.experts == experts
    for e in (0, 1):  # same I/O for both experts: the runtime binds one set of buffers to both
        for g in (FULL_STEP, CACHED_STEP):
            assert graphs.specs[expert_graph(g, e)].to_json() == graphs.specs[g].to_json()
    noise, text = _inputs(3)
    with torch.no_grad():
        ref = CachedSampler(a14b.adapters, profile.tables(), profile.mask, experts)(noise, text, 0.0).latents
        eager = run_schedule(EagerRunner(graphs.modules), profile.mask, noise, text, 0.0, profile.history, experts)
        exported = run_schedule(program_runner(graphs.programs), profile.mask, noise, text, 0.0, profile.history,
                                experts)
        first_only = CachedSampler(a14b.adapters[0], profile.tables(), profile.mask)(noise, text, GUIDANCE).latents
    assert relative_l2(eager, ref) < 1e-6 and relative_l2(exported, ref) < 1e-5
    assert relative_l2(first_only, ref) > 1e-3  # the second pair really ran the low-noise expert


def test_the_pass_refuses_a_transformer_count_that_is_not_the_profiles(a14b):
    with pytest.raises(UserError, match=r"2 expert\(s\) but 1 transformer\(s\)"):
        BakeStepGraphs(batch_size=1, dtype=torch.float32, text_shape=(5, 16))(a14b.adapters[0], a14b.profile)


@pytest.mark.slow  # AOTInductor compiles four step graphs (~40 s on 2 cores)
def test_aoti_packages_of_both_experts_equal_the_eager_sampler(a14b, tmp_path):
    from ertacache.export.aoti_target import AotiPackageFromExportedProgram
    from ertacache.export.runners import AotiRunner

    graphs, profile = a14b.graphs, a14b.profile
    target = AotiPackageFromExportedProgram()
    runner = AotiRunner({n: target(n, graphs.programs[n], tmp_path).path for n in step_graph_names(2)})
    noise, text = _inputs(4)
    with torch.no_grad():
        ref = CachedSampler(a14b.adapters, profile.tables(), profile.mask, a14b.experts)(noise, text, 0.0).latents
        got = run_schedule(runner, profile.mask, noise, text, 0.0, profile.history, a14b.experts)
    assert relative_l2(got, ref) < 1e-4


# ---- the command lines: export (ONNX; tests/export/fixtures.py a14b_folder_export), run, verify ------------------

@pytest.mark.slow
def test_the_folder_runs_each_step_on_its_expert_like_the_eager_sampler(a14b_folder_export):
    from ertacache.models.loading import load_bundle
    from ertacache.profile.artifact import load_profile
    from ertacache.runtime import Runtime
    from ertacache.runtime.inputs import noise_for

    manifest = load_manifest(a14b_folder_export.out)
    profile = load_profile(a14b_folder_export.out / "profile")
    assert manifest.schema_version == 3 and manifest.schedule.experts == profile.experts
    assert set(step_graph_names(2)) <= set(manifest.graphs) and manifest.schedule.guidance_scales == (4.0, 3.0)
    assert set(step_graph_names(2)) <= set(manifest.graph_files("onnx"))
    bundle = load_bundle("wan2.2", a14b_folder_export.folder, dtype="fp32")
    text = bundle.encode(["a red car"], "", 2)
    b = profile.experts.starts[1]

    def eager(scales):
        experts = Experts(profile.experts.starts, scales, profile.experts.boundary_ratio)
        with torch.no_grad():
            return CachedSampler(bundle.adapters, profile.tables(), profile.mask, experts)(noise, text, 0.0).latents

    with Runtime(a14b_folder_export.out, "onnxruntime") as rt:
        noise = noise_for(rt.manifest, 3)
        assert [rt.graph_at(i, True) for i in (0, b - 1, b, profile.steps - 1)] == [
            "full_step", "full_step", "full_step_2", "full_step_2"]
        got = rt.sample(noise, text).clone()
        both = rt.sample(noise, text, guidance_scale=5.0).clone()  # as WanPipeline: given alone, for both
        own = rt.sample(noise, text, guidance_scale=5.0, guidance_scale_2=2.0).clone()
    assert relative_l2(got, eager((GUIDANCE, GUIDANCE_2))) < 1e-4
    assert relative_l2(both, eager((5.0, 5.0))) < 1e-4 and relative_l2(own, eager((5.0, 2.0))) < 1e-4
    assert relative_l2(own, both) > 1e-3


@pytest.mark.slow
def test_run_and_verify_take_the_two_expert_folder(a14b_folder_export, tmp_path, capsys):
    from ertacache.cli import run as run_cli
    from ertacache.cli import verify as verify_cli

    assert verify_cli.main(["--engines", str(a14b_folder_export.out), "--prompt", "a cat", "--seed", "1"]) == 0
    assert "OK" in capsys.readouterr().out
    assert run_cli.main(["--engines", str(a14b_folder_export.out), "--prompt", "a cat", "--out",
                         str(tmp_path / "v.gif")]) == 0
    assert (tmp_path / "v.gif").stat().st_size > 0
    assert run_cli.main(["--engines", str(a14b_folder_export.out), "--prompt", "a cat", "--guidance-scale", "5",
                         "--guidance-scale-2", "2", "--out", str(tmp_path / "w.gif")]) == 0
    assert (tmp_path / "w.gif").read_bytes() != (tmp_path / "v.gif").read_bytes()  # other scales, another video


@pytest.mark.slow
def test_the_torch_backend_builds_both_experts_pairs(a14b_folder_export):
    from ertacache.runtime import Runtime
    from ertacache.runtime.inputs import noise_for

    text = torch.randn(2, *load_manifest(a14b_folder_export.out).shapes.text_embeds[1:])
    with Runtime(a14b_folder_export.out, "onnxruntime") as rt:
        noise = noise_for(rt.manifest, 5)
        ref = rt.sample(noise, text).clone()
    with Runtime(a14b_folder_export.out, "torch", compile_backend="eager",
                 model_path=str(a14b_folder_export.folder)) as rt:
        got = rt.sample(noise, text).clone()
    assert relative_l2(got, ref) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("edit,match", [
    (lambda m: m["profile"]["experts"].update(starts=[0, m["profile"]["experts"]["starts"][1] + 1]),
     "disagrees with the switch"),
    (lambda m: m.update(schema_version=2), "profile.experts is only read in schema 3"),
    (lambda m: m["profile"].pop("experts"), "lacks the field 'experts'"),
    (lambda m: m["graphs"].pop("cached_step_2"), "there is no 'cached_step_2' graph"),
    (lambda m: m["profile"]["experts"].update(guidance_scales=[4.5, 3.0]), "differs from profile.guidance_scale"),
])
def test_an_edited_two_expert_manifest_is_refused(a14b_folder_export, tmp_path, edit, match):
    from ertacache.contract import ManifestError
    from tests.runtime.conftest import copy_folder, edit_manifest

    folder = copy_folder(a14b_folder_export.out, tmp_path / "f")
    edit_manifest(folder, edit)
    with pytest.raises(ManifestError, match=match):
        load_manifest(folder)


@pytest.mark.slow
def test_a_guidance_scale_2_needs_two_experts(wan_folder_export, tmp_path, capsys):
    from ertacache.cli import run as run_cli
    from ertacache.runtime import Runtime

    with Runtime(wan_folder_export, "onnxruntime") as rt:
        with pytest.raises(UserError, match="takes no guidance_scale_2"):
            rt.request_guidance(4.0, 3.0)
    rc = run_cli.main(["--engines", str(wan_folder_export), "--prompt", "a cat", "--guidance-scale-2", "2",
                       "--out", str(tmp_path / "v.gif")])
    assert rc == 2 and "takes no guidance_scale_2" in capsys.readouterr().err
    assert not (tmp_path / "v.gif").exists()


@pytest.mark.slow
def test_wan22_i2v_a14b_exports_runs_and_verifies_from_a_prompt_and_an_image(tmp_path, capsys):
    """Wan2.2 I2V-A14B (two experts, condition latents from the VAE, no CLIP) through export, run and verify."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from PIL import Image

    from ertacache.cli import export as export_cli
    from ertacache.cli import profile as profile_cli
    from ertacache.cli import run as run_cli
    from ertacache.cli import verify as verify_cli
    from ertacache.models.images import sample_images
    from tests.conftest import tiny_umt5
    from tests.models.test_wan22_a14b import tiny_wan_i2v_a14b
    from tests.models.test_wan_i2v import tiny_wan_vae

    tokenizer, text_encoder = tiny_umt5("a cat walks on the grass camera pans slowly".split())
    WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, image_encoder=None, image_processor=None,
                            transformer=tiny_wan_i2v_a14b(0), transformer_2=tiny_wan_i2v_a14b(1), vae=tiny_wan_vae(),
                            boundary_ratio=0.9, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)
                            ).save_pretrained(tmp_path / "folder")
    model = ["--model", "wan2.2-i2v", "--model-path", str(tmp_path / "folder"), "--dtype", "fp32"]
    assert profile_cli.main([*model, "--height", "32", "--width", "32", "--frames", "5", "--steps", "16",
                             "--speedup", "1.6", "--quiet", "--out", str(tmp_path / "p")]) == 0
    out = tmp_path / "out"
    assert export_cli.main([*model, "--profile", str(tmp_path / "p"), "--engines", str(out), "--targets", "onnx",
                            "--timing-repeats", "0", "--quiet"]) == 0
    manifest = load_manifest(out)
    assert manifest.conditioning == ("text_embeds", "image_latents") and manifest.schedule.experts.count == 2
    Image.fromarray(sample_images(1)[0]).save(tmp_path / "first.png")
    request = ["--engines", str(out), "--prompt", "a cat walks", "--image", str(tmp_path / "first.png")]
    assert verify_cli.main(request) == 0 and "OK" in capsys.readouterr().out
    assert run_cli.main([*request, "--out", str(tmp_path / "v.gif")]) == 0
    assert (tmp_path / "v.gif").stat().st_size > 0
