"""Export failures: which graph, which stage, which op; the fix when there is one."""

from __future__ import annotations

import re

from ertacache.errors import UserError

_OP_PATTERNS = (
    re.compile(r"(aten[.:]{1,2}[A-Za-z_0-9]+(?:\.[A-Za-z_0-9]+)?)"),  # torch ops: aten.foo.default, aten::foo
    re.compile(r"\bop(?:erator)? ['\"`]?([A-Za-z_][\w.:]*)"),  # "operator Conv", "op 'Foo'"
)


def failing_op(message: str) -> str | None:
    """The operator an exporter error message names, if it names one."""
    for pattern in _OP_PATTERNS:
        m = pattern.search(message)
        if m:
            return m.group(1)
    return None


class GraphExportError(UserError):
    """An exporter refused a graph. The output folder is not written."""

    def __init__(self, graph: str, stage: str, cause: BaseException | str, hint: str | None = None):
        text = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        first = " ".join(str(text).strip().splitlines()[:3])[:600]
        op = failing_op(str(text))
        self.graph, self.stage, self.op = graph, stage, op
        super().__init__(
            f"{stage} failed on graph {graph!r}" + (f" at op {op}" if op else "") + f": {first}; "
            + (hint or "no output folder was written; the failing op needs an export-friendly rewrite "
                       "(see docs/export.md, 'Known limitations') or another --targets")
        )


class UnsupportedOpsError(UserError):
    """An ONNX graph uses ops that TensorRT's ONNX parser does not support."""

    def __init__(self, graph: str, ops: list[str]):
        self.graph, self.ops = graph, ops
        super().__init__(
            f"ONNX graph {graph!r} uses ops TensorRT's ONNX parser does not support: {', '.join(ops)}; "
            "no output folder was written. Rewrite the model code that produces them, or pass "
            "--no-trt-op-check to export for ONNX Runtime only"
        )


class TargetDtypeError(UserError):
    """A target that cannot run the requested dtype on this machine."""
