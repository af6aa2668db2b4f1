"""ertacache-triton's repository: layout, config.pbtxt, every refusal (no server needed)."""

import dataclasses
import json
import shutil

import pytest

from ertacache.cli import triton as triton_cli
from ertacache.contract import load_manifest
from ertacache.errors import UserError
from ertacache.serving import RepositoryConfig, expected_io, write_repository
from ertacache.serving.instance import ModelParameters
from ertacache.serving.spec import check_model_config
from tests.runtime.conftest import copy_folder


def test_layout_and_config(served_repo, wan_folder_export):
    repo, reports = served_repo
    wan = reports["wan"]
    assert (repo / "wan" / "config.pbtxt").is_file() and (repo / "wan" / "1" / "model.py").is_file()
    # the export folder is copied whole (manifest + graphs + profile) and the text encoder bundled
    assert (repo / "wan" / "1" / "engines" / "manifest.json").read_bytes() == (wan_folder_export / "manifest.json").read_bytes()
    assert (repo / "wan" / "1" / "text_encoder" / "text_encoder").is_dir()
    assert (repo / "wan" / "1" / "text_encoder" / "tokenizer").is_dir()
    text = (repo / "wan" / "config.pbtxt").read_text()
    for line in ('name: "wan"', 'backend: "python"', "max_batch_size: 0", 'name: "prompt"', "data_type: TYPE_STRING",
                 "dims: [ 2, 512, 16 ]", "data_type: TYPE_UINT8", "dims: [ 1, 5, 32, 32, 3 ]", "kind: KIND_CPU",
                 'key: "verify_files"', 'key: "intra_op_threads"'):
        assert line in text, line
    assert [t.name for t in wan.io.inputs] == ["prompt", "text_embeds", "seed", "guidance_scale"]
    assert [t.name for t in wan.io.outputs] == ["frames", "latents"]
    assert wan.io.input("prompt").optional and wan.io.input("text_embeds").optional and not wan.io.input("seed").optional


def test_options_shape_the_config(served_repo):
    repo, reports = served_repo
    tiny = reports["tiny"]
    assert [t.name for t in tiny.io.inputs] == ["text_embeds", "seed", "guidance_scale"]  # no encoder: embeddings only
    assert not tiny.io.input("text_embeds").optional and tiny.text_encoder is None
    stream = (repo / "tiny_stream" / "config.pbtxt").read_text()
    assert "decoupled: true" in stream and 'name: "step"' in stream
    rows = reports["tiny_rows"]
    assert "max_batch_size: 2" in (repo / "tiny_rows" / "config.pbtxt").read_text()
    assert "dynamic_batching" in (repo / "tiny_rows" / "config.pbtxt").read_text()
    assert rows.io.output("frames").dims == (2, 8, 8, 3)  # the folder's batch of 1 is Triton's batch dim now
    assert rows.io.input("text_embeds").dims == (2, 5, 16)  # cond + uncond row of one sample


def test_config_round_trip(served_repo):
    """What the writer declares is what the model accepts at load (and its parameters parse back)."""
    _, reports = served_repo
    for report in reports.values():
        params = ModelParameters.from_config(report.model_config["parameters"])
        assert params.to_strings() == report.parameters
        manifest = load_manifest(report.model_dir / "1" / "engines")
        decoupled = bool(report.model_config.get("model_transaction_policy"))
        assert check_model_config(report.model_config, manifest, decoupled) == report.io


def test_an_edited_config_that_no_longer_fits_the_folder_is_refused(served_repo):
    _, reports = served_repo
    report = reports["tiny"]
    manifest = load_manifest(report.model_dir / "1" / "engines")
    config = json.loads(json.dumps(report.model_config))
    config["input"][0]["dims"] = ["2", "5", "17"]
    with pytest.raises(UserError, match=r"declares input 'text_embeds' as TYPE_FP32 \[2, 5, 17\] but the export "
                                        r"folder has TYPE_FP32 \[2, 5, 16\]"):
        check_model_config(config, manifest, False)
    config = json.loads(json.dumps(report.model_config))
    del config["output"][0]
    with pytest.raises(UserError, match="lacks the output 'frames'"):
        check_model_config(config, manifest, False)


def test_refusals(onnx_export, served_repo, tmp_path):
    repo, _ = served_repo
    with pytest.raises(UserError, match="already exists; pass --force"):
        write_repository(RepositoryConfig(onnx_export.out, repo, name="tiny"))
    with pytest.raises(UserError, match="not a valid Triton model name"):
        RepositoryConfig(onnx_export.out, repo, name="../evil")
    with pytest.raises(UserError, match="--instances 0: give at least 1"):
        RepositoryConfig(onnx_export.out, repo, instances=0)
    with pytest.raises(UserError, match="does not exist; create it with ertacache-export"):
        write_repository(RepositoryConfig(tmp_path / "nothing", tmp_path / "r"))
    with pytest.raises(UserError, match="no tensorrt artifacts for --backend tensorrt; build them on the serving GPU"):
        write_repository(RepositoryConfig(onnx_export.out, tmp_path / "r", backend="tensorrt"))
    with pytest.raises(UserError, match="text encoder of 'tiny' was not found"):
        write_repository(RepositoryConfig(onnx_export.out, tmp_path / "r", text_encoder=True))
    folder = copy_folder(onnx_export.out, tmp_path / "tampered")
    with open(folder / "onnx" / "full_step.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="onnx/full_step.onnx does not match its sha256"):
        write_repository(RepositoryConfig(folder, tmp_path / "r"))
    assert not (tmp_path / "r" / "tiny").exists()  # nothing half-written


def test_max_batch_size_needs_a_folder_of_batch_one(onnx_export, tmp_path):
    loaded = load_manifest(onnx_export.out)
    manifest = dataclasses.replace(loaded, shapes=dataclasses.replace(loaded.shapes, batch_size=2))
    with pytest.raises(UserError, match="max_batch_size 4 needs an export folder of batch size 1"):
        expected_io(manifest, False, False, 4, False)
    assert expected_io(manifest, False, False, 0, False).outputs  # without Triton batching it is fine


def test_force_replaces_only_that_model(onnx_export, tmp_path):
    repo = tmp_path / "repo"
    write_repository(RepositoryConfig(onnx_export.out, repo, name="a"))
    write_repository(RepositoryConfig(onnx_export.out, repo, name="b"))
    report = write_repository(RepositoryConfig(onnx_export.out, repo, name="a", instances=2, force=True))
    assert "count: 2" in (repo / "a" / "config.pbtxt").read_text() and (repo / "b" / "config.pbtxt").is_file()
    assert sorted(p.name for p in repo.iterdir()) == ["a", "b"]  # no temporary folders left behind
    assert report.model_config["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]


def test_cli_writes_and_prints(onnx_export, tmp_path, capsys):
    repo = tmp_path / "repo"
    rc = triton_cli.main(["--engines", str(onnx_export.out), "--repo", str(repo), "--instances", "2", "--decoupled"])
    out = capsys.readouterr().out
    assert rc == 0 and (repo / "tiny" / "1" / "model.py").is_file()  # name from the model id
    assert "inputs:  text_embeds TYPE_FP32 [2, 5, 16], seed TYPE_INT64 [1], guidance_scale? TYPE_FP32 [1]" in out
    assert "outputs: frames TYPE_UINT8 [1, 2, 8, 8, 3], step TYPE_INT64 [1]" in out
    assert "ertacache-triton serve --repo" in out
    rc = triton_cli.main(["--engines", str(onnx_export.out), "--repo", str(repo)])
    assert rc == 2 and "already exists; pass --force" in capsys.readouterr().err
    shutil.rmtree(repo)
    rc = triton_cli.main(["serve", "--repo", str(repo)])
    assert rc == 2 and "is not a folder; write one with ertacache-triton" in capsys.readouterr().err
