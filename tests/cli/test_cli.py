"""Drive the real entry points end to end on a tiny diffusers-format Wan folder."""

import json

import pytest
from PIL import Image

from ertacache.cli import generate as gen_cli
from ertacache.cli import profile as prof_cli

SHAPE = ["--height", "32", "--width", "32", "--frames", "5"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# calibration prompts\na cat walks on the grass\n\na dog runs\na red car\n")
    return path


@pytest.fixture(scope="module")
def profile_dir(tiny_wan_folder, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "profile"
    rc = prof_cli.main(["--model", "wan2.1", "--model-path", str(tiny_wan_folder), "--steps", "10", "--speedup",
                        "2", "--prompts", str(prompts_file), *SHAPE, "--dtype", "fp32", "--out", str(out), "--quiet"])
    assert rc == 0
    return out


def test_profile_cli_writes_a_profile_for_half_the_steps(profile_dir, tiny_wan_folder):
    meta = json.loads((profile_dir / "profile.json").read_text())
    assert meta["model"] == "wan2.1" and meta["steps"] == 10 and meta["full_steps"] == 5
    assert sum(meta["mask"]) == 5 and meta["mask"][0] and meta["mask"][-1]
    assert meta["calibration"]["num_prompts"] == 3
    assert (profile_dir / "error_profile.png").stat().st_size > 1000
    assert meta["config"]["schedule_weight"] == "dt-late"  # auto, with the default predictor


def test_profile_cli_records_the_schedule_weight_it_was_asked_for(tiny_wan_folder, prompts_file, tmp_path):
    out = tmp_path / "profile"
    rc = prof_cli.main(["--model", "wan2.1", "--model-path", str(tiny_wan_folder), "--steps", "10", "--speedup", "2",
                        "--prompts", str(prompts_file), *SHAPE, "--dtype", "fp32", "--out", str(out), "--quiet",
                        "--predictor", "reuse", "--loop", "open", "--schedule-weight", "dt"])
    assert rc == 0
    meta = json.loads((out / "profile.json").read_text())
    assert meta["config"]["schedule_weight"] == "dt" and meta["full_steps"] == 5


def test_generate_cli_cached_and_uncached(profile_dir, tiny_wan_folder, tmp_path, capsys):
    base = ["--model", "wan2.1", "--model-path", str(tiny_wan_folder), "--prompt", "a cat walks", "--seed", "3",
            "--dtype", "fp32"]
    assert gen_cli.main([*base, "--profile", str(profile_dir), "--out", str(tmp_path / "cached.gif")]) == 0
    assert "5/10 full steps" in capsys.readouterr().out
    assert gen_cli.main([*base, "--no-cache", "--steps", "10", *SHAPE, "--out", str(tmp_path / "plain.gif")]) == 0
    assert "10/10 full steps" in capsys.readouterr().out
    gif = Image.open(tmp_path / "cached.gif")
    assert gif.n_frames == 5


def run_err(main, argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--speedup", "0.5"], "--speedup 0.5 is out of range"),
        (["--speedup", "9"], "above what 10 steps allow"),
        (["--lambda", "-1"], "--lambda -1.0 is out of range"),
        (["--prompts", "/nonexistent/prompts.txt"], "does not exist"),
        (["--height", "40"], "multiples of 16"),
    ],
)
def test_profile_cli_bad_input(extra, match, tiny_wan_folder, tmp_path, capsys):
    argv = ["--model", "wan2.1", "--model-path", str(tiny_wan_folder), "--steps", "10", *SHAPE,
            "--out", str(tmp_path / "p"), "--quiet", *extra]
    rc, err = run_err(prof_cli.main, argv, capsys)
    assert rc == 2 and match in err
    assert not (tmp_path / "p").exists()


def test_profile_cli_empty_prompts_file_and_unknown_model(tiny_wan_folder, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    rc, err = run_err(prof_cli.main, ["--model", "wan2.1", "--model-path", str(tiny_wan_folder), "--prompts",
                                      str(empty), "--out", str(tmp_path / "p")], capsys)
    assert rc == 2 and "holds no prompt" in err
    rc, err = run_err(prof_cli.main, ["--model", "sora", "--out", str(tmp_path / "p")], capsys)
    assert rc == 2 and "unknown model id 'sora'" in err


def test_generate_cli_refuses_conflicts_with_the_profile(profile_dir, tiny_wan_folder, tmp_path, capsys):
    base = ["--model-path", str(tiny_wan_folder), "--prompt", "a cat", "--profile", str(profile_dir),
            "--out", str(tmp_path / "x.gif")]
    rc, err = run_err(gen_cli.main, ["--model", "wan2.1", *base, "--steps", "20"], capsys)
    assert rc == 2 and "--steps 20 conflicts with the profile (--steps 10)" in err
    rc, err = run_err(gen_cli.main, ["--model", "wan2.1-14b", *base], capsys)
    assert rc == 2 and "made for --model wan2.1" in err
    rc, err = run_err(gen_cli.main, ["--model", "wan2.1", *base, "--guidance-scale", "1.0"], capsys)
    assert rc == 2 and "CFG" in err
    rc, err = run_err(gen_cli.main, ["--model", "wan2.1", *base[:-1], str(tmp_path / "x.avi")], capsys)
    assert rc == 2 and ".gif" in err
    rc, err = run_err(gen_cli.main, ["--model", "wan2.1", *base[:2], "--prompt", "  ", *base[4:]], capsys)
    assert rc == 2 and "empty prompt" in err
