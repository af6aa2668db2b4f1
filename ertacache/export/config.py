"""Export settings as a dataclass that validates itself and says how to fix a bad value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ertacache.errors import UserError
from ertacache.export.errors import TargetDtypeError

#: targets that write files into the output folder; torch.compile is checked, not written (see docs/export.md).
#: tensorrt builds engines from the ONNX graphs (so implies onnx) and needs TensorRT and a GPU here
TARGETS = ("onnx", "aoti", "tensorrt")
DEFAULT_TARGETS = ("onnx", "aoti")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: fp32 acceptance bound on the final latents, relative L2 against the eager cached sampler
FP32_TOLERANCE = 1e-4


def parse_targets(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """"onnx,aoti" -> ("onnx", "aoti"); refuses unknown or empty lists with the valid names."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [t for t in items if t not in TARGETS]
    if unknown or not items:
        raise UserError(f"unknown export target(s) {unknown or items!r}; --targets takes a comma-separated subset "
                        f"of {list(TARGETS)}, e.g. --targets onnx,aoti")
    if "tensorrt" in items and "onnx" not in items:
        items.insert(items.index("tensorrt"), "onnx")  # engines are built from the ONNX graphs
    return tuple(dict.fromkeys(items))  # de-duplicated, order kept


@dataclass
class ExportConfig:
    """What to export and how.

    out: the output folder, written atomically (temporary sibling, then rename).
    force: replace an existing ``out`` (only once the new folder is complete).
    targets: subset of :data:`TARGETS`. ONNX (opset 18+, for ONNX Runtime and TensorRT)
        and AOTInductor packages (.pt2, C++-loadable); tensorrt also builds TensorRT engines from the
        ONNX here (ertacache.engines.tensorrt; needs TensorRT and a GPU).
    dtype: transformer precision of the graphs. Latents, sigmas and the Euler update stay fp32.
    batch_size: videos per request B; graphs are static in it.
    opset: ONNX opset (>= 18; 17 makes the dynamo exporter emit an invalid Split).
    check_tensorrt_ops: refuse ONNX graphs with ops TensorRT's parser lacks.
    check_compile: verify ``torch.compile(fullgraph=True)`` traces both step modules with zero
        graph breaks (``torch._dynamo.explain``; cheap, no Inductor compile).
    decode_graph: also export ``vae_decode`` (latents -> uint8 frames).
    validate: run every target through the whole schedule against the eager cached sampler.
    tolerance: fp32 bound on relative L2 of the final latents; fp16/bf16 errors are reported only.
    timing_repeats: step timings per graph for the cached-step cost ratio c (0: skip timing).
    seed: seed of the validation noise and text embeddings.
    """

    out: Path
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dtype: str = "fp32"
    batch_size: int = 1
    force: bool = False
    opset: int = 18
    check_tensorrt_ops: bool = True
    check_compile: bool = True
    decode_graph: bool = True
    validate: bool = True
    tolerance: float = FP32_TOLERANCE
    timing_repeats: int = 5
    seed: int = 0
    onnx_providers: tuple[str, ...] = field(default_factory=lambda: ("CPUExecutionProvider",))

    def __post_init__(self):
        self.out = Path(self.out)
        self.targets = parse_targets(self.targets)
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.opset < 18:
            raise UserError(f"opset {self.opset} is too old: the dynamo exporter needs opset 18 or later "
                            "(opset 17 produces an invalid Split in the cached step)")
        if not self.tolerance > 0:
            raise UserError(f"tolerance must be > 0, got {self.tolerance}")
        if self.timing_repeats < 0:
            raise UserError(f"timing_repeats must be >= 0, got {self.timing_repeats}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def check_machine(self) -> None:
        """Refuse, before any compute, a dtype a target cannot run (so cannot validate) on this machine.

        Measured (docs/export.md): ONNX Runtime's CPU provider has no bfloat16 Conv kernel, so a bf16
        ONNX graph does not load; fp16 loads and runs. AOTInductor compiles fp16 and bf16 on CPU.
        """
        if "tensorrt" in self.targets:
            from ertacache.engines.base import require_backend
            from ertacache.engines.errors import BackendNotInstalledError

            try:
                require_backend("tensorrt")
            except BackendNotInstalledError as e:
                raise BackendNotInstalledError(
                    f"--targets tensorrt builds engines on this machine, which cannot: {e}. Export with --targets onnx "
                    "here and build the engines where they will run: ertacache-build --engines DIR --targets tensorrt"
                ) from None
        if "onnx" in self.targets and self.dtype == "bf16" and set(self.onnx_providers) <= {"CPUExecutionProvider"}:
            raise TargetDtypeError(
                "--dtype bf16 with --targets onnx cannot be validated here: ONNX Runtime's CPU provider has no "
                "bfloat16 Conv kernel, so the graph does not load. Use --dtype fp16 or fp32 for ONNX on this "
                "machine, --targets aoti for bf16, or export where a CUDA/TensorRT provider is available"
            )
