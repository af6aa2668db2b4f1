"""The ONNX target: contract in the file, TensorRT-parsable ops, ONNX Runtime numerics vs eager."""

import onnx
import pytest
import torch

from ertacache.export import CACHED_STEP, FULL_STEP, VAE_DECODE, TargetDtypeError, UnsupportedOpsError
from ertacache.export import onnx_target
from ertacache.export.runners import EagerRunner, OnnxRuntimeRunner, relative_l2, run_schedule
from ertacache.export.graphs import BakeStepGraphs
from tests.export.conftest import TEXT

ONNX_DTYPES = {1: "float32", 7: "int64", 10: "float16", 2: "uint8"}


def graph_io(path):
    model = onnx.load(str(path), load_external_data=False)

    def spec(v):
        t = v.type.tensor_type
        assert all(d.HasField("dim_value") for d in t.shape.dim), f"{v.name} has a symbolic dim"  # static
        return v.name, tuple(d.dim_value for d in t.shape.dim), ONNX_DTYPES[t.elem_type]

    return model, [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


@pytest.mark.parametrize("name", [FULL_STEP, CACHED_STEP, VAE_DECODE])
def test_onnx_files_carry_the_contract_statically(onnx_export, name):
    folder = onnx_export.out
    model, inputs, outputs = graph_io(folder / "onnx" / f"{name}.onnx")
    spec = onnx_export.manifest["graphs"][name]
    assert inputs == [(s["name"], tuple(s["shape"]), s["dtype"]) for s in spec["inputs"]]
    assert outputs == [(s["name"], tuple(s["shape"]), s["dtype"]) for s in spec["outputs"]]
    assert model.opset_import[0].version >= 18
    onnx.checker.check_model(model)


def test_every_op_is_tensorrt_parsable_and_rope_has_no_scatter(onnx_export):
    for name, info in onnx_export.manifest["targets"]["onnx"]["graphs"].items():
        assert onnx_target.unsupported_ops(info["ops"]) == [], name
        assert info["nodes_after_folding"] <= info["nodes_before_folding"]
    assert "ScatterND" not in onnx_export.manifest["targets"]["onnx"]["graphs"][FULL_STEP]["ops"]
    assert "LayerNormalization" in onnx_target.TENSORRT_ONNX_OPS and "Attention" not in onnx_target.TENSORRT_ONNX_OPS


def test_onnx_runtime_matches_eager_per_step_and_over_the_schedule(onnx_export, tiny):
    graphs = BakeStepGraphs(1, torch.float32, TEXT, decoder=tiny.decoder)(tiny.adapter, tiny.profile)
    folder = onnx_export.out / "onnx"
    ort = OnnxRuntimeRunner({n: folder / f"{n}.onnx" for n in graphs.specs}, graphs.specs)
    eager = EagerRunner(graphs.modules)
    latents, _, text, g = graphs.example_inputs[FULL_STEP]
    for i in range(tiny.profile.steps):
        step = torch.tensor(i)
        ref_x, ref_r = eager.full(latents, step, text, g)
        got_x, got_r = ort.full(latents, step, text, g)
        torch.testing.assert_close(got_x, ref_x, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_r, ref_r, rtol=0, atol=1e-5)
        torch.testing.assert_close(ort.cached(latents, step, text, g, ref_r), eager.cached(latents, step, text, g, ref_r),
                                   rtol=0, atol=1e-5)
    mask = tiny.profile.mask
    assert relative_l2(run_schedule(ort, mask, latents, text, 4.0), run_schedule(eager, mask, latents, text, 4.0)) <= 1e-4
    assert onnx_export.validation["onnx"]["rel_l2"] <= 1e-4
    assert onnx_export.validation["onnx"]["decode_max_abs_uint8"] <= 1


@pytest.mark.slow
def test_unsupported_op_is_refused_naming_graph_and_op(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_target, "TENSORRT_ONNX_OPS", onnx_target.TENSORRT_ONNX_OPS - {"Gemm"})
    out = tmp_path / "out"
    with pytest.raises(UnsupportedOpsError, match="'full_step'.*Gemm"):
        tiny.export(out, targets="onnx", decode_graph=False, validate=False)
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary left behind


@pytest.mark.slow
def test_fp16_onnx_exports_and_reports_its_error(tiny, tmp_path):
    import copy

    from ertacache.export import ExportConfig, ExportPackage
    from ertacache.models.adapter import adapter_for

    model16 = copy.deepcopy(tiny.model).half()
    report = ExportPackage(ExportConfig(out=tmp_path / "fp16", targets="onnx", dtype="fp16", decode_graph=False,
                                        timing_repeats=0, check_compile=False), log=lambda s: None)(
        adapter_for(model16), tiny.profile, tiny.identity, TEXT)
    assert report.manifest["graphs"][FULL_STEP]["inputs"][2]["dtype"] == "float16"
    assert report.manifest["graphs"][FULL_STEP]["inputs"][0]["dtype"] == "float32"  # latents stay fp32
    assert report.validation["onnx"]["rel_l2"] < 1e-2  # reported, not enforced (vs eager fp16)


def test_bf16_onnx_on_cpu_is_refused_before_any_work(tiny, tmp_path):
    with pytest.raises(TargetDtypeError, match="bfloat16 Conv"):
        tiny.export(tmp_path / "out", targets="onnx,aoti", dtype="bf16")
    assert not (tmp_path / "out").exists()
