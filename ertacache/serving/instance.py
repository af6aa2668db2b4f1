"""One Triton model instance, without Triton: the runtime, the text encoder and the request loop.

The repository's ``model.py`` (:mod:`ertacache.serving.triton_model`) is glue between Triton's
Python backend and this module, so everything here is plain Python and NumPy that tests can
drive without a server:

    instance = ModelInstance(version_dir, model_config, kind="CPU")
    with instance:                                    # opens the runtime: both engines, every buffer
        outputs = instance.handle({"seed": np.array([3]), "prompt": np.array([b"a cat"], object)},
                                  on_step=lambda done: True)   # False stops (cancelled request)

State per instance (allocated once, reused by every request): the runtime's two latent
buffers, the K residual buffers of the last full steps (K = 1 for reuse; the runtime's ring),
text embeddings, step indices and frames
(:class:`ertacache.runtime.RuntimeState`). State per request: the parsed inputs and the output
copies; nothing of a request outlives :meth:`ModelInstance.handle`, cancelled or not.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import numpy as np
import torch

from ertacache.engines.base import BACKENDS
from ertacache.contract import ExportManifest
from ertacache.errors import ErtaCacheError, UserError, brief
from ertacache.limits import MAX_PROMPT_CHARS, MAX_SEED
from ertacache.serving.spec import (FRAMES, GUIDANCE, GUIDANCE_2, IMAGE, LATENTS, PROMPT, SEED, TEXT_EMBEDS, ServedIO,
                                    check_model_config, conditioning_names)



class RequestError(UserError):
    """Bad input in one request: that request gets an INVALID_ARG error, the server keeps serving."""


class RequestCancelled(ErtaCacheError):
    """The client cancelled the request or went away; the loop stopped after the step named."""


def _flag(value: str, key: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise UserError(f"config.pbtxt parameter {key!r} is {value!r}; give true or false")


@dataclass(frozen=True)
class ModelParameters:
    """The ``parameters`` of config.pbtxt that an operator tunes (strings in the file).

    engines: the export folder, relative to the version folder (``1/engines``).
    backend: which engines of the folder run (``ertacache-run --backend``).
    providers: ONNX Runtime execution providers in order (empty: CPU, or the backend's default).
    intra_op_threads: ONNX Runtime threads per session; 0 divides the cores by the model's CPU
        instances (each instance is its own process and would otherwise use every core).
    verify_files: check every file's sha256 when the instance loads (seconds per GB); a
        tampered or truncated file then fails the load, naming it.
    text_encoder: folder of the bundled text encoder, relative to the version folder ("" none).
    text_encoder_family: how to load it (a model family name, :func:`ertacache.models.family.family_named`).
    digest: the export folder's digest when the model was written (``sha256:...`` of its
        manifest.json); the instance refuses a folder that has been swapped or rebuilt since.
    """

    engines: str = "engines"
    backend: str = "onnxruntime"
    providers: tuple[str, ...] = ()
    intra_op_threads: int = 0
    verify_files: bool = True
    text_encoder: str = ""
    text_encoder_family: str = ""
    digest: str = ""

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise UserError(f"config.pbtxt parameter 'backend' is {self.backend!r}; give one of {list(BACKENDS)}")
        if self.intra_op_threads < 0:
            raise UserError(f"config.pbtxt parameter 'intra_op_threads' is {self.intra_op_threads}; give 0 (cores / "
                            "instances) or a positive number")
        if self.text_encoder and not self.text_encoder_family:
            raise UserError("config.pbtxt names a text_encoder folder but no text_encoder_family; regenerate the "
                            "model with ertacache-triton")

    @classmethod
    def from_config(cls, parameters: Mapping[str, Any]) -> "ModelParameters":
        """From Triton's JSON model configuration: ``{"key": {"string_value": "..."}}``."""
        raw = {k: (v.get("string_value", "") if isinstance(v, Mapping) else str(v)) for k, v in parameters.items()}
        try:
            threads = int(raw.get("intra_op_threads", "0") or 0)
        except ValueError:
            raise UserError(f"config.pbtxt parameter 'intra_op_threads' is {raw['intra_op_threads']!r}; give an "
                            "integer") from None
        return cls(engines=raw.get("engines", "engines"), backend=raw.get("backend", "onnxruntime"),
                   providers=tuple(p for p in raw.get("providers", "").split(",") if p),
                   intra_op_threads=threads, verify_files=_flag(raw.get("verify_files", "true"), "verify_files"),
                   text_encoder=raw.get("text_encoder", ""), text_encoder_family=raw.get("text_encoder_family", ""),
                   digest=raw.get("digest", ""))

    def to_strings(self) -> dict[str, str]:
        return {"engines": self.engines, "backend": self.backend, "providers": ",".join(self.providers),
                "intra_op_threads": str(self.intra_op_threads), "verify_files": str(self.verify_files).lower(),
                "text_encoder": self.text_encoder, "text_encoder_family": self.text_encoder_family,
                "digest": self.digest}


@dataclass
class Job:
    """One generation: the folder's batch for one seed and one text."""

    seed: int
    prompt: str | None = None
    text_embeds: np.ndarray | dict[str, np.ndarray] | None = None  # (nb*B, L, D_text), or one per input
    guidance: float | None = None
    guidance_2: float | None = None  # a two-expert folder's second CFG scale (None: as guidance, else the profile's)
    image: np.ndarray | None = None  # (H, W, 3) uint8: an image-to-video model's conditioning image


# ---- request parsing ------------------------------------------------------------------------------------------

def _rows(inputs: Mapping[str, np.ndarray], batched: bool) -> int:
    """Rows of a request: Triton's batch dim when batching, else one (arrays get a leading axis)."""
    if not batched:
        return 1
    sizes = {name: a.shape[0] if a.ndim else 0 for name, a in inputs.items()}
    if len(set(sizes.values())) != 1:
        raise RequestError(f"inputs have different batch sizes {sizes}; give every input the same number of rows")
    return next(iter(sizes.values()))


def _check_shape(name: str, arr: np.ndarray, dims: tuple[int, ...]) -> None:
    if tuple(arr.shape) != dims:
        raise RequestError(f"input {name!r} has shape {list(arr.shape)}, this model takes {list(dims)}")


def _seed(arr: np.ndarray, batch: int) -> int:
    if arr.dtype.kind not in "iu":
        raise RequestError(f"input 'seed' has data type {arr.dtype}, give an integer (INT64)")
    seed = int(arr.reshape(-1)[0])
    top = MAX_SEED - (batch - 1)
    if not 0 <= seed <= top:
        raise RequestError(f"seed {seed} is out of range: give an integer in [0, {top}] (sample k of the folder's "
                           f"batch of {batch} uses seed + k)")
    return seed


def _prompt(arr: np.ndarray) -> str:
    value = arr.reshape(-1)[0]
    if isinstance(value, (bytes, np.bytes_)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("input 'prompt' is not UTF-8 text") from None
    if not isinstance(value, str):
        raise RequestError(f"input 'prompt' must be text (BYTES/TYPE_STRING), got {type(value).__name__}")
    if not value.strip():
        raise RequestError("empty prompt: give a non-empty prompt")
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(f"prompt is {len(value)} characters long; give at most {MAX_PROMPT_CHARS}")
    return value


def _text_embeds(arr: np.ndarray, dims: tuple[int, ...], name: str = TEXT_EMBEDS) -> np.ndarray:
    if arr.dtype.kind != "f":
        raise RequestError(f"input {name!r} has data type {arr.dtype}, give floating point embeddings")
    _check_shape(name, arr, dims)
    if not np.isfinite(arr).all():
        raise RequestError(f"input {name!r} contains NaN or Inf; check the text encoder that produced it")
    return arr


def _guidance(arr: np.ndarray, default: float, name: str = GUIDANCE) -> float:
    if arr.dtype.kind != "f":
        raise RequestError(f"input {name!r} has data type {arr.dtype}, give a float (FP32)")
    value = float(arr.reshape(-1)[0])
    if not math.isfinite(value) or value < 0:
        raise RequestError(f"{name} is {value}; give a finite number >= 0 (this model's default is "
                           f"{default}), as ertacache-run and ertacache-generate require")
    return value


#: a request image larger than this many pixels is refused (it is resized to the video size anyway)
MAX_IMAGE_PIXELS = 16_000_000


def _image(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise RequestError(f"input 'image' must be UINT8 [H, W, 3] (RGB), got {arr.dtype} {list(arr.shape)}")
    if arr.shape[0] < 1 or arr.shape[1] < 1 or arr.shape[0] * arr.shape[1] > MAX_IMAGE_PIXELS:
        raise RequestError(f"input 'image' is {arr.shape[0]} x {arr.shape[1]} pixels; give 1 to "
                           f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels")
    return np.ascontiguousarray(arr)


def parse_request(inputs: Mapping[str, np.ndarray], io: ServedIO, batch: int, batched: bool,
                  default_guidance: float | tuple[float, ...]) -> list[Job]:
    """The jobs of one request (one, or one per row when Triton batches), every input checked.

    Triton checks declared data types and shapes before a request reaches the model; these
    checks repeat them (a model driven some other way gets the same answers) and add what only
    the model knows: the seed range, a non-empty prompt, finite numbers, one text source.
    """
    unknown = sorted(set(inputs) - {t.name for t in io.inputs})
    if unknown:
        raise RequestError(f"unknown input(s) {brief(unknown, 120)}; this model takes {[t.name for t in io.inputs]}")
    if SEED not in inputs:
        raise RequestError("missing input 'seed' (INT64 [1])")
    conds = conditioning_names(io)
    given = [n for n in conds if n in inputs]
    tensors = " and ".join(f"'{n}'" for n in conds)  # Wan: 'text_embeds'; FLUX: 'prompt_embeds' and 'pooled_...'
    if PROMPT in inputs and given:
        raise RequestError(f"give either 'prompt' or {tensors}, not both")
    if io.input(IMAGE) is not None and (IMAGE in inputs) != (PROMPT in inputs):
        raise RequestError("this image-to-video model takes 'image' (UINT8 [H, W, 3]) together with 'prompt'"
                           if PROMPT in inputs else f"input 'image' goes with 'prompt'; with {tensors} the image is "
                           "already encoded (image_embeds, image_latents)")
    if PROMPT not in inputs and len(given) != len(conds):
        missing = [n for n in conds if n not in inputs]
        if io.input(PROMPT):
            raise RequestError(f"missing input: give 'prompt' (text) or {tensors}" +
                               (f" (missing {missing})" if given else ""))
        if conds == (TEXT_EMBEDS,):
            raise RequestError("missing input 'text_embeds' (this model has no text encoder: encode the prompt "
                               "yourself)")
        raise RequestError(f"missing input(s) {missing}: this model takes {tensors} "
                           "(no text encoder is bundled: encode the prompt yourself)")
    arrays = {k: np.asarray(v) if batched else np.asarray(v)[None] for k, v in inputs.items()}
    return [_job({k: a[r] for k, a in arrays.items()}, io, batch, default_guidance)
            for r in range(_rows(arrays, batched))]


def _job(row: Mapping[str, np.ndarray], io: ServedIO, batch: int, default_guidance: float | tuple[float, ...]) -> Job:
    """One row of a request (the whole request without Triton batching) as a checked job.

    ``default_guidance``: the profile's scale, or one per expert (named in the refusal of a bad value).
    """
    defaults = tuple(default_guidance) if isinstance(default_guidance, (tuple, list)) else (default_guidance,)
    for name in (SEED, PROMPT, GUIDANCE, GUIDANCE_2):
        if name in row and row[name].size != 1:
            raise RequestError(f"input {name!r} has shape {list(row[name].shape)}, this model takes [1]")
    job = Job(_seed(row[SEED], batch))
    conds = conditioning_names(io)
    if PROMPT in row:
        job.prompt = _prompt(row[PROMPT])
        if IMAGE in row:
            job.image = _image(row[IMAGE])
    elif conds == (TEXT_EMBEDS,):
        job.text_embeds = _text_embeds(row[TEXT_EMBEDS], io.input(TEXT_EMBEDS).dims)
    else:
        job.text_embeds = {n: _text_embeds(row[n], io.input(n).dims, n) for n in conds}
    if GUIDANCE in row:
        job.guidance = _guidance(row[GUIDANCE], defaults[0])
    if GUIDANCE_2 in row:
        job.guidance_2 = _guidance(row[GUIDANCE_2], defaults[-1], GUIDANCE_2)
    return job


# ---- the instance ---------------------------------------------------------------------------------------------

def cpu_instances(config: Mapping[str, Any]) -> int:
    """CPU instances of this model in its instance_group (each is a process of its own)."""
    groups = config.get("instance_group") or [{"count": 1, "kind": "KIND_CPU"}]
    return max(1, sum(int(g.get("count", 1)) for g in groups if g.get("kind", "KIND_CPU") == "KIND_CPU"))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class ModelInstance:
    """The runtime and text encoder of one Triton model instance (see the module docstring)."""

    version_dir: Path
    config: Mapping[str, Any]  # Triton's model configuration (JSON of config.pbtxt, completed)
    kind: str = "CPU"  # args["model_instance_kind"]: CPU or GPU
    device_id: int = 0
    params: ModelParameters = field(init=False)
    runtime: Any = field(init=False, default=None)
    io: ServedIO | None = field(init=False, default=None)
    encoder: Any = field(init=False, default=None)
    image_encoder: Any = field(init=False, default=None)  # an image-to-video model's image path

    def __post_init__(self):
        self.version_dir = Path(self.version_dir)
        self.params = ModelParameters.from_config(self.config.get("parameters", {}))
        self.batched = int(self.config.get("max_batch_size", 0)) > 0
        policy = self.config.get("model_transaction_policy") or {}
        self.decoupled = bool(policy.get("decoupled", False))

    # ---- lifetime --------------------------------------------------------------------------------------------

    def _device(self) -> torch.device | None:
        if self.kind.upper() != "GPU":
            return None  # the backend's default (CPU for ONNX Runtime's CPU provider)
        torch.cuda.set_device(self.device_id)  # ONNX Runtime's CUDA provider computes on the current device
        return torch.device("cuda", self.device_id)

    def threads(self) -> int:
        if self.params.intra_op_threads:
            return self.params.intra_op_threads
        return max(1, available_cores() // cpu_instances(self.config))

    def __enter__(self) -> "ModelInstance":
        from ertacache.runtime import Runtime

        folder = self.version_dir / self.params.engines
        if not folder.is_dir():
            raise UserError(f"export folder {folder} is missing; the model's version folder must hold the export "
                            "folder (ertacache-triton copies it there)")
        rt = Runtime(folder, self.params.backend, device=self._device(), providers=self.params.providers or None,
                     verify_files=self.params.verify_files, intra_op_threads=self.threads(),
                     expect_digest=self.params.digest or None)
        rt.__enter__()
        try:
            self.io = check_model_config(self.config, rt.manifest, self.decoupled)
            if self.io.input(PROMPT) is not None:
                self.encoder = self._load_encoder(rt.manifest)
            if self.io.input(IMAGE) is not None:
                self.image_encoder = self._family().image_encoder(self.version_dir / self.params.text_encoder,
                                                                  rt.manifest.torch_dtype)
        except BaseException:
            rt.__exit__(None, None, None)
            raise
        self.runtime = rt
        return self

    def _load_encoder(self, manifest):
        from ertacache.models.family import is_known_family, known_families

        if not self.params.text_encoder:
            raise UserError("config.pbtxt declares a 'prompt' input but names no text_encoder folder; remove the "
                            "input or regenerate the model with ertacache-triton")
        path = self.version_dir / self.params.text_encoder
        if not path.is_dir():
            raise UserError(f"text encoder folder {path} is missing; regenerate the model with ertacache-triton")
        if not is_known_family(self.params.text_encoder_family):
            raise UserError(f"config.pbtxt parameter 'text_encoder_family' is {self.params.text_encoder_family!r}; "
                            f"give one of {known_families()}")
        return self._family().prompt_encoder(path, manifest.torch_dtype)

    def _family(self):
        from ertacache.models.family import family_named

        return family_named(self.params.text_encoder_family)

    def __exit__(self, *exc) -> None:
        if self.runtime is not None:
            self.runtime.__exit__(*exc)
        self.runtime, self.encoder, self.image_encoder = None, None, None

    # ---- requests --------------------------------------------------------------------------------------------

    @property
    def manifest(self) -> ExportManifest:
        return self.runtime.manifest

    @property
    def steps(self) -> int:
        return self.runtime.steps

    def parse(self, inputs: Mapping[str, np.ndarray]) -> list[Job]:
        m = self.manifest
        return parse_request(inputs, self.io, m.shapes.batch_size, self.batched, m.schedule.guidance_scales)

    def _text(self, job: Job):
        from ertacache.runtime.inputs import encode_prompt

        if isinstance(job.text_embeds, dict):  # one tensor per conditioning input
            return {n: torch.from_numpy(np.ascontiguousarray(a)).to(self.manifest.torch_dtype)
                    for n, a in job.text_embeds.items()}
        if job.prompt is None:
            return torch.from_numpy(np.ascontiguousarray(job.text_embeds)).to(self.manifest.torch_dtype)
        try:
            if self.image_encoder is not None:
                return encode_prompt(self.encoder, job.prompt, self.manifest, [job.image], self.image_encoder,
                                     self._family())
            return encode_prompt(self.encoder, job.prompt, self.manifest)
        except (UserError, ValueError) as e:  # e.g. the testbed encoder refuses unknown words (capped echo)
            raise RequestError(f"prompt cannot be encoded: {brief(str(e), 300)}") from None

    def run(self, job: Job, want: Collection[str], on_step: Callable[[int], bool] | None = None,
            done_before: int = 0) -> dict[str, np.ndarray]:
        """One job through the whole schedule; outputs are copies (the buffers belong to the next request)."""
        from ertacache.runtime.inputs import noise_for

        rt = self.runtime
        # load_inputs copies the text (one tensor or one per input) into the runtime's device buffers
        rt.load_inputs(noise_for(self.manifest, job.seed).to(rt.device), self._text(job), job.guidance,
                       job.guidance_2)
        plan = rt.plan()
        step_cb = None if on_step is None else (lambda i: on_step(done_before + i + 1))
        ran = rt.run_plan(plan, step_cb)
        if ran < len(plan):
            raise RequestCancelled(f"request cancelled after step {done_before + ran} of {done_before + len(plan)}")
        rt.check_result()
        out = {}
        if FRAMES in want:
            out[FRAMES] = rt.decode().cpu().numpy().copy()
        if LATENTS in want:
            out[LATENTS] = rt.state.final.cpu().numpy().copy()
        return out

    def handle(self, inputs: Mapping[str, np.ndarray], want: Collection[str] | None = None,
               on_step: Callable[[int], bool] | None = None) -> dict[str, np.ndarray]:
        """Parse, run every job, assemble the outputs ``want`` (default: all declared but ``step``).

        ``on_step(done)`` gets the steps done so far for this request; False stops the loop and
        raises :class:`RequestCancelled`.
        """
        if self.runtime is None:
            raise RuntimeError("the model instance is not open; use it inside `with instance:`")
        declared = [t.name for t in self.io.outputs if t.name in (FRAMES, LATENTS)]
        want = [n for n in (declared if want is None else want) if n in declared]
        jobs = self.parse(inputs)
        results = [self.run(job, want, on_step, k * self.steps) for k, job in enumerate(jobs)]
        if not self.batched:
            return results[0]
        return {name: np.stack([r[name][0] for r in results]) for name in want}  # rows of batch-1 folders
