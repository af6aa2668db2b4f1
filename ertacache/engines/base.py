"""What every backend offers the runtime: load, bind buffers, run.

An :class:`Engine` holds the compiled graphs of one backend. It is a context
manager (STYLE.md #6): ``activate`` loads sessions / packages / engines and
``deactivate`` frees them; binding or running while inactive is an error.

The one operation the runtime needs is :meth:`Engine.bind`:

    call = engine.bind("cached_step", inputs={name: tensor}, outputs={name: tensor})
    call()   # reads the input tensors, writes the output tensors in place

The tensors are the runtime's buffers, allocated once. ``bind`` does all the
per-graph work up front (an ONNX Runtime IOBinding, TensorRT tensor addresses,
a captured CUDA graph), so the returned zero-argument call is all the
denoising loop executes. Whether a call allocates is the backend's nature:
ONNX Runtime and TensorRT write into the bound buffers; AOTInductor and
torch.compile return fresh outputs that the call copies into the buffers
(on CUDA the copy is captured into a CUDA graph with the run, so a replay
allocates nothing). ``tools/bench_engines.py`` measures it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ertacache.engines.errors import BackendNotInstalledError, EngineInactiveError, UnknownBackendError

BoundCall = Callable[[], None]


@dataclass(frozen=True)
class BackendInfo:
    """How to tell whether a backend can run here and what to install when it cannot."""

    name: str
    modules: tuple[str, ...]  # Python modules it imports
    extra: str | None  # the pip extra of this distribution that installs them
    needs_cuda: bool = False
    needs_target: str | None = None  # the export target (folder) it runs: onnx, aoti, tensorrt; None: the model
    note: str = ""


#: the backends of ``ertacache-run --backend``; model knowledge stays out of here
BACKENDS: dict[str, BackendInfo] = {
    "onnxruntime": BackendInfo("onnxruntime", ("onnxruntime",), "onnx", needs_target="onnx",
                               note="CPU here; CUDA and TensorRT execution providers with onnxruntime-gpu"),
    "tensorrt": BackendInfo("tensorrt", ("tensorrt", "polygraphy"), "tensorrt", needs_cuda=True,
                            needs_target="tensorrt",
                            note="engines built on the target machine with ertacache-build --targets tensorrt"),
    "aoti": BackendInfo("aoti", ("torch._inductor",), None, needs_target="aoti",
                        note="AOTInductor .pt2 packages, tied to the torch build and device they were compiled for"),
    "torch": BackendInfo("torch", ("torch",), None, needs_target=None,
                         note="torch.compile of the step modules; loads the model named in the manifest"),
}


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def backend_info(name: str) -> BackendInfo:
    """The backend called ``name``; refuses unknown names with the valid ones."""
    if name not in BACKENDS:
        raise UnknownBackendError(f"unknown backend {name!r}; --backend takes one of {list(BACKENDS)}")
    return BACKENDS[name]


def require_backend(name: str) -> BackendInfo:
    """``backend_info`` plus a check that its packages (and a CUDA GPU, where needed) are present."""
    info = backend_info(name)
    missing = [m for m in info.modules if not _module_present(m)]
    if missing:
        fix = f"pip install 'ertacache[{info.extra}]'" if info.extra else f"pip install {' '.join(missing)}"
        if name == "tensorrt":
            fix += (" on a machine with an NVIDIA GPU (on Jetson, JetPack ships TensorRT: use its Python bindings); "
                    "or run this folder with --backend onnxruntime")
        raise BackendNotInstalledError(f"backend {name!r} needs {', '.join(missing)}, which is not installed here; "
                                       f"{fix}")
    if info.needs_cuda and not torch.cuda.is_available():
        raise BackendNotInstalledError(f"backend {name!r} needs a CUDA GPU and torch sees none here; run this folder "
                                       "with --backend onnxruntime (CPU) or on a GPU machine")
    return info


class Engine:
    """Base of the backends: activation as a context manager and the ``bind`` contract."""

    backend: str = "?"

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._active = False

    # ---- lifetime --------------------------------------------------------------------------------

    def activate(self) -> "Engine":
        if not self._active:
            self._activate()
            self._active = True
        return self

    def deactivate(self) -> None:
        if self._active:
            self._active = False
            self._deactivate()

    def __enter__(self) -> "Engine":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    @property
    def active(self) -> bool:
        return self._active

    def _require_active(self) -> None:
        if not self._active:
            raise EngineInactiveError(f"{type(self).__name__} is not active; use it inside `with engine:` "
                                      "or call engine.activate() first")

    def _activate(self) -> None:  # load sessions / packages / engines
        raise NotImplementedError

    def _deactivate(self) -> None:  # free them
        raise NotImplementedError

    # ---- the contract ----------------------------------------------------------------------------

    def graphs(self) -> tuple[str, ...]:
        """Names of the graphs this engine holds."""
        raise NotImplementedError

    def input_names(self, graph: str) -> tuple[str, ...]:
        """Inputs the graph actually consumes (TensorRT's parser may drop an unused one)."""
        raise NotImplementedError

    def bind(self, graph: str, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> BoundCall:
        """A zero-argument call that runs ``graph`` from ``inputs`` into ``outputs`` (see module docstring)."""
        raise NotImplementedError


def copy_outputs_call(fn: Callable, args: tuple[torch.Tensor, ...], outputs: tuple[torch.Tensor, ...]) -> BoundCall:
    """For backends that return fresh tensors (AOTInductor, torch.compile): run, then copy into the buffers.

    ``fn(*args)`` returns one tensor or a sequence of them in the contract's output order; the
    caller checks the count when it binds (it knows the graph's signature).
    """
    if len(outputs) == 1:
        (dst,) = outputs

        def call() -> None:
            out = fn(*args)
            dst.copy_(out if isinstance(out, torch.Tensor) else out[0])
    else:
        def call() -> None:
            for d, s in zip(outputs, fn(*args)):
                d.copy_(s)
    return call
