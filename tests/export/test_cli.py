"""ertacache-export end to end on a tiny diffusers-format Wan2.1 folder (real loading, calibration, UMT5, Wan VAE)."""

import json
from importlib import resources

import pytest

from ertacache.cli import export as export_cli
from ertacache.export import load_manifest

SHAPE = ["--height", "32", "--width", "32", "--frames", "5", "--steps", "10"]  # 2x: 5 full, K = 3 warm-up


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a cat walks on the grass\na dog runs\n")
    return path


@pytest.fixture(scope="module")
def cli_export(tiny_wan_folder, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "engine"
    rc = export_cli.main(["--model", "wan2.1", "--model-path", str(tiny_wan_folder), *SHAPE, "--speedup", "2",
                          "--loop", "open", "--prompts", str(prompts_file), "--dtype", "fp32", "--targets", "onnx",
                          "--timing-repeats", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    return out


def test_cli_calibrates_exports_and_validates(cli_export, capsys):
    m = load_manifest(cli_export)
    assert m["model"]["id"] == "wan2.1" and m["profile"]["steps"] == 10 and sum(m["profile"]["mask"]) == 5
    assert m["text_encoder"]["kind"] == "UMT5PromptEncoder" and m["text_encoder"]["embed_shape"] == [512, 16]
    assert set(m["graphs"]) == {"full_step", "cached_step", "vae_decode"}  # the real Wan VAE exports statically
    assert m["validation"]["results"]["onnx"]["rel_l2"] <= 1e-4
    assert (cli_export / "profile" / "profile.json").is_file()


def run_err(argv, capsys):
    rc = export_cli.main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [
    (["--targets", "onnx,trt"], "unknown export target"),
    pytest.param(["--targets", "onnx,tensorrt"], "ertacache-build --engines DIR --targets tensorrt",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU may build engines")),
    (["--dtype", "bf16", "--targets", "onnx"], "bfloat16 Conv"),
    (["--batch-size", "0"], "--batch-size 0 is out of range"),
    (["--predictor-curvature", "1.5"], "--predictor-curvature 1.5 is out of range"),
])
def test_cli_bad_flags_exit_2(extra, match, tmp_path, tiny_wan_folder, capsys):
    rc, err = run_err(["--model", "wan2.1", "--model-path", str(tiny_wan_folder), *SHAPE, *extra,
                       "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and match in err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_profile_of_other_steps_and_existing_folder(cli_export, tiny_wan_folder, tmp_path, capsys):
    base = ["--model", "wan2.1", "--model-path", str(tiny_wan_folder), "--profile", str(cli_export / "profile"),
            "--dtype", "fp32", "--targets", "onnx"]
    rc, err = run_err([*base, "--steps", "8", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "--steps 8 differs from the profile" in err
    rc, err = run_err([*base, "--height", "64", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "--height 64 differs" in err
    rc, err = run_err([*base, "--out", str(cli_export)], capsys)
    assert rc == 2 and "already exists; pass --force" in err
    # the profile's predictor is baked into its weights and schedule: another one is refused, not ignored
    kind = (cli_export / "profile" / "profile.json").read_text()
    other = "reuse" if '"kind": "taylor"' in kind else "taylor"
    rc, err = run_err([*base, "--predictor", other, "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and f"--predictor {other} differs from the profile" in err and "re-profile" in err
    assert '"curvature": 0.5' in kind  # the default's; so is the curvature of its weights baked
    rc, err = run_err([*base, "--predictor-curvature", "1", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "--predictor-curvature 1.0 differs from the profile" in err and "0.5" in err
    assert not (tmp_path / "o").exists()


def test_cli_reuses_a_profile(cli_export, tiny_wan_folder, tmp_path, capsys):
    out = tmp_path / "again"
    rc = export_cli.main(["--model", "wan2.1", "--model-path", str(tiny_wan_folder), "--profile",
                          str(cli_export / "profile"), "--dtype", "fp32", "--targets", "onnx", "--no-decode-graph",
                          "--timing-repeats", "0", "--out", str(out)])
    assert rc == 0
    summary = capsys.readouterr().out
    assert "onnx/full_step.onnx" in summary and "rel L2" in summary
    assert json.loads((out / "profile" / "profile.json").read_text()) == \
        json.loads((cli_export / "profile" / "profile.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(not (resources.files("ertacache") / "assets" / "wan2.1-tiny" / "transformer").is_dir(),
                    reason="the trained wan2.1-tiny testbed weights are not in the package yet (tools/train_testbed.py)")
def test_cli_on_the_embedded_testbed(tmp_path, capsys):
    out = tmp_path / "tiny"
    rc = export_cli.main(["--model", "wan2.1-tiny", "--steps", "10", "--loop", "open", "--targets", "onnx",
                          "--timing-repeats", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    m = load_manifest(out)
    assert m["validation"]["results"]["onnx"]["rel_l2"] <= 1e-4
    assert m["graphs"]["vae_decode"]["outputs"][0]["dtype"] == "uint8"
