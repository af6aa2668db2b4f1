"""The output folder: manifest schema and hashes, atomic writes, and the bad inputs."""

import errno
import json

import pytest
import torch

from ertacache.errors import UserError
from ertacache.export import CACHED_STEP, FULL_STEP, GraphExportError, load_manifest, parse_targets
from ertacache.export.manifest import REQUIRED_FIELDS
from ertacache.io import sha256_file
from ertacache.sampling import steps as steps_module


def test_manifest_schema(onnx_export, tiny):
    m = json.loads((onnx_export.out / "manifest.json").read_text())
    assert set(REQUIRED_FIELDS) <= set(m) and m["schema_version"] == 2
    assert m["profile"]["history"] == 1 and m["profile"]["predictor"]["kind"] == "reuse"
    assert m["model"]["fingerprint"] == tiny.profile.model_fingerprint
    assert m["profile"]["mask"] == [bool(x) for x in tiny.profile.mask]
    assert m["profile"]["sigmas"] == pytest.approx(tiny.profile.sigmas)
    assert len(m["profile"]["phi"]) == tiny.profile.steps
    assert m["dtype"] == "fp32" and m["opset"] == 18 and m["backends"] == ["onnx"]
    assert m["shapes"]["latents"] == [1, 4, 2, 4, 4] and m["shapes"]["text_embeds"] == [2, 5, 16]
    assert [i["name"] for i in m["graphs"][CACHED_STEP]["inputs"]][-1] == "residual"
    assert m["text_encoder"]["embed_shape"] == [5, 16]
    assert m["targets"]["torch_compile"]["graph_breaks"] == {FULL_STEP: 0, CACHED_STEP: 0}
    assert all(m["versions"][k] for k in ("torch", "onnx", "diffusers"))
    # timing is recorded consistently (c = cached / full, the bound from c); no speed assertion: a unit test
    # measures on a shared machine, where one noisy call makes the cached step look slower than the full one
    t, mask = m["timing"]["onnxruntime"], m["profile"]["mask"]  # (seconds rounded to 1e-6 in the manifest)
    assert t["full_s"] > 0 and t["cached_s"] > 0 and t["c"] == pytest.approx(t["cached_s"] / t["full_s"], rel=1e-2)
    assert t["speedup_bound"] == pytest.approx(len(mask) / (sum(mask) + (len(mask) - sum(mask)) * t["c"]), rel=1e-3)


def test_every_file_is_hashed_and_tampering_is_refused(onnx_export, tmp_path):
    import shutil

    m = load_manifest(onnx_export.out)  # verifies every hash
    on_disk = {p.relative_to(onnx_export.out).as_posix() for p in onnx_export.out.rglob("*") if p.is_file()}
    assert set(m["files"]) == on_disk - {"manifest.json"}
    assert {"profile/profile.json", "profile/correction.safetensors", "onnx/full_step.onnx"} <= set(m["files"])
    for rel, entry in m["files"].items():
        assert entry["sha256"] == sha256_file(onnx_export.out / rel)
    copy = tmp_path / "copy"
    shutil.copytree(onnx_export.out, copy)
    with open(copy / "onnx" / "cached_step.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="cached_step.onnx does not match its sha256"):
        load_manifest(copy)


@pytest.mark.slow
def test_existing_folder_needs_force_and_is_replaced_atomically(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(UserError, match="already exists; pass --force"):
        tiny.export(out, targets="onnx", decode_graph=False)
    with pytest.raises(UserError, match="is a folder but not an export folder"):  # --force replaces only our folders
        tiny.export(out, targets="onnx", decode_graph=False, force=True)
    assert (out / "old.txt").read_text() == "keep me"
    (out / "manifest.json").write_text("{}")  # an (old, broken) export folder: that one --force replaces
    tiny.export(out, targets="onnx", decode_graph=False, timing_repeats=0, check_compile=False, force=True)
    assert not (out / "old.txt").exists() and (out / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling left


@pytest.mark.parametrize("targets", ["trt", "onnx,foo", ""])
def test_unknown_target_is_refused(targets):
    with pytest.raises(UserError, match="--targets takes a comma-separated subset"):
        parse_targets(targets)


def test_exporter_failure_names_the_graph_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    def data_dependent_rectify(v, a, b):
        if (a.abs().sum() > 0).item():  # data-dependent control flow: torch.export refuses it
            return v - (a.mean() * v + b.mean())
        return v

    monkeypatch.setattr(steps_module, "rectify", data_dependent_rectify)
    with pytest.raises(GraphExportError, match="torch.export failed on graph 'cached_step'") as info:
        tiny.export(tmp_path / "out", targets="onnx")
    assert info.value.graph == CACHED_STEP
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_disk_full_mid_write_leaves_no_folder(tiny, tmp_path, monkeypatch):
    def full_disk_save(self, destination, **kwargs):
        with open(destination, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", full_disk_save)
    with pytest.raises(UserError, match="disk full"):
        tiny.export(tmp_path / "out", targets="onnx", check_compile=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_validation_failure_leaves_no_folder(tiny, tmp_path, monkeypatch):
    from ertacache.export import runners

    monkeypatch.setattr(runners, "relative_l2", lambda got, ref: 1.0)
    from ertacache.export import package

    monkeypatch.setattr(package, "relative_l2", lambda got, ref: 1.0)
    with pytest.raises(GraphExportError, match="relative L2 1 > 0.0001"):
        tiny.export(tmp_path / "out", targets="onnx", decode_graph=False, check_compile=False)
    assert list(tmp_path.iterdir()) == []


def test_profile_for_other_weights_is_refused(tiny, tmp_path):
    from dataclasses import replace

    other = replace(tiny.identity, fingerprint="0" * 16)
    from ertacache.export import ExportConfig, ExportPackage

    with pytest.raises(UserError, match="re-profile this model"):
        ExportPackage(ExportConfig(out=tmp_path / "o", targets="onnx"), log=lambda s: None)(
            tiny.adapter, tiny.profile, other, (5, 16))


@pytest.mark.slow
def test_stage_lines_count_up_to_the_announced_total(tiny, tmp_path):
    lines: list[str] = []
    tiny.export(tmp_path / "out", log=lines.append, targets="onnx", timing_repeats=0, check_compile=False)
    done = [line for line in lines if line.startswith("[") and "] done in" in line]
    total = len(done)
    assert total >= 5  # bake, onnx x 3 graphs, validate, timing, profile copy
    assert [line.split(" ", 1)[0] for line in done] == [f"[{k}/{total}" for k in range(1, total + 1)]
