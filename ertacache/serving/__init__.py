"""Serving an export folder with NVIDIA Triton Inference Server (see docs/triton.md).

    write_repository(RepositoryConfig(engines, repo, ...))   repo/NAME/{config.pbtxt, 1/model.py, 1/engines/}
    ModelInstance        what one Triton model instance runs (runtime + text encoder + request checks)
    TritonServer         start/stop a real tritonserver on loopback (the nvidia-pytriton wheel's build)

The repository's model.py (ertacache/serving/triton_model.py) imports Triton's
``triton_python_backend_utils`` and is only importable inside Triton's Python backend.
"""

from ertacache.serving.instance import Job, ModelInstance, ModelParameters, RequestCancelled, RequestError
from ertacache.serving.repository import RepositoryConfig, RepositoryReport, write_repository
from ertacache.serving.server import ServerConfig, ServerError, TritonServer
from ertacache.serving.spec import ServedIO, TensorIO, expected_io

__all__ = ["Job", "ModelInstance", "ModelParameters", "RequestCancelled", "RequestError", "RepositoryConfig",
           "RepositoryReport", "write_repository", "ServerConfig", "ServerError", "TritonServer", "ServedIO",
           "TensorIO", "expected_io"]
