"""ertacache-run / -verify / -build end to end on a tiny diffusers-format Wan2.1 folder (real loading, UMT5, Wan VAE)."""

import importlib.util

import numpy as np
import pytest
import torch

from ertacache.cli import build as build_cli
from ertacache.cli import run as run_cli
from ertacache.cli import verify as verify_cli
from tests.runtime.conftest import copy_folder

# wan_folder_export (an ONNX export of the tiny Wan2.1 folder through the CLI) is in tests/export/fixtures.py,
# shared with tests/serving.


def test_run_writes_the_video_and_prints_step_times(wan_folder_export, tiny_wan_folder, tmp_path, capsys):
    out = tmp_path / "video.gif"
    rc = run_cli.main(["--engines", str(wan_folder_export), "--backend", "onnxruntime", "--prompt", "a cat walks",
                       "--seed", "3", "--out", str(out), "--model-path", str(tiny_wan_folder)])
    printed = capsys.readouterr().out
    assert rc == 0 and out.stat().st_size > 0
    assert "full step" in printed and "cached step" in printed and "c = " in printed
    assert "8 steps (4 full, 4 cached)" in printed


def test_verify_passes_and_reports_fidelity(wan_folder_export, tiny_wan_folder, tmp_path, capsys):
    rc = verify_cli.main(["--engines", str(wan_folder_export), "--backend", "onnxruntime", "--prompt", "a dog runs",
                          "--model-path", str(tiny_wan_folder), "--json", str(tmp_path / "v.json")])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "rel L2" in printed and "PSNR" in printed and "OK" in printed
    import json

    report = json.loads((tmp_path / "v.json").read_text())
    assert report["rel_l2"] <= 1e-4 and report["ok"]


def test_verify_exits_1_over_tolerance(wan_folder_export, tiny_wan_folder, capsys):
    rc = verify_cli.main(["--engines", str(wan_folder_export), "--backend", "onnxruntime", "--prompt", "a dog runs",
                          "--model-path", str(tiny_wan_folder), "--tolerance", "1e-30"])
    assert rc == 1 and "FAILED: over tolerance" in capsys.readouterr().out


def test_run_with_text_embeds_of_the_wrong_shape_exits_2(wan_folder_export, tmp_path, capsys):
    path = tmp_path / "emb.npy"
    np.save(path, np.zeros((1, 512, 16), np.float32))
    rc = run_cli.main(["--engines", str(wan_folder_export), "--text-embeds", str(path), "--out", str(tmp_path / "v.gif")])
    err = capsys.readouterr().err
    assert rc == 2 and "text_embeds has shape [1, 512, 16] but this export folder takes [2, 512, 16]" in err
    assert not (tmp_path / "v.gif").exists()


def test_run_with_text_embeds_file(wan_folder_export, tmp_path, capsys):
    path = tmp_path / "emb.npy"
    np.save(path, np.random.default_rng(0).standard_normal((2, 512, 16)).astype(np.float32))
    rc = run_cli.main(["--engines", str(wan_folder_export), "--text-embeds", str(path), "--out", str(tmp_path / "v.png")])
    assert rc == 0 and (tmp_path / "v.png").is_file()


@pytest.mark.parametrize("backend, match", [
    ("tvm", "unknown backend 'tvm'"),
    pytest.param("tensorrt", "ertacache[tensorrt]", marks=pytest.mark.skipif(
        importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")),
])
def test_run_bad_backend_exits_2(wan_folder_export, tmp_path, capsys, backend, match):
    rc = run_cli.main(["--engines", str(wan_folder_export), "--backend", backend, "--prompt", "a cat",
                       "--out", str(tmp_path / "v.gif")])
    assert rc == 2 and match in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available(),
                    reason="TensorRT and a GPU are present: the build would run")
def test_build_says_clearly_where_tensorrt_is_absent(wan_folder_export, tmp_path, capsys):
    folder = copy_folder(wan_folder_export, tmp_path / "f")
    rc = build_cli.main(["--engines", str(folder), "--targets", "tensorrt"])
    err = capsys.readouterr().err
    assert rc == 2 and "backend 'tensorrt' needs" in err
    assert not (folder / "tensorrt").exists()
    rc = build_cli.main(["--engines", str(folder), "--targets", "openvino"])
    assert rc == 2 and "--targets takes ['tensorrt']" in capsys.readouterr().err
    with open(folder / "onnx" / "full_step.onnx", "ab") as f:
        f.write(b"\0")
    rc = build_cli.main(["--engines", str(folder)])
    assert rc == 2 and "full_step.onnx does not match its sha256" in capsys.readouterr().err
