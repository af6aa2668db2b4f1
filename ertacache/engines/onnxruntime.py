"""ONNX Runtime backend: one session per graph, fed through IOBinding from the runtime's buffers.

    sessions = SessionsFromOnnx({"full_step": path, ...}, providers=["CPUExecutionProvider"])
    with OnnxRuntimeEngine(sessions) as engine:
        call = engine.bind("full_step", inputs, outputs)   # an IOBinding on the buffers' pointers
        call()                                             # session.run_with_iobinding: no copies

With IOBinding the outputs are written into the buffers the runtime allocated
once (same pointer every step) and inputs are read where they lie, on the CPU
or, with onnxruntime-gpu, on the GPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ertacache.engines.base import BoundCall, Engine
from ertacache.engines.errors import BackendNotInstalledError, EngineMismatchError
from ertacache.errors import brief

#: torch dtype -> numpy element type ORT's bind_input/bind_output accept
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.uint8: np.uint8,
          torch.bool: np.bool_}
#: providers that run on a CUDA device (and so read CUDA buffers)
CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendNotInstalledError("backend 'onnxruntime' needs onnxruntime, which is not installed here; "
                                       "pip install 'ertacache[onnx]' (onnxruntime-gpu for CUDA)") from None
    return onnxruntime


def check_providers(providers: Sequence[str]) -> list[str]:
    """Refuse providers this ONNX Runtime build lacks, naming the available ones and the GPU wheel."""
    ort = _ort()
    providers = list(providers) or ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise BackendNotInstalledError(
            f"ONNX Runtime here has no {', '.join(missing)} (available: {', '.join(available)}); "
            "CUDA/TensorRT providers need `pip install onnxruntime-gpu` (instead of onnxruntime) and a GPU, "
            "or pass --providers CPUExecutionProvider")
    return providers


def providers_device(providers: Sequence[str]) -> torch.device:
    """Where the buffers must live for these providers (the first one decides)."""
    return torch.device("cuda") if providers and providers[0] in CUDA_PROVIDERS else torch.device("cpu")


class SessionFromOnnxPath:
    """Loader: an ``onnxruntime.InferenceSession`` of one ``.onnx`` file with the given providers.

    ``intra_op_threads`` 0 lets ONNX Runtime choose (all cores). On CUDA providers the session
    computes on torch's current stream (``user_compute_stream``), so its work is ordered with the
    runtime's step-index copy without a host synchronisation.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int = 0, log_severity: int = 3):
        self.path = Path(path)
        self.providers = list(providers)
        self.intra_op_threads = intra_op_threads
        self.log_severity = log_severity

    def __call__(self):
        ort = _ort()
        options = ort.SessionOptions()
        options.log_severity_level = self.log_severity
        options.intra_op_num_threads = self.intra_op_threads
        # The runtime alternates between two sessions (full and cached step). With spinning on,
        # the idle session's pool keeps busy-waiting on the cores the other one needs (measured
        # here: ORT end-to-end at 0.64-0.76 of the ideal bound on 2 cores); off, threads sleep.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = []
        for name in self.providers:
            if name in CUDA_PROVIDERS and torch.cuda.is_available():
                stream = torch.cuda.current_stream().cuda_stream
                providers.append((name, {"user_compute_stream": str(stream), "has_user_compute_stream": "1"}
                                  if name == "CUDAExecutionProvider" else {"user_compute_stream": str(stream)}))
            else:
                providers.append(name)
        try:
            return ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/InvalidProtobuf/... for a bad file
            raise EngineMismatchError(f"ONNX Runtime cannot load {self.path} ({type(e).__name__}: "
                                      f"{brief(str(e), 200)}); re-export the folder with ertacache-export") from None


class OnnxRuntimeEngine(Engine):
    """The graphs of an export folder's ``onnx/`` as ONNX Runtime sessions (see the module docstring)."""

    backend = "onnxruntime"

    def __init__(self, paths: Mapping[str, str | os.PathLike], providers: Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int = 0):
        self.providers = check_providers(providers)
        super().__init__(providers_device(self.providers))
        self.loaders = {name: SessionFromOnnxPath(p, self.providers, intra_op_threads) for name, p in paths.items()}
        self.sessions: dict = {}
        self._run_options = None

    def _activate(self) -> None:
        ort = _ort()
        self.sessions = {name: load() for name, load in self.loaders.items()}
        self._run_options = ort.RunOptions()
        if self.device.type == "cuda":
            # no stream synchronisation at the end of each run: the next step is queued on the same stream
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def _deactivate(self) -> None:
        self.sessions = {}
        self._run_options = None

    def graphs(self) -> tuple[str, ...]:
        return tuple(self.loaders)

    def session(self, graph: str):
        self._require_active()
        return self.sessions[graph]

    def input_names(self, graph: str) -> tuple[str, ...]:
        return tuple(i.name for i in self.session(graph).get_inputs())

    def io_shapes(self, graph: str) -> dict[str, tuple]:
        """Name -> static shape of every input and output, as the ONNX file declares them."""
        sess = self.session(graph)
        return {v.name: tuple(v.shape) for v in [*sess.get_inputs(), *sess.get_outputs()]}

    def _bind_one(self, binding, name: str, t: torch.Tensor, output: bool) -> None:
        if not t.is_contiguous():
            raise ValueError(f"buffer {name!r} must be contiguous to be bound by pointer")
        device_type = "cuda" if t.device.type == "cuda" else "cpu"
        device_id = t.device.index or 0
        bind = binding.bind_output if output else binding.bind_input
        bind(name, device_type, device_id, _NUMPY[t.dtype], list(t.shape), t.data_ptr())

    def bind(self, graph: str, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> BoundCall:
        sess = self.session(graph)
        binding = sess.io_binding()
        declared = {v.name: tuple(v.shape) for v in [*sess.get_inputs(), *sess.get_outputs()]}
        for v in sess.get_inputs():  # bind by name; an input the graph dropped is simply not bound
            if v.name not in inputs:
                raise EngineMismatchError(f"ONNX graph {graph!r} needs input {v.name!r}, which the export folder's "
                                          f"contract does not have ({sorted(inputs)}); re-export the folder")
        for name, t in [*((n, inputs[n]) for n in (v.name for v in sess.get_inputs())), *outputs.items()]:
            if name not in declared:
                raise EngineMismatchError(f"ONNX graph {graph!r} has no tensor {name!r} (it has {sorted(declared)})")
            if tuple(declared[name]) != tuple(t.shape):
                raise EngineMismatchError(f"ONNX graph {graph!r}: {name} is {list(declared[name])} in the .onnx file "
                                          f"but {list(t.shape)} in the manifest; re-export the folder")
        for v in sess.get_inputs():
            self._bind_one(binding, v.name, inputs[v.name], output=False)
        for name, t in outputs.items():
            self._bind_one(binding, name, t, output=True)
        run, options = sess.run_with_iobinding, self._run_options

        def call() -> None:
            run(binding, options)

        call.binding = binding  # kept alive with the call; tests read the bound pointers
        return call
