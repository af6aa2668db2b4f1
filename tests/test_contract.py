"""ertacache.contract: the typed manifest, integrity that holds (no bypass), the digest, no import cycle."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

from ertacache.contract import ExportManifest, ManifestError, folder_digest, load_manifest, safe_relpath
from ertacache.engines import EngineMismatchError
from ertacache.errors import UserError
from ertacache.io import sha256_file
from ertacache.runtime import Runtime
from tests.runtime.conftest import copy_folder, edit_manifest


def test_manifest_is_typed(onnx_export):
    m = load_manifest(onnx_export.out)
    assert isinstance(m, ExportManifest)
    assert m.schedule.steps == len(m.schedule.mask) == len(m.schedule.sigmas) - 1
    assert all(isinstance(x, bool) for x in m.schedule.mask) and m.schedule.mask[0]
    assert m.spec("full_step", "latents").shape == m.shapes.latents
    assert set(m.graph_files("onnx")) == {"full_step", "cached_step", "vae_decode"}
    assert all(p.is_file() for p in m.graph_files("onnx").values())
    assert m.digest == folder_digest(onnx_export.out) == onnx_export.digest
    assert m["profile"]["steps"] == m.schedule.steps  # the JSON as read, for tools that print it


# (edit of the manifest JSON, expected message): each a malformed field that used to reach a traceback or a backend
MALFORMED = [
    (lambda m: m.update(files=list(m["files"])), r"files must be a JSON object, got a list"),
    (lambda m: m["graphs"]["full_step"]["inputs"][0].pop("shape"),
     r"graphs.full_step.inputs\[0\] lacks the field 'shape'"),
    (lambda m: m["graphs"]["cached_step"]["inputs"][1].update(shape="[]"),
     r"graphs.cached_step.inputs\[1\].shape must be a JSON list"),
    (lambda m: m["profile"].update(steps=m["profile"]["steps"] + 1), r"the schedule is inconsistent"),
    (lambda m: m["profile"].update(steps=10**9), r"profile.steps is 1000000000, outside"),
    (lambda m: m["profile"].update(mask=["yes"] * len(m["profile"]["mask"])),
     r"profile.mask\[0\] must be true or false"),
    (lambda m: m["profile"].update(guidance_scale="4"), r"profile.guidance_scale must be a finite number"),
    (lambda m: m["graphs"]["full_step"]["inputs"][0].update(dtype="float128"), r"dtype 'float128' is not one of"),
    (lambda m: m["shapes"].update(batch_size=3), r"shapes.batch_size 3 is not the latents' batch"),
    (lambda m: m.update(model="tiny"), r"model must be a JSON object, got a string"),
    (lambda m: m["graphs"].update(evil={"inputs": [], "outputs": []}), r"unknown graph 'evil'"),
    (lambda m: m["targets"]["onnx"]["graphs"]["cached_step"].update(file="../../etc/passwd"),
     r"is not a normalised path inside the folder"),
    (lambda m: m["targets"]["onnx"]["graphs"]["cached_step"].update(file="/etc/passwd"), r"is absolute"),
    (lambda m: m["files"].update({"../x": {"sha256": "0" * 64, "bytes": 1}}), r"not a normalised path"),
    (lambda m: m["files"].pop("onnx/cached_step.onnx"), r"onnx/cached_step.onnx \(onnx cached_step\) is not listed in "
                                                        "files"),
    (lambda m: m["profile"].update(folder="/tmp"), r"profile.folder '/tmp' is absolute"),
    (lambda m: m.update(schema_version=True), r"schema_version True is not 2"),
    (lambda m: m["profile"].pop("history"), r"profile lacks the field 'history'"),
    (lambda m: m["profile"].update(history=0), r"profile.history is 0, outside \[1, 4\]"),
    (lambda m: m["profile"].update(history=2), r"profile.predictor.history 1 differs from profile.history 2"),
    (lambda m: m["profile"].update(guidance="cfg++"), r"profile.guidance 'cfg\+\+' is not one of"),
    (lambda m: m["profile"].update(guidance="embedded"), r"n_branches 2 disagree .*guidance 'embedded'"),
    (lambda m: m.update(conditioning=["latents"]), r"conditioning must list distinct graph-input names"),
    (lambda m: m.update(conditioning=["text_embeds", "text_embeds"]), r"conditioning must list distinct"),
    (lambda m: m.update(conditioning=["prompt_embeds"]), r"graph 'full_step' has I/O .*this runtime expects "
                                                        r"\['latents', 'step', 'prompt_embeds', 'guidance_scale'\]"),
]


@pytest.mark.parametrize("edit, match", MALFORMED)
def test_malformed_manifest_fields_are_refused_naming_the_field(onnx_export, tmp_path, edit, match):
    folder = copy_folder(onnx_export.out, tmp_path / "f")
    edit_manifest(folder, edit)
    with pytest.raises(ManifestError, match=match) as err:
        Runtime(folder, "onnxruntime")
    assert "re-export it with ertacache-export" in str(err.value)


def test_non_json_numbers_and_deep_nesting_are_refused(onnx_export, tmp_path):
    folder = copy_folder(onnx_export.out, tmp_path / "f")
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text.replace('"guidance_scale": 4.0', '"guidance_scale": NaN', 1))
    with pytest.raises(ManifestError, match="NaN is not valid JSON"):
        load_manifest(folder)
    (folder / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ManifestError, match="is corrupt"):
        load_manifest(folder)


def test_every_file_in_the_folder_must_be_listed_and_no_link(onnx_export, tmp_path):
    folder = copy_folder(onnx_export.out, tmp_path / "f")
    (folder / "onnx" / "extra.onnx").write_bytes(b"x")
    with pytest.raises(ManifestError, match=r"onnx/extra.onnx is not listed in manifest.json"):
        load_manifest(folder)
    (folder / "onnx" / "extra.onnx").unlink()
    (folder / "profile" / "link").symlink_to("/etc/hostname")
    with pytest.raises(ManifestError, match=r"profile/link is a symbolic link"):
        load_manifest(folder)


def test_a_graph_file_missing_from_files_cannot_be_swapped_in(onnx_export, tmp_path):
    """The old bypass: drop a graph from `files`, replace it, and it ran unhashed."""
    folder = copy_folder(onnx_export.out, tmp_path / "f")
    edit_manifest(folder, lambda m: m["files"].pop("onnx/cached_step.onnx"))
    (folder / "onnx" / "cached_step.onnx").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="not listed in files"):
        Runtime(folder, "onnxruntime")


@pytest.mark.parametrize("edit, what", [
    (lambda m: m["profile"].update(mask=[True] * len(m["profile"]["mask"])), "mask"),
    (lambda m: m["profile"].update(guidance_scale=7.5), "guidance_scale"),
    (lambda m: m["profile"].update(phi=[1.0] * len(m["profile"]["phi"])), "phi"),
    (lambda m: m["profile"].update(shift=5.0), "shift"),
])
def test_schedule_is_checked_against_the_profile(onnx_export, tmp_path, edit, what):
    """The manifest's schedule is not hashed by itself: an edit there must disagree with profile/ and be refused."""
    folder = copy_folder(onnx_export.out, tmp_path / "f")
    edit_manifest(folder, edit)
    with pytest.raises(EngineMismatchError, match=rf"the manifest's {what}.* differs from its profile's"):
        Runtime(folder, "onnxruntime")


def test_profile_tables_in_the_folder_are_checked_on_open(onnx_export, tmp_path):
    folder = copy_folder(onnx_export.out, tmp_path / "f")
    meta_path = folder / "profile" / "profile.json"
    meta = json.loads(meta_path.read_text())
    meta["phi"] = "1.0"
    meta_path.write_text(json.dumps(meta))
    edit_manifest(folder, lambda m: None, rehash=("profile/profile.json",))
    with pytest.raises(EngineMismatchError, match="its profile is unusable .*field 'phi' has the wrong type"):
        Runtime(folder, "onnxruntime")


def test_expect_digest_pins_the_folder(onnx_export, tmp_path):
    digest = onnx_export.digest
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    with Runtime(onnx_export.out, "onnxruntime", expect_digest=digest) as rt:
        assert rt.manifest.digest == digest
    Runtime(onnx_export.out, "onnxruntime", expect_digest=digest[7:].upper())  # without prefix, any case
    folder = copy_folder(onnx_export.out, tmp_path / "f")
    edit_manifest(folder, lambda m: m.update(created="2000-01-01T00:00:00+00:00"))  # a valid, rehashed-style edit
    with pytest.raises(UserError, match="has digest sha256:[0-9a-f]{64}, not the pinned"):
        Runtime(folder, "onnxruntime", expect_digest=digest)
    with pytest.raises(UserError, match="is not sha256:<64 hex digits>"):
        Runtime(folder, "onnxruntime", expect_digest="abc")


def test_the_runtime_takes_no_mask_override():
    assert "mask" not in inspect.signature(Runtime.sample).parameters
    assert "mask" not in inspect.signature(Runtime.plan).parameters
    assert "mask" not in inspect.signature(Runtime.check_result).parameters


@pytest.mark.parametrize("rel, ok", [
    ("onnx/full_step.onnx", True), ("profile/profile.json", True), ("../x", False), ("a/../../x", False),
    ("/etc/passwd", False), ("a//b", False), ("./a", False), ("a\\b", False), ("", False), ("C:/x", False),
])
def test_safe_relpath(rel, ok):
    if ok:
        assert safe_relpath(rel) == rel
    else:
        with pytest.raises(ValueError):
            safe_relpath(rel)


def test_engines_runtime_and_serving_do_not_import_export():
    """The contract broke the export <-> engines cycle: reading a folder needs no exporter."""
    code = ("import sys, ertacache.engines.onnxruntime, ertacache.engines.torch_compile, ertacache.engines.aoti, "
            "ertacache.runtime, ertacache.serving.spec, ertacache.serving.instance; "
            "print(sorted(m for m in sys.modules if m.startswith('ertacache.export')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip() == "[]", out.stdout


def test_manifest_never_holds_non_json_numbers(onnx_export):
    text = (onnx_export.out / "manifest.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in manifest.json"))
    assert sha256_file(onnx_export.out / "manifest.json") == onnx_export.digest[7:]


def test_cached_step_names_for_k_residual_slots():
    from ertacache.contract import CACHED_INPUTS, IO_NAMES, cached_inputs, io_names, residual_slots

    # K = 1 is the schema-1 contract, name for name
    assert CACHED_INPUTS == cached_inputs(1) == ("latents", "step", "text_embeds", "guidance_scale", "residual")
    assert io_names("cached_step") == IO_NAMES["cached_step"]
    assert residual_slots(3) == ("residual", "residual_1", "residual_2")
    assert cached_inputs(3)[-3:] == residual_slots(3) and io_names("full_step", 3) == IO_NAMES["full_step"]
    two = ("prompt_embeds", "img_ids")  # a family's conditioning tensors sit between step and guidance_scale
    assert io_names("full_step", 1, two)[0] == ("latents", "step", *two, "guidance_scale")
    assert io_names("cached_step", 2, two)[0] == ("latents", "step", *two, "guidance_scale", "residual", "residual_1")
    for bad in (0, 5, True, 2.0):
        with pytest.raises(ValueError, match=r"history \(K\) must be an integer in \[1, 4\]"):
            residual_slots(bad)


def test_schema_1_folder_is_refused_with_the_fix(onnx_export, tmp_path):
    """A folder of the old schema cannot be migrated (its graphs are baked): the refusal says so and names the fix."""
    folder = copy_folder(onnx_export.out, tmp_path / "f")
    edit_manifest(folder, lambda m: (m.update(schema_version=1), m["profile"].pop("history"),
                                     m["profile"].pop("predictor")))
    with pytest.raises(ManifestError) as err:
        Runtime(folder, "onnxruntime")
    text = str(err.value)
    assert "written by an older ertacache (manifest schema_version 1" in text
    assert "this version reads schema 2" in text and "cannot be migrated" in text
    assert f"re-export it with ertacache-export --out {folder} --force" in text
    assert "Traceback" not in text


def test_a_folder_exported_before_the_family_was_recorded_opens_as_wan(onnx_export, tmp_path):
    """Older folders have no profile.guidance and no conditioning list: they read as CFG and text_embeds."""
    folder = copy_folder(onnx_export.out, tmp_path / "f")
    data = json.loads((folder / "manifest.json").read_text())
    assert data["profile"]["guidance"] == "cfg" and data["conditioning"] == ["text_embeds"]
    edit_manifest(folder, lambda m: (m["profile"].pop("guidance"), m.pop("conditioning")))
    manifest = Runtime(folder, "onnxruntime").manifest
    assert manifest.schedule.guidance == "cfg" and manifest.conditioning == ("text_embeds",)
