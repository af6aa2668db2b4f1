"""Triton Python-backend model over an ertacache export folder.

ertacache-triton copies this file into a model repository as ``NAME/1/model.py``; it runs inside
Triton's Python-backend stub, one process per model instance, where
``triton_python_backend_utils`` exists. It is glue only: the runtime (both engines, the
K residual buffers and every other buffer, allocated once per instance), the text encoder and
the request checks live in :class:`ertacache.serving.instance.ModelInstance`, so ertacache must
be installed in the Python environment the stub runs (see docs/triton.md).

Per request:
- bad input (missing or extra input, wrong data type or shape, empty prompt, NaN guidance, a
  seed out of range) -> an INVALID_ARG error response for that request only;
- a cancelled request (client cancel or disconnect, checked after every denoising step) -> the
  loop stops, a CANCELLED error response, nothing of the request is kept;
- decoupled mode -> one progress response per step (output ``step``: steps done so far), then
  the final response with the outputs, flagged TRITONSERVER_RESPONSE_COMPLETE_FINAL.
A folder that does not load (missing or tampered file, other machine) fails ``initialize`` with
a TritonModelException naming the file; Triton logs it and keeps its other models.
"""

import json
import os
import site
import traceback


def _read_pythonpath_pth_files() -> None:
    """Run the .pth files of PYTHONPATH entries.

    The stub embeds the base interpreter, so a virtual environment reaches it only through
    PYTHONPATH; Python puts those entries on sys.path without reading their .pth files, and an
    editable install (pip install -e) is such a file. A no-op where ertacache is installed
    normally (the official Triton container).
    """
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and os.path.isdir(entry) and any(n.endswith(".pth") for n in os.listdir(entry)):
            site.addsitedir(entry)


_read_pythonpath_pth_files()

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

# ertacache (and with it torch) is imported in initialize, not here: Triton first runs this file
# in a short-lived stub for auto_complete_config, which then costs no torch import.
STEP = "step"  # ertacache.serving.spec.STEP


def _error(message: str, code) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    """One instance of the served model (Triton creates one per instance_group count)."""

    def initialize(self, args):
        from ertacache.errors import ErtaCacheError
        from ertacache.serving.instance import ModelInstance

        self.name = args["model_name"]
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.instance = ModelInstance(version_dir, config, kind=args.get("model_instance_kind", "CPU"),
                                      device_id=int(args.get("model_instance_device_id", 0) or 0))
        try:
            self.instance.__enter__()
        except ErtaCacheError as e:
            raise pb_utils.TritonModelException(f"ertacache model {self.name!r} failed to load: {e}") from None
        m = self.instance.manifest
        pb_utils.Logger.log_info(
            f"ertacache model {self.name!r} ({args.get('model_instance_name', '?')}): export folder of "
            f"{m['model']['id']}, {self.instance.steps} steps ({sum(m['profile']['mask'])} full), backend "
            f"{self.instance.params.backend}, {self.instance.threads()} intra-op threads, "
            f"{'decoupled' if self.decoupled else 'one response per request'}")

    def finalize(self):
        self.instance.__exit__(None, None, None)

    # ---- requests --------------------------------------------------------------------------------------------

    def _inputs(self, request) -> dict:
        out = {}
        for spec in self.instance.io.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is not None:
                out[spec.name] = tensor.as_numpy()
        return out

    def _run(self, request, on_step) -> "pb_utils.InferenceResponse":
        """The response for one request: its outputs, or an error for it alone."""
        from ertacache.errors import UserError
        from ertacache.serving.instance import RequestCancelled

        try:
            outputs = self.instance.handle(self._inputs(request), request.requested_output_names() or None, on_step)
        except UserError as e:
            return _error(str(e), pb_utils.TritonError.INVALID_ARG)
        except RequestCancelled as e:
            pb_utils.Logger.log_info(f"ertacache model {self.name!r}: {e}; its state is released")
            return _error(str(e), pb_utils.TritonError.CANCELLED)
        except Exception as e:  # a bug or a numerical failure: this request fails, the instance keeps serving
            pb_utils.Logger.log_error(f"ertacache model {self.name!r}: {traceback.format_exc()}")
            return _error(f"internal error in model {self.name!r}: {e}", pb_utils.TritonError.INTERNAL)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, a) for n, a in outputs.items()])

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                self._stream(request)
            return None
        return [self._run(request, lambda done, r=request: not r.is_cancelled()) for request in requests]

    def _stream(self, request) -> None:
        """Decoupled: a progress response after every step, then the final one (always sent, as Triton requires)."""
        sender = request.get_response_sender()

        def progress(done: int) -> bool:
            if sender.is_cancelled():
                return False
            sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(STEP, np.array([done], np.int64))]))
            return True

        sender.send(self._run(request, progress), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
