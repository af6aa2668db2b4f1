"""Engine backends for the exported step graphs, behind one small interface (load, bind buffers, run).

    BACKENDS               onnxruntime, tensorrt, aoti, torch: what each needs and its pip extra
    require_backend        refuse a backend that is unknown or not installed here
    OnnxRuntimeEngine      onnx/<graph>.onnx through ONNX Runtime sessions and IOBinding
    AotiEngine             aoti/<graph>.pt2 through torch._inductor.aoti_load_package
    TorchCompileEngine     the step modules through torch.compile(fullgraph=True)
    TensorRTEngine         tensorrt/<graph>.trt<ver>.sm<cc>.engine (built by build_engines / ertacache-build)

Each module holds small loaders (``SessionFromOnnxPath``, ``AotiModelFromPackage``,
``StepModulesFromManifest``, ``EngineFromOnnxPath``) that do one job when called.
See docs/engines.md.
"""

from ertacache.engines.base import BACKENDS, BackendInfo, Engine, backend_info, require_backend
from ertacache.engines.errors import (
    BackendNotInstalledError,
    EngineInactiveError,
    EngineMismatchError,
    UnknownBackendError,
)

__all__ = [
    "BACKENDS", "BackendInfo", "Engine", "backend_info", "require_backend", "BackendNotInstalledError",
    "EngineInactiveError", "EngineMismatchError", "UnknownBackendError",
]
