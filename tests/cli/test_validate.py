"""Early checks of the CLIs (ertacache.cli.validate): refused in milliseconds, before any model is loaded."""

from __future__ import annotations

import os
import time

import pytest
import torch

from ertacache.cli import build as build_cli
from ertacache.cli import export as export_cli
from ertacache.cli import generate as gen_cli
from ertacache.cli import profile as prof_cli
from ertacache.cli import run as run_cli
from ertacache.cli import triton as triton_cli
from ertacache.cli import verify as verify_cli


def refused(main, argv, capsys, match: str) -> str:
    start = time.perf_counter()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert match in err, err
    assert time.perf_counter() - start < 30  # refused before any long work (no model load, no calibration)
    return err


@pytest.mark.parametrize("argv, match", [
    (["--lambda", "inf"], "--lambda inf is not a finite number"),
    (["--lambda", "nan"], "--lambda nan is not a finite number"),
    (["--speedup", "0.5"], "--speedup 0.5 is out of range"),
    (["--steps", "10000000"], "--steps 10000000 is out of range"),
    (["--steps", "0"], "--steps 0 is out of range"),
    (["--seed", str(2**63)], "--seed 9223372036854775808 is out of range"),
    (["--seed", "-1"], "--seed -1 is out of range"),
    (["--batch-size", "0"], "--batch-size 0 is out of range"),
    (["--guidance-scale", "-5"], "--guidance-scale -5.0 is out of range"),
    (["--shift", "0"], "--shift 0.0 is out of range"),
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--negative-prompt", "x" * 20_000], "--negative-prompt is 20000 characters long"),
])
def test_profile_refuses_bad_values_before_loading(argv, match, tmp_path, capsys):
    refused(prof_cli.main, [*argv, "--out", str(tmp_path / "p")], capsys, match)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused(tmp_path, capsys):
    refused(prof_cli.main, ["--device", "cuda", "--out", str(tmp_path / "p")], capsys, "torch sees no CUDA GPU here")


def test_out_checks_before_any_work(tmp_path, capsys):
    plain = tmp_path / "notes.txt"
    plain.write_text("keep")
    refused(prof_cli.main, ["--out", str(plain), "--force"], capsys, "is a file, not a profile folder")
    other = tmp_path / "photos"
    other.mkdir()
    refused(export_cli.main, ["--out", str(other), "--force"], capsys, "is a folder but not an export folder")
    refused(prof_cli.main, ["--out", str(other)], capsys, "already exists; pass --force")
    refused(prof_cli.main, ["--out", str(plain / "sub")], capsys, "is a file, so no folder can be created under it")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        refused(prof_cli.main, ["--out", str(locked / "p")], capsys, "is not writable")
    assert plain.read_text() == "keep" and list(other.iterdir()) == []


def test_generate_does_not_overwrite_without_force_and_checks_the_suffix(tmp_path, capsys):
    video = tmp_path / "v.gif"
    video.write_bytes(b"GIF89a old")
    refused(gen_cli.main, ["--prompt", "digit 3", "--out", str(video)], capsys, "already exists; pass --force")
    assert video.read_bytes() == b"GIF89a old"
    refused(gen_cli.main, ["--prompt", "digit 3", "--out", str(tmp_path / "v.avi")], capsys,
            "--out must end in one of")
    refused(gen_cli.main, ["--prompt", "digit 3", "--out", str(tmp_path)], capsys, "is a folder")
    refused(gen_cli.main, ["--prompt", "x" * 20_000, "--out", str(tmp_path / "a.gif")], capsys,
            "--prompt is 20000 characters long")
    refused(gen_cli.main, ["--prompt", "  ", "--out", str(tmp_path / "a.gif")], capsys, "empty prompt")


def test_run_verify_build_triton_refuse_bad_folders_and_pins(onnx_export, tmp_path, capsys):
    folder = str(onnx_export.out)
    out = str(tmp_path / "v.gif")
    base = ["--engines", folder, "--text-embeds", str(tmp_path / "t.npy")]
    refused(run_cli.main, [*base, "--out", out, "--expect-digest", "abc"], capsys, "is not sha256:<64 hex digits>")
    refused(run_cli.main, [*base, "--out", out, "--expect-digest", "sha256:" + "0" * 64], capsys, "not the pinned")
    refused(run_cli.main, [*base, "--out", out, "--device", "cuda:0"], capsys, "--device cuda:0")
    refused(run_cli.main, ["--engines", str(tmp_path / "none"), "--prompt", "a", "--out", out], capsys,
            "does not exist; create it with ertacache-export")
    refused(verify_cli.main, [*base, "--tolerance", "-1"], capsys, "--tolerance -1.0 is out of range")
    refused(verify_cli.main, [*base, "--json", str(tmp_path)], capsys, "is a folder; give a file name")
    refused(build_cli.main, ["--engines", folder, "--expect-digest", "sha256:" + "1" * 64], capsys, "not the pinned")
    refused(triton_cli.main, ["--engines", folder, "--repo", str(tmp_path / "r"), "--expect-digest",
                              "sha256:" + "2" * 64], capsys, "not the pinned")
    plain = tmp_path / "repo-file"
    plain.write_text("x")
    refused(triton_cli.main, ["--engines", folder, "--repo", str(plain)], capsys, "is a file; give a folder")
    np_file = tmp_path / "t.npy"
    np_file.write_bytes(b"\x93NUMPY not really")
    refused(run_cli.main, [*base, "--out", out], capsys, "is not a .npy array")
    assert not (tmp_path / "v.gif").exists() and not (tmp_path / "r").exists()


def test_mp4_without_a_writer_is_refused_before_sampling(tmp_path, capsys):
    from ertacache.errors import UserError
    from ertacache.video import check_writable

    try:
        check_writable(tmp_path / "probe.mp4")
    except UserError:
        refused(gen_cli.main, ["--prompt", "digit 3", "--out", str(tmp_path / "v.mp4")], capsys,
                "MP4 needs imageio and imageio-ffmpeg")
        assert list(tmp_path.iterdir()) == []
    else:
        pytest.skip("an MP4 writer is installed here: nothing to refuse")
