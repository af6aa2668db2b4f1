"""What a served model takes and returns, derived from an export folder's manifest.

One function, :func:`expected_io`, says which tensors a Triton model over a folder has; the
repository writer renders them into ``config.pbtxt`` and the model checks, when it loads, that
the configuration it was given still matches its folder (an operator may edit the file).

Inputs (Triton names; ``B`` the folder's static batch, ``nb`` 2 with classifier-free guidance):

    prompt          TYPE_STRING [1]             when the text encoder is in the repository
    image           TYPE_UINT8  [H, W, 3]       with the prompt, for an image-to-video model (any size, RGB;
                                                its image encoder is in the repository too)
    text_embeds     TYPE_FP32   [nb*B, L, D]    precomputed embeddings: cond rows, then uncond rows
                                                (a family with several conditioning tensors has one
                                                input per tensor instead, each required: FLUX's
                                                prompt_embeds [B, L, D_t5], pooled_prompt_embeds [B, D_clip])
    seed            TYPE_INT64  [1]             noise seed; sample k of the batch uses seed + k
    guidance_scale  TYPE_FP32   [1]             optional, only with CFG (default: the profile's)
    guidance_scale_2 TYPE_FP32  [1]             optional, only for a two-expert folder (Wan2.2 A14B) with
                                                CFG: the second expert's scale (default: the profile's; a
                                                guidance_scale given alone sets both, as in WanPipeline)

Exactly one of ``prompt`` / ``text_embeds`` per request (both are optional where both exist).
:func:`conditioning_names` lists a model's conditioning inputs from its declared inputs.
Outputs: ``frames`` (TYPE_UINT8, (B, F, H, W, 3)) when the folder has a ``vae_decode`` graph,
``latents`` (TYPE_FP32, (B, C, F', H', W')) as an option (always without a decoder), and, in
decoupled mode, ``step`` (TYPE_INT64 [1]): the denoising steps done so far, one progress
response per step before the final response.

With ``max_batch_size`` > 0 (Triton batches requests; the folder must have batch 1) every
dimension above loses its leading batch of one and Triton adds the request's rows in front.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ertacache.contract import FULL_STEP, VAE_DECODE, ExportManifest
from ertacache.errors import UserError
from ertacache.models.recipes import takes_images

PROMPT, TEXT_EMBEDS, SEED, GUIDANCE = "prompt", "text_embeds", "seed", "guidance_scale"
#: a two-expert folder's second CFG scale (WanPipeline's argument name)
GUIDANCE_2 = "guidance_scale_2"
#: an image-to-video model's conditioning image (H, W, 3) uint8, sent with the prompt (any size: it is resized)
IMAGE = "image"
FRAMES, LATENTS, STEP = "frames", "latents", "step"

#: manifest dtype names -> Triton data types
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "uint8": "TYPE_UINT8",
                "int64": "TYPE_INT64", "string": "TYPE_STRING"}


@dataclass(frozen=True)
class TensorIO:
    """One input or output of the Triton model: name, Triton data type, dims (without Triton's batch dim)."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True)
class ServedIO:
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]

    def input(self, name: str) -> TensorIO | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorIO | None:
        return next((t for t in self.outputs if t.name == name), None)


def has_decoder(manifest: ExportManifest) -> bool:
    return manifest.has_decode


def check_batching(manifest: ExportManifest, max_batch_size: int) -> None:
    """Triton batching feeds rows one at a time to a folder of batch 1; anything else is refused."""
    batch = manifest.shapes.batch_size
    if max_batch_size < 0:
        raise UserError(f"max_batch_size is {max_batch_size}; give 0 (no Triton batching) or a positive number")
    if max_batch_size > 0 and batch != 1:
        raise UserError(f"max_batch_size {max_batch_size} needs an export folder of batch size 1 (Triton batches "
                        f"requests into rows, the runtime runs one row at a time), this folder has batch size "
                        f"{batch}; re-export with --batch-size 1, or use max_batch_size 0 (one request = the "
                        f"folder's batch of {batch})")


def expected_io(manifest: ExportManifest, prompt: bool, latents: bool, max_batch_size: int,
                decoupled: bool) -> ServedIO:
    """The model's inputs and outputs for this folder and these options (see the module docstring)."""
    check_batching(manifest, max_batch_size)
    conditioning = tuple(manifest.conditioning)
    row = 1 if max_batch_size > 0 else 0  # Triton adds the batch dim itself: drop the folder's batch of 1
    lat = manifest.spec(FULL_STEP, "latents")
    inputs = []
    if prompt:
        inputs.append(TensorIO(PROMPT, "TYPE_STRING", (1,), optional=True))
        if takes_images(manifest.model.id):
            inputs.append(TensorIO(IMAGE, "TYPE_UINT8", (-1, -1, 3), optional=True))
    for name in conditioning:  # Wan: text_embeds; FLUX: prompt_embeds, pooled_prompt_embeds
        spec = manifest.spec(FULL_STEP, name)
        inputs.append(TensorIO(name, TRITON_TYPES[spec.dtype], spec.shape, optional=prompt))
    inputs.append(TensorIO(SEED, "TYPE_INT64", (1,)))
    if manifest.schedule.n_branches == 2:
        inputs.append(TensorIO(GUIDANCE, "TYPE_FP32", (1,), optional=True))
        if manifest.schedule.expert_count > 1:
            inputs.append(TensorIO(GUIDANCE_2, "TYPE_FP32", (1,), optional=True))
    outputs = []
    if has_decoder(manifest):
        frames = manifest.spec(VAE_DECODE, "frames")
        outputs.append(TensorIO(FRAMES, TRITON_TYPES[frames.dtype], frames.shape[row:]))
    if latents or not has_decoder(manifest):
        outputs.append(TensorIO(LATENTS, TRITON_TYPES[lat.dtype], lat.shape[row:]))
    if decoupled:
        outputs.append(TensorIO(STEP, "TYPE_INT64", (1,)))
    return ServedIO(tuple(inputs), tuple(outputs))


def conditioning_names(io: ServedIO) -> tuple[str, ...]:
    """The model's conditioning inputs (every input but the prompt, its image, the seed and the guidance scales)."""
    return tuple(t.name for t in io.inputs if t.name not in (PROMPT, IMAGE, SEED, GUIDANCE, GUIDANCE_2))


def io_from_model_config(config: Mapping[str, Any]) -> ServedIO:
    """The inputs/outputs a Triton model configuration (``args["model_config"]``, JSON) declares."""
    def tensors(key):
        return tuple(TensorIO(t["name"], t["data_type"], tuple(int(d) for d in t.get("dims", ())),
                              bool(t.get("optional", False))) for t in config.get(key, ()))
    return ServedIO(tensors("input"), tensors("output"))


def check_model_config(config: Mapping[str, Any], manifest: ExportManifest, decoupled: bool) -> ServedIO:
    """The configuration Triton loaded must describe this folder; returns what it declares.

    An operator may remove the optional ``latents`` output or the ``prompt`` input; anything
    else that differs (a dim, a data type, a missing required tensor) is refused, naming it.
    """
    declared = io_from_model_config(config)
    prompt = declared.input(PROMPT) is not None
    want = expected_io(manifest, prompt, declared.output(LATENTS) is not None,
                       int(config.get("max_batch_size", 0)), decoupled)
    fix = "regenerate the model with ertacache-triton --force, or restore config.pbtxt"
    for kind, have, need in (("input", declared.inputs, want.inputs), ("output", declared.outputs, want.outputs)):
        have_by = {t.name: t for t in have}
        for t in need:
            got = have_by.pop(t.name, None)
            if got is None:
                raise UserError(f"config.pbtxt lacks the {kind} {t.name!r} ({t.data_type} {list(t.dims)}) that this "
                                f"export folder needs; {fix}")
            if (got.data_type, got.dims) != (t.data_type, t.dims):
                raise UserError(f"config.pbtxt declares {kind} {t.name!r} as {got.data_type} {list(got.dims)} but the "
                                f"export folder has {t.data_type} {list(t.dims)}; {fix}")
        if have_by:
            raise UserError(f"config.pbtxt declares {kind}(s) {sorted(have_by)} that this model does not have; {fix}")
    return declared
