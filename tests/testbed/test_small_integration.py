"""wan2.1-small wired into the toolchain: recipe, model id, loading, CLIs, bad input, judge.

Everything here runs on a folder with random weights in the trainer's layout (conftest's
``small_folder``), so it holds before the trained weights ship; what needs the trained
weights is in test_shipped_small_model.py and skips until they exist.
"""

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from ertacache.cli import eval as eval_cli
from ertacache.cli import export as export_cli
from ertacache.cli import generate as gen_cli
from ertacache.cli import profile as prof_cli
from ertacache.errors import ModelFilesError, ModelNotFoundError, PromptError
from ertacache.models import loading
from ertacache.models.loading import load_bundle
from ertacache.models.recipes import available_models, load_recipe
from ertacache.testbed import load_testbed
from ertacache.testbed import scene_data as sd
from ertacache.testbed.judges import JUDGES, judge_for
from ertacache.testbed.small import SMALL_ASSET_DIR, SMALL_MODEL_ID, SMALL_SCENE, SMALL_TRANSFORMER

#: a reduced shape for CLI runs: 2 frames of 32x32 = 2 x 4 x 4 = 32 tokens (the model takes any multiple of 8 px)
SHAPE = ["--height", "32", "--width", "32", "--frames", "2"]
TRAIN_COMMAND = "python tools/train_small_testbed.py"


@pytest.fixture()
def absent_package_folder(tmp_path, monkeypatch):
    """Point the package's wan2.1-small folder at a path that does not exist (the state until weights ship)."""
    absent = tmp_path / "site-packages" / "ertacache" / "assets" / "wan2.1-small"
    real = loading.package_folder
    monkeypatch.setattr(loading, "package_folder", lambda r: absent if r.model == SMALL_MODEL_ID else real(r))
    return absent


@pytest.fixture()
def packaged(small_folder, monkeypatch):
    """Point the package's wan2.1-small folder at the random-weights folder (the state once weights ship)."""
    real = loading.package_folder
    monkeypatch.setattr(loading, "package_folder", lambda r: small_folder if r.model == SMALL_MODEL_ID else real(r))
    return small_folder


# ----------------------------------------------------------------------------- recipe and loading

def test_recipe_matches_the_testbed_and_its_prompt_grammar():
    assert SMALL_MODEL_ID in available_models()
    r = load_recipe(SMALL_MODEL_ID)
    assert r.family == "testbed" and r.package_path == "assets/wan2.1-small" and r.hub_id is None
    d = r.defaults
    assert (d.frames, d.height, d.width) == (SMALL_SCENE.frames, SMALL_SCENE.height, SMALL_SCENE.width)
    assert d.steps == 50 and d.shift > 0 and d.guidance_scale > 1 and d.dtype == "fp32"
    assert r.train_command.startswith(TRAIN_COMMAND)
    prompts = list(r.calibration_prompts)
    assert len(prompts) == 16 and len(set(prompts)) == 16
    parsed = [sd.parse_prompt(p) for p in prompts]  # every prompt in the grammar (raises otherwise)
    for k, values in enumerate((sd.COLOURS, sd.SHAPES, sd.DIRECTIONS, sd.BACKGROUNDS)):
        counts = Counter(p[k] for p in parsed)
        assert set(counts) == set(values) and len(set(counts.values())) == 1, f"attribute {k} unbalanced: {counts}"
    assert judge_for(prompts) is JUDGES["scenes"]
    assert judge_for(list(load_recipe("wan2.1-tiny").calibration_prompts)) is JUDGES["digits"]


def test_the_two_testbed_grammars_are_disjoint():
    """judge_for decides by prompts alone, so no prompt may parse under two judges."""
    from ertacache.testbed import data

    for p in data.all_prompts():
        assert not JUDGES["scenes"].reads([p])
    for p in sd.all_prompts():
        assert not JUDGES["digits"].reads([p])
    assert judge_for(["a cat walks on the grass"]) is None and judge_for([]) is None


def test_loads_by_id_and_path_through_from_pretrained(small_folder):
    bundle = load_bundle(SMALL_MODEL_ID, small_folder)
    assert type(bundle.transformer).__name__ == "WanTransformer3DModel"
    assert bundle.transformer.config.num_layers == SMALL_TRANSFORMER.num_layers
    assert bundle.path == small_folder and bundle.model_id == SMALL_MODEL_ID
    facts = json.loads((small_folder / "testbed.json").read_text())
    d = bundle.recipe.defaults
    assert list(bundle.latent_shape(d.frames, d.height, d.width)) == facts["latent_shape"] == [48, 8, 16, 16]
    emb = bundle.encode(list(bundle.recipe.calibration_prompts), "", n_branches=2)
    assert emb.shape == (32, 8, SMALL_TRANSFORMER.text_dim) and torch.isfinite(emb).all()
    frames = bundle.decoder.decode(torch.zeros(1, 48, 2, 8, 8))
    assert frames.shape == (1, 2, 32, 32, 3) and frames.dtype == torch.uint8
    testbed = load_testbed(small_folder)  # the testbed API reads the same folder
    assert testbed.latent_shape == tuple(facts["latent_shape"])
    assert loading.fingerprint_module(testbed.transformer) == bundle.fingerprint


def test_loads_by_id_alone_from_the_package_folder(packaged):
    bundle = load_bundle(SMALL_MODEL_ID)
    assert bundle.path == packaged


# ----------------------------------------------------------------------------- bad input

def test_missing_package_folder_names_it_and_the_training_command(absent_package_folder):
    with pytest.raises(ModelNotFoundError) as err:
        load_bundle(SMALL_MODEL_ID)
    msg = str(err.value)
    assert str(absent_package_folder) in msg and TRAIN_COMMAND in msg and "--model-path" in msg
    assert "\n" not in msg


@pytest.mark.skipif((SMALL_ASSET_DIR / "testbed.json").exists(), reason="the wan2.1-small weights are installed")
def test_the_repository_without_weights_says_how_to_train_them():
    with pytest.raises(ModelNotFoundError, match="train_small_testbed.py") as err:
        load_bundle(SMALL_MODEL_ID)
    assert str(SMALL_ASSET_DIR) in str(err.value)


def _cli_argv(tool: str, tmp_path, model_args: list[str]) -> list[str]:
    """The least each CLI needs to reach the model load."""
    return {
        "profile": [*model_args, "--out", str(tmp_path / "p"), "--quiet"],
        "generate": [*model_args, "--prompt", "red circle moving left on flower", "--no-cache",
                     "--out", str(tmp_path / "v.gif")],
        "export": [*model_args, "--engines", str(tmp_path / "e"), "--quiet"],
        "eval": [*model_args, "--quiet"],
    }[tool]


CLIS = {"profile": prof_cli.main, "generate": gen_cli.main, "export": export_cli.main, "eval": eval_cli.main}


@pytest.mark.parametrize("tool", sorted(CLIS))
def test_every_cli_takes_the_model_id_and_explains_a_missing_folder(tool, absent_package_folder, tmp_path, capsys):
    rc = CLIS[tool](_cli_argv(tool, tmp_path, ["--model", SMALL_MODEL_ID]))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(absent_package_folder) in err and TRAIN_COMMAND in err and "Traceback" not in err
    assert "invalid choice" not in err and "unknown model" not in err
    assert not any(tmp_path.glob("[pev]*")), "nothing is written when the model cannot load"


def _broken_copy(small_folder, tmp_path, how: str):
    copy = tmp_path / "broken"
    shutil.copytree(small_folder, copy)
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    if how == "missing":
        weights.unlink()
    elif how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64)
    return copy, weights


@pytest.mark.parametrize("how, match", [("missing", "has no \\*.safetensors"), ("truncated", "is truncated"),
                                        ("garbage", "not a readable safetensors")])
def test_missing_or_truncated_weights_are_named(small_folder, tmp_path, how, match, capsys):
    copy, weights = _broken_copy(small_folder, tmp_path, how)
    with pytest.raises(ModelFilesError, match=match) as err:
        load_bundle(SMALL_MODEL_ID, copy)
    assert str(weights if how != "missing" else weights.parent) in str(err.value)
    with pytest.raises(ModelFilesError, match=match):
        load_testbed(copy)
    rc = gen_cli.main(_cli_argv("generate", tmp_path, ["--model", SMALL_MODEL_ID, "--model-path", str(copy)]))
    err_text = capsys.readouterr().err
    assert rc == 2 and weights.parent.name in err_text and "Traceback" not in err_text


def test_truncated_file_in_the_package_folder_points_at_the_training_command(small_folder, tmp_path, monkeypatch):
    copy, weights = _broken_copy(small_folder, tmp_path, "truncated")
    monkeypatch.setattr(loading, "package_folder", lambda r: copy)
    with pytest.raises(ModelFilesError) as err:
        load_bundle(SMALL_MODEL_ID)
    assert str(weights) in str(err.value) and TRAIN_COMMAND in str(err.value)


def test_an_unreadable_config_in_the_package_folder_is_one_line(small_folder, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "broken"
    shutil.copytree(small_folder, copy)
    (copy / "transformer" / "config.json").write_text("{ not json")
    monkeypatch.setattr(loading, "package_folder", lambda r: copy)
    rc = gen_cli.main(_cli_argv("generate", tmp_path, ["--model", SMALL_MODEL_ID]))
    err = capsys.readouterr().err
    assert rc == 2 and "from the package's assets/wan2.1-small folder" in err and "Traceback" not in err


def test_unknown_words_list_the_vocabulary(small_folder, tmp_path, capsys):
    bundle = load_bundle(SMALL_MODEL_ID, small_folder)
    with pytest.raises(PromptError) as err:
        bundle.encode(["purple circle moving left on flower"], "", n_branches=2)
    for word in sd.VOCABULARY:
        assert word in str(err.value)
    argv = ["--model", SMALL_MODEL_ID, "--model-path", str(small_folder), "--prompt", "digit 3 moving left",
            "--no-cache", "--steps", "2", *SHAPE, "--out", str(tmp_path / "v.gif")]
    rc = gen_cli.main(argv)
    err_text = capsys.readouterr().err
    assert rc == 2 and "unknown word 'digit'" in err_text and "Traceback" not in err_text
    assert all(w in err_text for w in ("red", "circle", "triangle", "flower", "temple"))
    assert not (tmp_path / "v.gif").exists()


# ----------------------------------------------------------------------------- CLIs on a reduced shape

def test_profile_then_generate_on_a_reduced_shape(small_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle moving left on flower\nblue square moving up on temple\n")
    model = ["--model", SMALL_MODEL_ID, "--model-path", str(small_folder)]
    rc = prof_cli.main([*model, "--steps", "8", "--speedup", "2", "--prompts", str(prompts), *SHAPE,
                        "--out", str(tmp_path / "profile"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "profile" / "profile.json").read_text())
    assert meta["model"] == SMALL_MODEL_ID and meta["steps"] == 8 and meta["full_steps"] == 4
    assert meta["latent_shape"] == [48, 2, 8, 8]
    rc = gen_cli.main([*model, "--profile", str(tmp_path / "profile"), "--prompt", "green cross moving down on temple",
                       "--out", str(tmp_path / "v.gif")])
    assert rc == 0, capsys.readouterr().err
    assert "4/8 full steps" in capsys.readouterr().out
    assert (tmp_path / "v.gif").stat().st_size > 0


def test_eval_default_held_out_prompts_are_unseen_and_balanced():
    """16 held-out prompts from the scene grammar, none a calibration prompt, each attribute value equally often."""
    import argparse

    recipe = load_recipe(SMALL_MODEL_ID)
    calibration = list(recipe.calibration_prompts)
    prompts, seeds = eval_cli.held_out_set(argparse.Namespace(seeds=None, prompts=None), None, calibration)
    assert len(prompts) == len(seeds) == eval_cli.DEFAULT_HELD_OUT and seeds[0] == 1000
    assert not set(prompts) & set(calibration) and len(set(prompts)) == len(prompts)
    parsed = [sd.parse_prompt(p) for p in prompts]
    for k in range(4):
        assert len(set(Counter(p[k] for p in parsed).values())) == 1, f"attribute {k} unbalanced"


@pytest.mark.slow
def test_eval_reports_one_adherence_column_per_attribute(small_folder, tmp_path, capsys):
    """ertacache-eval --model wan2.1-small scores adherence with the scene judge, not the digit one."""
    out = tmp_path / "eval.json"
    rc = eval_cli.main(["--model", SMALL_MODEL_ID, "--model-path", str(small_folder), "--steps", "6",
                        "--speedups", "2", "--methods", "uniform", "--seeds", "1000-1001", *SHAPE,
                        "--json", str(out), "--quiet"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    doc = json.loads(out.read_text())
    columns = {"colour_acc", "shape_acc", "direction_acc", "background_acc"}
    for row in doc["rows"]:
        assert columns <= set(row) and "digit_acc" not in row and "motion_acc" not in row
        assert all(0.0 <= row[c] <= 1.0 for c in columns)
    header = printed.out.splitlines()[1]
    assert all(name in header for name in ("colour", "shape", "direction", "background")) and "digit" not in header
    held_out = doc["config"]["held_out_prompts"]
    assert judge_for(held_out) is JUDGES["scenes"]
    assert not set(held_out) & set(load_recipe(SMALL_MODEL_ID).calibration_prompts)


# ----------------------------------------------------------------------------- the judge on real clips

def test_scene_judge_is_right_on_rendered_training_clips():
    """Each attribute's verdict on ground-truth clips of the training split at the shipped geometry."""
    frames, scenes = sd.real_clip_batch("train", 32, seed=21, spec=SMALL_SCENE)  # (B, F, H, W, 3) uint8
    prompts = [sc.prompt for sc in scenes]
    acc = JUDGES["scenes"].score(frames.numpy(), prompts)
    assert acc["colour_acc"] == 1.0 and acc["direction_acc"] == 1.0
    assert acc["shape_acc"] >= 0.9 and acc["background_acc"] >= 0.9
    shuffled = prompts[1:] + prompts[:1]  # every clip judged against another clip's prompt
    wrong = JUDGES["scenes"].score(frames.numpy(), shuffled)
    truth = np.array([sd.parse_prompt(p) for p in prompts])
    other = np.array([sd.parse_prompt(p) for p in shuffled])
    for k, col in enumerate(JUDGES["scenes"].columns):
        same = float((truth[:, k] == other[:, k]).mean())  # chance agreement of the shuffled prompts
        assert wrong[col] <= same + 0.1, f"{col} accepts other prompts' {col[:-4]}s"


# ----------------------------------------------------------------------------- diffusers-native API

@pytest.mark.slow  # ~15 s on the shared 2-core VM, mostly importing and building WanPipeline
def test_the_small_testbed_as_a_wan_pipeline_matches_the_reference_sampler(small_folder):
    """load_testbed_pipeline(model="wan2.1-small"): WanPipeline and the testbed sampler agree (RGB frames)."""
    from ertacache.integrations import encode_testbed_prompts, load_testbed_pipeline, pipeline_num_frames
    from ertacache.sampling import initial_latents
    from ertacache.testbed.model import sample_latents

    steps, g, prompt = 3, 5.0, "yellow cross moving up on temple"
    latent = (48, 2, 8, 8)  # 2 frames of 32x32
    pipe = load_testbed_pipeline(small_folder, model=SMALL_MODEL_ID)
    pipe.set_progress_bar_config(disable=True)
    embeds = encode_testbed_prompts([prompt, ""], small_folder, model=SMALL_MODEL_ID)  # (2, L, D)
    noise = initial_latents(latent, [4])
    kwargs = dict(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], num_inference_steps=steps,
                  height=32, width=32, num_frames=pipeline_num_frames(2), guidance_scale=g)
    got = pipe(latents=noise.clone(), output_type="latent", **kwargs).frames
    tb = load_testbed(small_folder)
    ours = sample_latents(tb.transformer, tb.text_encoder, [prompt], [4], latent, steps=steps, shift=3.0,
                          guidance_scale=g)
    torch.testing.assert_close(got, ours, rtol=0, atol=5e-5)
    video = pipe(latents=noise.clone(), output_type="np", **kwargs).frames  # (1, F, H, W, 3) in [0, 1]
    assert video.shape == (1, 2, 32, 32, 3)
    assert np.abs(video * 255 - tb.vae.decode(ours).numpy().astype(np.float32)).max() <= 1.0
