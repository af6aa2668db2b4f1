"""TensorRT backend: engines built from the exported ONNX through Polygraphy, run with shared memory and CUDA graphs.

Build (on the machine that will run the engines; ``ertacache-build``):

    onnx/<graph>.onnx --network_from_onnx_path(strongly_typed)--> network
                      --CreateConfig(timing cache, hardware compatibility, version compatible)-->
                      --engine_from_network--> engine --save_engine--> tensorrt/<graph>.trt<ver>.sm<cc>.engine

Strongly typed networks take every tensor's precision from the ONNX (export with
``--dtype fp16`` for an fp16 engine): TensorRT 11 removed the fp16/bf16 builder
flags and 10.x accepts strongly typed networks too. Shapes are static (the
ONNX has no symbolic dimension), so no optimisation profile is needed.

Run: one execution context per graph, created with
``ExecutionContextAllocationStrategy.USER_MANAGED`` and pointed at one
device-memory arena sized by the largest engine (the contexts never run at the
same time); each bound call sets its tensor addresses and enqueues on torch's
current stream, and is captured into a CUDA graph that every step replays.

Nothing here runs without TensorRT and a CUDA GPU; the imports are guarded and
the tests skip with a reason.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ertacache.engines.base import BoundCall, Engine, require_backend
from ertacache.engines.cuda_graph import CudaGraphCall
from ertacache.engines.errors import BackendNotInstalledError, EngineMismatchError

#: --hardware-compatibility values -> trt.HardwareCompatibilityLevel member names
HARDWARE_COMPATIBILITY = {"none": None, "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}


def _trt():
    require_backend("tensorrt")  # names the pip extra, or says there is no GPU
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # e.g. the PyPI placeholder wheels without their libraries
        raise BackendNotInstalledError(f"`import tensorrt` fails here ({e}); install a working TensorRT "
                                       "(pip install 'ertacache[tensorrt]' on a CUDA machine, JetPack on Jetson)") from None
    return trt


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or None when it cannot be imported."""
    try:
        import tensorrt as trt
    except (ImportError, OSError):
        return None
    return trt.__version__


def gpu_identity(device: int | torch.device = 0) -> dict[str, str]:
    """{"name": ..., "compute_capability": "8.7"} of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def engine_file_name(graph: str, trt_version: str, compute_capability: str, hardware_compatibility: str = "none") -> str:
    """``full_step.trt10.8.0.sm87.engine``; hardware-compatible engines say so (``sm80+``, ``sm87-cc``)."""
    sm = "sm" + compute_capability.replace(".", "")
    if hardware_compatibility == "ampere+":
        sm = "sm80+"
    return f"{graph}.trt{trt_version}.{sm}.engine"


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())


def check_engine_entry(entry: Mapping[str, Any], trt_version: str | None, gpu: Mapping[str, str] | None,
                       where: str = "this export folder") -> None:
    """Refuse TensorRT engines built for another TensorRT version or GPU, naming both sides.

    ``entry`` is the manifest's ``targets.tensorrt`` record (written by :func:`build_engines`):
    ``version``, ``compute_capability``, ``gpu``, ``hardware_compatibility``, ``version_compatible``.
    Rules (TensorRT's own portability rules): a plain engine runs only on the TensorRT version that
    built it; a version-compatible one on that version or later. A plain or ``same-cc`` engine runs
    only on the compute capability it was built for; an ``ampere+`` one on any GPU with cc >= 8.0.
    """
    fix = f"rebuild the engines here with `ertacache-build --engines {where} --targets tensorrt --force`"
    built = str(entry.get("version"))
    if trt_version is None:
        raise BackendNotInstalledError(f"{where} has TensorRT {built} engines but TensorRT is not installed here; "
                                       "pip install 'ertacache[tensorrt]' on a CUDA machine")
    if entry.get("version_compatible"):
        if _version_tuple(trt_version) < _version_tuple(built):
            raise EngineMismatchError(f"{where}: engines are version-compatible from TensorRT {built} on, but this "
                                      f"machine has TensorRT {trt_version} (older); {fix}")
    elif trt_version != built:
        raise EngineMismatchError(f"{where}: engines were built with TensorRT {built}, this machine has TensorRT "
                                  f"{trt_version}; {fix} (or build with --version-compatible)")
    if gpu is None:
        raise BackendNotInstalledError(f"{where} has TensorRT engines but no CUDA GPU is visible here")
    want, have = str(entry.get("compute_capability")), str(gpu["compute_capability"])
    level = entry.get("hardware_compatibility") or "none"
    if level == "ampere+":
        if _version_tuple(have) < (8, 0):
            raise EngineMismatchError(f"{where}: engines are hardware-compatible for Ampere and later (sm >= 8.0), "
                                      f"this GPU {gpu['name']} is sm {have}; {fix}")
    elif want != have:
        raise EngineMismatchError(f"{where}: engines were built for {entry.get('gpu')} (compute capability {want}), "
                                  f"this GPU is {gpu['name']} (compute capability {have}); {fix}")


@dataclass(frozen=True)
class TensorRTBuildOptions:
    """How engines are built.

    timing_cache: file reused across builds (tactic timings; later builds take seconds, not minutes).
    hardware_compatibility: "none" (fastest, this GPU's compute capability), "ampere+" (one engine for
        every Ampere-or-later GPU, a few % slower), "same-cc" (any GPU of this compute capability).
    version_compatible: engines that later TensorRT versions can run (lean runtime; slower start).
    workspace_gib: builder workspace limit (None: TensorRT's default, all device memory).
    optimization_level: builder optimisation level 0-5 (None: TensorRT's default 3).
    """

    timing_cache: str | None = None
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    workspace_gib: float | None = None
    optimization_level: int | None = None

    def __post_init__(self):
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise ValueError(f"hardware_compatibility must be one of {list(HARDWARE_COMPATIBILITY)}, "
                             f"got {self.hardware_compatibility!r}")


class EngineFromOnnxPath:
    """Loader: a TensorRT engine built from one static-shape ONNX file (strongly typed)."""

    def __init__(self, path: str | os.PathLike, options: TensorRTBuildOptions = TensorRTBuildOptions()):
        self.path = Path(path)
        self.options = options

    def __call__(self):
        trt = _trt()
        from polygraphy.backend.trt import CreateConfig, engine_from_network, network_from_onnx_path

        opt = self.options
        network = network_from_onnx_path(str(self.path), strongly_typed=True)
        level = HARDWARE_COMPATIBILITY[opt.hardware_compatibility]
        config = CreateConfig(
            load_timing_cache=opt.timing_cache if opt.timing_cache and Path(opt.timing_cache).is_file() else None,
            hardware_compatibility_level=getattr(trt.HardwareCompatibilityLevel, level) if level else None,
            version_compatible=opt.version_compatible or None,
            memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(opt.workspace_gib * 2**30)}
            if opt.workspace_gib else None,
            builder_optimization_level=opt.optimization_level,
        )
        return engine_from_network(network, config, save_timing_cache=opt.timing_cache)


def _device_memory_size(engine) -> int:
    # device_memory_size_v2 appeared in TensorRT 10.1 (and is the only name in TensorRT 11)
    return int(engine.device_memory_size_v2 if hasattr(engine, "device_memory_size_v2") else engine.device_memory_size)


def build_engines(onnx_paths: Mapping[str, Path], out_dir: Path, options: TensorRTBuildOptions = TensorRTBuildOptions(),
                  log=print) -> dict[str, Any]:
    """Build one engine per ONNX graph into ``out_dir``; returns the manifest's ``targets.tensorrt`` record."""
    _trt()
    from polygraphy.backend.trt import save_engine

    version, gpu = tensorrt_version(), gpu_identity(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    if options.timing_cache is None:
        options = TensorRTBuildOptions(str(out_dir / "timing.cache"), options.hardware_compatibility,
                                       options.version_compatible, options.workspace_gib, options.optimization_level)
    engines = {}
    for graph, path in onnx_paths.items():
        start = time.perf_counter()
        engine = EngineFromOnnxPath(path, options)()
        dest = out_dir / engine_file_name(graph, version, gpu["compute_capability"], options.hardware_compatibility)
        save_engine(engine, str(dest))
        engines[graph] = {"file": f"{out_dir.name}/{dest.name}", "device_memory_bytes": _device_memory_size(engine),
                          "build_s": round(time.perf_counter() - start, 1)}
        log(f"  {graph}: {dest.name} ({engines[graph]['build_s']} s)")
    return {"version": version, "gpu": gpu["name"], "compute_capability": gpu["compute_capability"],
            "hardware_compatibility": options.hardware_compatibility, "version_compatible": options.version_compatible,
            "strongly_typed": True,
            "timing_cache": (f"{out_dir.name}/{Path(options.timing_cache).name}"
                             if Path(options.timing_cache).parent.resolve() == out_dir.resolve()
                             else str(options.timing_cache)),
            "engines": engines}


class TensorRTEngine(Engine):
    """Deserialised engines of an export folder's ``tensorrt/``, one context each, one shared arena."""

    backend = "tensorrt"

    def __init__(self, paths: Mapping[str, str | os.PathLike], device: torch.device | str = "cuda",
                 version_compatible: bool = False, cuda_graphs: bool = True):
        super().__init__(device)
        self.paths = {k: Path(v) for k, v in paths.items()}
        self.version_compatible = version_compatible
        self.cuda_graphs = cuda_graphs
        self.engines: dict = {}
        self.contexts: dict = {}
        self.arena: torch.Tensor | None = None
        self._runtime = None
        self._pool = None

    def _activate(self) -> None:
        trt = _trt()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if self.version_compatible:
            self._runtime.engine_host_code_allowed = True  # version-compatible engines carry a lean runtime
        for name, path in self.paths.items():
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineMismatchError(f"TensorRT could not deserialise {path} (built by another TensorRT "
                                          "version or for another GPU?); rebuild it with ertacache-build")
            self.engines[name] = engine
        # the contexts never run at the same time: one arena, sized by the largest engine, serves all
        size = max(_device_memory_size(e) for e in self.engines.values())
        self.arena = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        for name, engine in self.engines.items():
            ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if hasattr(ctx, "set_device_memory"):  # TensorRT >= 10.1
                ctx.set_device_memory(self.arena.data_ptr(), self.arena.numel())
            else:
                ctx.device_memory = self.arena.data_ptr()
            self.contexts[name] = ctx
        if self.cuda_graphs:
            self._pool = torch.cuda.graph_pool_handle()

    def _deactivate(self) -> None:
        self.contexts, self.engines, self.arena, self._runtime, self._pool = {}, {}, None, None, None

    def graphs(self) -> tuple[str, ...]:
        return tuple(self.paths)

    def _io(self, graph: str):
        trt = _trt()
        engine = self.engines[graph]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        return [(n, engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT, tuple(engine.get_tensor_shape(n)))
                for n in names]

    def input_names(self, graph: str) -> tuple[str, ...]:
        self._require_active()
        return tuple(n for n, is_input, _ in self._io(graph) if is_input)

    def bind(self, graph: str, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> BoundCall:
        self._require_active()
        ctx = self.contexts[graph]
        addresses = []
        # by name, generic over the contract's names (K residual slots ``residual``, ``residual_1``, ...): the
        # parser may have dropped an unused input
        for name, is_input, shape in self._io(graph):
            t = (inputs if is_input else outputs).get(name)
            if t is None:
                raise EngineMismatchError(f"TensorRT engine {graph!r} has tensor {name!r}, which the manifest's "
                                          "contract lacks; rebuild the engines from this folder's ONNX")
            if shape != tuple(t.shape):
                raise EngineMismatchError(f"TensorRT engine {graph!r}: {name} is {list(shape)} in the engine but "
                                          f"{list(t.shape)} in the manifest; rebuild the engines")
            addresses.append((name, t.data_ptr()))
        device = self.device

        def call() -> None:
            # the context is shared by every binding of a graph (latent parity x residual-ring rotation: 2K
            # of them): set this binding's addresses, then enqueue on the current stream (under capture, the
            # capture stream; the addresses are baked in)
            for name, ptr in addresses:
                ctx.set_tensor_address(name, ptr)
            if not ctx.execute_async_v3(torch.cuda.current_stream(device).cuda_stream):
                raise RuntimeError(f"TensorRT execute_async_v3 failed on graph {graph!r}")

        if self.cuda_graphs:
            return CudaGraphCall(call, device, pool=self._pool)
        return call
