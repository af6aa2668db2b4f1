"""The whole toolchain on ``--model flux-tiny``, on a random-weights folder of the testbed's layout.

The FLUX family through the CLIs with prompts (the family's two conditioning inputs encoded by
its prompt encoder): profile, generate, export, run, verify and the Triton model instance. A
random-weights folder (the trainer's classes, two blocks) keeps this independent of the
trained weights, which test_shipped_flux_tiny.py guards.
"""

import json

import numpy as np
import pytest
import torch

from ertacache.cli import export as export_cli
from ertacache.cli import generate as gen_cli
from ertacache.cli import profile as prof_cli
from ertacache.cli import run as run_cli
from ertacache.cli import verify as verify_cli
from ertacache.testbed.flux_tiny import FluxSpec, build_flux_tiny, sample_images

SMALL = FluxSpec(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, text_dim=16,
                 axes_dims_rope=(4, 6, 6))


def write_flux_tiny_folder(out, spec=SMALL, seed=0):
    """A flux-tiny folder (transformer/, text_encoder/, vae/ from save_pretrained) with random weights."""
    transformer, text_encoder, vae = build_flux_tiny(seed, spec)
    for name, module in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae)):
        module.save_pretrained(out / name, safe_serialization=True)
    (out / "testbed.json").write_text(json.dumps({"name": "flux-tiny", "random_weights": True}))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_flux_tiny_folder(tmp_path_factory.mktemp("flux") / "flux-tiny")


def test_bundle_encodes_both_inputs_and_the_sampler_equals_the_reference(folder):
    from ertacache.models.loading import load_bundle
    from ertacache.sampling.sampler import CachedSampler, initial_latents
    from ertacache.sampling.sigmas import request_sigmas
    from ertacache.sampling.settings import SampleSettings
    from ertacache.sampling.steps import StepTables

    bundle = load_bundle("flux-tiny", folder)
    assert bundle.family.name == "flux-testbed" and bundle.family.variant_of == "flux"
    settings = SampleSettings.from_recipe(bundle.recipe, steps=8)
    assert settings.guidance == "cfg" and settings.n_branches == 2  # true CFG with the empty prompt
    prompts = ["red digit 3", "blue digit 4"]
    cond = bundle.encode(prompts, "", settings.n_branches)  # cond rows, then the uncond rows
    assert list(cond) == ["prompt_embeds", "pooled_prompt_embeds"] and cond["prompt_embeds"].shape == (4, 4, 16)
    shape = bundle.latent_shape(None, 32, 32)
    assert shape == (48, 8, 8)
    for g, nb in ((settings.guidance_scale, 2), (1.0, 1)):
        text = cond if nb == 2 else {k: v[:2] for k, v in cond.items()}
        tables = StepTables(request_sigmas(bundle, settings), n_branches=nb, channels=48)
        got = CachedSampler(bundle.adapter, tables, [True] * 8)(initial_latents(shape, [1, 2]), text, g).latents
        want = sample_images(bundle.transformer, bundle.prompt_encoder.text_encoder, prompts, [1, 2], steps=8,
                             guidance_scale=g)
        assert torch.allclose(got, want, atol=1e-5), (g, float((got - want).abs().max()))


def test_image_model_refuses_frames_and_unknown_words(folder, tmp_path, capsys):
    base = ["--model", "flux-tiny", "--model-path", str(folder), "--no-cache", "--out", str(tmp_path / "x.png")]
    assert gen_cli.main([*base, "--prompt", "red digit 3", "--frames", "4"]) == 2
    assert "generates images: --frames applies to video models only" in capsys.readouterr().err
    assert gen_cli.main([*base, "--prompt", "purple digit 3"]) == 2
    err = capsys.readouterr().err
    assert "unknown word 'purple'" in err and "red green blue yellow" in err and "Traceback" not in err


def test_weights_folder_problems_are_named(folder, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted copy
    out = str(tmp_path / "x.png")
    assert gen_cli.main(["--model", "flux-tiny", "--model-path", str(broken), "--no-cache", "--prompt",
                         "red digit 3", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "diffusion_pytorch_model.safetensors" in err and "Traceback" not in err
    shutil.rmtree(broken / "vae")
    assert gen_cli.main(["--model", "flux-tiny", "--model-path", str(broken), "--no-cache", "--prompt",
                         "red digit 3", "--out", out]) == 2
    assert "missing vae/config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_profile_generate_export_run_verify_and_serve_with_prompts(folder, tmp_path, capsys):
    """Every CLI with --model flux-tiny and a prompt; the served model equals the direct runtime byte for byte."""
    from ertacache.runtime import Runtime
    from ertacache.runtime.inputs import noise_for, text_embeds_from_prompt
    from ertacache.serving import ModelInstance, RequestError
    from ertacache.serving.repository import RepositoryConfig, write_repository

    model = ["--model", "flux-tiny", "--model-path", str(folder)]
    prof = tmp_path / "profile"
    assert prof_cli.main([*model, "--steps", "12", "--speedup", "2", "--out", str(prof), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "--out image.png" in out  # an image model's hint
    assert gen_cli.main([*model, "--profile", str(prof), "--prompt", "red digit 3", "--out",
                         str(tmp_path / "g.png")]) == 0
    assert "image written to" in capsys.readouterr().out and (tmp_path / "g.png").is_file()
    engines = tmp_path / "engines"
    assert export_cli.main([*model, "--profile", str(prof), "--engines", str(engines), "--targets", "onnx"]) == 0
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["text_encoder"]["embed_shape"] == {"prompt_embeds": [4, 16], "pooled_prompt_embeds": [16]}
    assert manifest["profile"]["n_branches"] == 2  # CFG: cond and uncond rows of each input
    capsys.readouterr()
    assert run_cli.main(["--engines", str(engines), "--backend", "onnxruntime", "--prompt", "green digit 7",
                         "--seed", "3", "--out", str(tmp_path / "r.png")]) == 0
    assert "image written to" in capsys.readouterr().out
    assert verify_cli.main(["--engines", str(engines), "--backend", "onnxruntime", "--prompt", "green digit 7"]) == 0
    assert "OK" in capsys.readouterr().out
    from ertacache.errors import UserError

    with Runtime(engines, "onnxruntime") as rt:  # a CFG folder takes a guidance scale per request
        assert rt.manifest.schedule.n_branches == 2
        rt.load_inputs(noise_for(rt.manifest, 3), text_embeds_from_prompt("green digit 7", rt.manifest), 4.5)
        with pytest.raises(UserError, match="guidance_scale -1 is not a finite number >= 0"):
            rt.load_inputs(noise_for(rt.manifest, 3), text_embeds_from_prompt("green digit 7", rt.manifest), -1)

    report = write_repository(RepositoryConfig(engines=engines, repo=tmp_path / "repo"))
    names = [t.name for t in report.io.inputs]
    assert names == ["prompt", "prompt_embeds", "pooled_prompt_embeds", "seed", "guidance_scale"]
    assert (report.model_dir / "1" / "text_encoder" / "text_encoder" / "config.json").is_file()
    inst = ModelInstance(report.model_dir / "1", report.model_config).__enter__()
    try:
        served = inst.handle({"seed": np.array([3]), "prompt": np.array([b"green digit 7"], dtype=object)})
        with Runtime(engines, "onnxruntime") as rt:
            rt.sample(noise_for(rt.manifest, 3), text_embeds_from_prompt("green digit 7", rt.manifest))
            direct = rt.decode().cpu().numpy()
        assert served["frames"].tobytes() == direct.tobytes()
        with pytest.raises(RequestError, match="give either 'prompt' or 'prompt_embeds' and 'pooled_prompt_embeds'"):
            inst.handle({"seed": np.array([3]), "prompt": np.array([b"red digit 1"], dtype=object),
                         "pooled_prompt_embeds": np.zeros((1, 16), np.float32)})
    finally:
        inst.__exit__(None, None, None)


def test_eval_runs_erta_baselines_and_the_real_peers_on_flux(folder, tmp_path):
    """ertacache-eval on the FLUX family: the builtin baselines, ERTACache with a predictor, and the real
    diffusers peers (TaylorSeer on the double- then single-stream blocks, FirstBlockCache, MagCache), all at
    the same budget; a peer's block counter sees FLUX's blocks."""
    import importlib.util

    from ertacache.cli import eval as eval_cli

    methods = ["fewer-steps", "uniform", "teacache", "erta-t2-closed-full", "diffusers-taylorseer-o1",
               "diffusers-fbcache", "diffusers-magcache"]
    if importlib.util.find_spec("cache_dit") is not None:
        methods.append("cachedit-dbcache")
    out = tmp_path / "eval.json"
    assert eval_cli.main(["--model", "flux-tiny", "--model-path", str(folder), "--steps", "10", "--speedups", "2",
                          "--seeds", "1000-1001", "--methods", ",".join(methods), "--json", str(out),
                          "--quiet"]) == 0  # with CFG: both branches batched in every peer's model call
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(methods) <= set(rows)
    for m in methods:
        r = rows[m]
        assert np.isfinite(r["psnr"]) and r["psnr_worst"] <= r["psnr"], m
        assert abs(r["full_steps"] - 5) <= 1, (m, r["full_steps"])  # the 2x budget of 10 steps
    # FirstBlockCache runs its probe block (one of the 2 double + single blocks) on every cached step
    fb = rows["diffusers-fbcache"]
    assert fb["block_equivalents"] == pytest.approx(fb["full_steps"] + (10 - fb["full_steps"]) / 2)
