"""ONNX target: ExportedProgram -> checked, constant-folded .onnx whose ops TensorRT can parse.

Why these choices (each forced by a tool, see /work/shared/FACTS.md):
- ``torch.onnx.export(..., dynamo=True)``: the TorchScript exporter has no
  ``aten::rms_norm`` and silently bakes dynamic axes.
- opset 18: with opset 17 the dynamo exporter emits ``Split`` with
  ``num_outputs`` in the cached step, an invalid model ONNX Runtime refuses.
- weights past 2 GB go to one external-data file next to the graph
  (protobuf's 2 GB message limit).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ertacache.export.errors import GraphExportError, UnsupportedOpsError
from ertacache.export.graphs import GraphSpec

OPSET = 18
#: protobuf's hard limit on one message; above it the weights must be external data
PROTOBUF_LIMIT = 2 * 1024**3

#: ONNX ops (default domain) TensorRT's ONNX parser supports: the rows marked "Y" of
#: onnx/onnx-tensorrt docs/operators.md, "TensorRT 10.0 supports operators in the inclusive
#: range of opset 9 to opset 20" (commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c, 2024-06-17).
TENSORRT_ONNX_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not
OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
TENSORRT_OPS_SOURCE = ("onnx/onnx-tensorrt docs/operators.md (TensorRT 10.0, opset 9-20), "
                       "commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c")


def op_counts(model) -> dict[str, int]:
    """Node counts per op type (domain-qualified outside the default domain), subgraphs included."""
    counts: collections.Counter[str] = collections.Counter()

    def walk(graph):
        for node in graph.node:
            counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return dict(sorted(counts.items()))


def unsupported_ops(counts: dict[str, int], supported: frozenset[str] = TENSORRT_ONNX_OPS) -> list[str]:
    return sorted(op for op in counts if op not in supported)


@dataclass
class OnnxGraph:
    """One exported ONNX file and what was checked about it."""

    name: str
    path: Path
    files: list[Path]
    ops: dict[str, int]
    nodes_before_folding: int
    nodes_after_folding: int
    export_s: float
    external_data: bool
    extra: dict = field(default_factory=dict)


def _initializer_bytes(program) -> int:
    total = 0
    for value in program.model.graph.initializers.values():
        const = value.const_value
        if const is not None:
            total += const.nbytes
    return total


def _raise_if_disk_full(e: OSError, graph: str, path: Path) -> None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise GraphExportError(graph, "writing ONNX", f"disk full while writing {path.name} ({e})",
                               hint=f"no output folder was written; free space on {path.parent} "
                                    "or choose another --out") from e


class OnnxFromExportedProgram:
    """Export one graph to ``out_dir/<name>.onnx``: export, fold constants, save, check, op check.

    ``check_tensorrt_ops``: refuse graphs whose ops TensorRT's parser lacks
    (:data:`TENSORRT_ONNX_OPS`); the folder is then not written.
    """

    def __init__(self, opset: int = OPSET, check_tensorrt_ops: bool = True, quiet: bool = True):
        if opset < OPSET:
            raise ValueError(f"opset must be >= {OPSET}: opset 17 makes the dynamo exporter emit an invalid Split")
        self.opset = opset
        self.check_tensorrt_ops = check_tensorrt_ops
        self.quiet = quiet

    def __call__(self, name: str, program: torch.export.ExportedProgram, example_inputs, spec: GraphSpec,
                 out_dir: Path) -> OnnxGraph:
        import onnx

        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}.onnx"
        start = time.perf_counter()
        sink = io.StringIO()
        try:
            # the exporter narrates each stage on stdout; keep it for the error message only
            with contextlib.redirect_stdout(sink) if self.quiet else contextlib.nullcontext():
                onnx_program = torch.onnx.export(
                    program, tuple(example_inputs), dynamo=True, opset_version=self.opset,
                    input_names=spec.input_names, output_names=spec.output_names, optimize=False, verbose=False,
                )
        except Exception as e:
            raise GraphExportError(name, "torch.onnx.export", e) from e
        nodes_before = len(onnx_program.model.graph)
        try:
            onnx_program.optimize()  # onnxscript optimizer: constant folding, dead-code removal
        except Exception as e:
            raise GraphExportError(name, "ONNX constant folding (onnxscript optimizer)", e) from e
        nodes_after = len(onnx_program.model.graph)
        external = _initializer_bytes(onnx_program) >= PROTOBUF_LIMIT
        try:
            onnx_program.save(path, external_data=external)
        except OSError as e:
            _raise_if_disk_full(e, name, path)
            raise
        export_s = time.perf_counter() - start
        files = [path] + ([p for p in out_dir.iterdir() if p.name.startswith(path.name + ".")] if external else [])

        try:
            onnx.checker.check_model(str(path), full_check=False)  # path form: works past 2 GB
        except Exception as e:
            raise GraphExportError(name, "onnx.checker", e) from e
        model = onnx.load(str(path), load_external_data=False)
        got_in = [i.name for i in model.graph.input]
        got_out = [o.name for o in model.graph.output]
        if got_in != spec.input_names or got_out != spec.output_names:
            raise GraphExportError(name, "ONNX I/O check", f"inputs {got_in} / outputs {got_out}, expected "
                                   f"{spec.input_names} / {spec.output_names}")
        counts = op_counts(model)
        if self.check_tensorrt_ops:
            bad = unsupported_ops(counts, TENSORRT_ONNX_OPS)  # looked up now: tests narrow the list
            if bad:
                raise UnsupportedOpsError(name, bad)
        return OnnxGraph(name, path, files, counts, nodes_before, nodes_after, export_s, external)
