"""Load a model (transformer, prompt encoder, latent decoder) from a recipe.

Real models load through diffusers/transformers ``from_pretrained`` on a
diffusers-format folder: ``--model-path`` if given, else the hub cache, else a
download. With no network and nothing local, loading fails at once with a
message saying what to download and where to point ``--model-path``. The
testbed loads the same way from a folder shipped inside this package.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ertacache.errors import ModelFilesError, ModelNotFoundError, UserError
from ertacache.io import safetensors_problem
from ertacache.models.adapter import ModelAdapter, adapter_for
from ertacache.models.components import LatentDecoder, PromptEncoder
from ertacache.models.experts import Experts
from ertacache.models.family import LatentLayout, ModelFamily, family_for_model, family_named, known_families
from ertacache.models.recipes import Recipe, available_models, load_recipe

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _FamilyTable(Mapping):
    """Read-only ``name -> ModelFamily`` view of the family registry (the name older callers used)."""

    def __getitem__(self, name: str) -> ModelFamily:
        try:
            return family_named(name)
        except UserError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(known_families())

    def __len__(self) -> int:
        return len(known_families())


#: every model family by name (prefer :func:`ertacache.models.family.family_named`, which explains a miss)
FAMILIES: Mapping[str, ModelFamily] = _FamilyTable()


def _download_hint(recipe: Recipe) -> str:
    return (
        f"download it with `hf download {recipe.hub_id} --local-dir /path/to/{recipe.model}` "
        f"on a machine with network access, then pass --model-path /path/to/{recipe.model}"
    )


def _fix_hint(recipe: Recipe, source: str) -> str:
    """How to get a complete folder back, for a folder from ``source`` ("path", "package" or "hub")."""
    if source == "package":
        if recipe.train_command:
            return (f"run `{recipe.train_command}` in a source checkout of ertacache (it trains and writes "
                    f"ertacache/{recipe.package_path}), or pass --model-path to a trained {recipe.model} folder")
        return f"reinstall ertacache, or pass --model-path to a complete {recipe.model} folder"
    if source == "hub" and recipe.hub_id:
        return _download_hint(recipe) + " (delete the broken copy first)"
    return f"copy or download the {recipe.model} folder again, or pass another --model-path"


def _check_folder(path: Path, recipe: Recipe, source: str = "path") -> Path:
    """``path`` if it holds every file the family loads, each safetensors file whole; else one clear error."""
    family = family_named(recipe.family)
    if source == "package" and not path.is_dir():
        raise ModelNotFoundError(f"the {recipe.model} weights are not in this installation ({path} does not exist); "
                                 + _fix_hint(recipe, source))
    missing = [f for f in family.required_files if not (path / f).exists()]
    if missing:
        if source == "package":
            hint = _fix_hint(recipe, source)
        else:
            hint = _download_hint(recipe) if recipe.hub_id else ""
        raise ModelNotFoundError(
            f"{path} is not a diffusers-format {recipe.model} folder (missing {', '.join(missing)})"
            + (f"; {hint}" if hint else "")
        )
    for sub in family.weight_folders:
        files = sorted((path / sub).glob("*.safetensors"))
        if not files and family.require_safetensors:
            raise ModelFilesError(f"{path / sub} has no *.safetensors weights file; {_fix_hint(recipe, source)}")
        for f in files:
            problem = safetensors_problem(f)
            if problem:
                raise ModelFilesError(f"{problem}; {_fix_hint(recipe, source)}")
    return path


def package_folder(recipe: Recipe) -> Path:
    """Where a model shipped inside this package lives (it may be absent, e.g. weights not trained yet)."""
    if recipe.package_path is None:
        raise ValueError(f"{recipe.model} is not shipped in the package (it comes from {recipe.hub_id})")
    return Path(str(resources.files("ertacache") / recipe.package_path))


def resolve_model_path(recipe: Recipe, model_path: str | os.PathLike | None = None) -> Path:
    """The local folder holding the model: --model-path, the package, the hub cache, or a download."""
    if model_path is not None:
        path = Path(model_path)
        if not path.is_dir():
            raise ModelNotFoundError(f"--model-path {path} does not exist or is not a folder")
        return _check_folder(path, recipe)
    if recipe.package_path is not None:
        return _check_folder(package_folder(recipe), recipe, source="package")

    from huggingface_hub import snapshot_download

    try:
        return _check_folder(Path(snapshot_download(recipe.hub_id, local_files_only=True)), recipe, source="hub")
    except ModelFilesError:  # in the cache but broken: say which file, do not download over it silently
        raise
    except Exception:  # not in the cache: try the network once, fail fast with the fix
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelNotFoundError(f"{recipe.hub_id} is not in the hub cache and HF_HUB_OFFLINE is set; "
                                 + _download_hint(recipe))
    try:
        return _check_folder(Path(snapshot_download(recipe.hub_id)), recipe, source="hub")
    except ModelNotFoundError:
        raise
    except Exception as e:
        raise ModelNotFoundError(
            f"could not load {recipe.hub_id}: not in the local hub cache and not downloadable here "
            f"({type(e).__name__}); " + _download_hint(recipe)
        ) from None


def fingerprint_module(module: nn.Module) -> str:
    """The identity of a module's weights alone: every tensor's name, shape and a strided sample of values.

    Why nothing else goes in: a profile is about weights, so the id must be
    the same wherever and however the same weights are loaded. diffusers'
    config carries ``_name_or_path`` (the folder the weights came from) and
    ``_diffusers_version``, so hashing the config gave the same checkpoint a
    different id in a clone, a wheel install, a copy of the folder or a path
    with a trailing slash. Names and shapes pin the architecture; values
    tell checkpoints apart.

    Hashing every byte of a 14B model takes minutes; 64 samples per tensor
    tell apart any two checkpoints in practice. Samples are rounded to
    bfloat16 first so that the same weights loaded in fp32 or bf16 share one
    fingerprint (a profile is about weights, not precision). fp16 loading
    rounds twice (fp32 -> fp16 -> bf16), which can differ in the last bfloat16
    bit, so an fp16 load of fp32 weights may get another id.
    """
    h = hashlib.sha256(b"ertacache-weights-v2")
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // 64)
            sample = flat[::stride][:64].to("cpu", torch.bfloat16).to(torch.float64)
            h.update(f"{name}:{tuple(tensor.shape)}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class ModelBundle:
    """A loaded model: transformer (+ its adapter), prompt encoder, latent decoder."""

    recipe: Recipe
    path: Path
    transformer: nn.Module
    prompt_encoder: PromptEncoder
    decoder: LatentDecoder
    fingerprint: str
    dtype: torch.dtype  # compute dtype of the transformer (some of its modules stay fp32 by design)
    image_encoder: Any = None  # an image-conditioned family's image path (family.image_encoder), else None
    transformer_2: nn.Module | None = None  # a two-expert model's low-noise expert (Wan2.2 A14B), else None

    @property
    def model_id(self) -> str:
        return self.recipe.model

    @property
    def adapter(self) -> ModelAdapter:
        """The (first) transformer's adapter."""
        return adapter_for(self.transformer)

    @property
    def adapters(self) -> list[ModelAdapter]:
        """One adapter per expert, in the order the experts run (one for a one-transformer model)."""
        return [adapter_for(t) for t in (self.transformer, self.transformer_2) if t is not None]

    def experts(self, nominal_sigmas, settings) -> Experts | None:
        """The step -> expert table of a two-expert model for the nominal sigma table of ``settings`` (its steps
        and shift decide where the switch falls) with its CFG scales; None for one transformer."""
        if self.transformer_2 is None:
            return None
        g2 = settings.guidance_scale if settings.guidance_scale_2 is None else settings.guidance_scale_2
        return Experts.from_boundary(nominal_sigmas, self.recipe.boundary_ratio, (settings.guidance_scale, g2))

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def family(self) -> ModelFamily:
        """The recipe's model family (what every stage asks instead of assuming Wan)."""
        return family_named(self.recipe.family)

    @property
    def layout(self) -> LatentLayout:
        """This model's latent layout: the family's kind, the decoder's factors, the transformer's patch."""
        return self.family.layout(self.decoder, self.adapter.patch_size, self.model_id)

    def latent_shape(self, frames: int | None, height: int, width: int) -> tuple[int, ...]:
        """(C, F', H', W') for a video of ``frames`` x ``height`` x ``width`` ((C, H', W') for an image
        family, ``frames`` None); refuses shapes that don't fit (:meth:`LatentLayout.check`)."""
        return self.layout.latent_shape(1, height, width, frames)[1:]

    def encode(self, prompts: list[str], negative_prompt: str, n_branches: int, images=None,
               size: tuple[int, int, int] | None = None):
        """The prompts' conditioning on the model's device and dtype: their rows, then (CFG) the negative prompt's.

        One tensor (nb*B, L, D) for a family with one text input (Wan); for a family with several
        (FLUX: ``prompt_embeds`` (B, L, D), ``pooled_prompt_embeds`` (B, D)) a mapping by the
        family's conditioning names, which every stage (calibration, sampler, export) takes as is.
        An image-conditioned family (Wan2.1 I2V) also takes ``images`` (one (H, W, 3) uint8 array per
        prompt) and the video ``size`` (frames, height, width) its condition latents are made for.
        """
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise UserError("empty prompt: give a non-empty --prompt (the negative prompt may be empty)")
        family = self.family
        if images is not None and not family.takes_images:
            raise UserError(f"{self.model_id} is not image-conditioned: it takes no --image")
        if family.takes_images:
            if images is None or len(images) != len(prompts):
                raise UserError(f"{self.model_id} is image-to-video: give one conditioning image per prompt "
                                "(--image FILE)")
            if size is None:
                raise ValueError("ModelBundle.encode needs the video size (frames, height, width) for the image inputs")
        rows = list(prompts) + [negative_prompt] * len(prompts) * (n_branches - 1)
        with torch.no_grad():
            encoded = self.prompt_encoder.encode(rows)
            if family.takes_images:
                encoded = add_image_conditioning(family, encoded, self.image_encoder, images, size)
        if not isinstance(encoded, Mapping):
            return encoded.to(self.device, self.dtype)
        names = [c.name for c in self.family.conditioning]
        if sorted(encoded) != sorted(names):
            raise ValueError(f"{type(self.prompt_encoder).__name__} returned {sorted(encoded)}; the {self.family.name} "
                             f"family's conditioning inputs are {names}")
        return {name: encoded[name].to(self.device, self.dtype) for name in names}  # in the family's order


def _check_family_of(transformer: nn.Module, family: ModelFamily, recipe: Recipe, path: Path) -> None:
    """Refuse, right after the transformer loads, a checkpoint of another family than the recipe's (an I2V folder
    given to a text-to-video id, or the reverse), before the other components load and long work starts."""
    found = family_for_model(transformer)  # a UserError for a class or config no family takes
    want = family.variant_of or family.name
    if found.name != want:
        raise UserError(f"the transformer in {path} is a {found.name!r} model ({found.description or found.name}), "
                        f"but --model {recipe.model} expects the {want!r} family; pass the matching --model id or "
                        "the matching --model-path")


def add_image_conditioning(family: ModelFamily, text, image_encoder, images, size: tuple[int, int, int]) -> dict:
    """The text encoder's output (one tensor or a mapping) plus ``image_encoder``'s inputs for ``images`` (one
    row per image) at ``size`` = (frames, height, width): the image family's whole conditioning mapping."""
    frames, height, width = size
    named = dict(text) if isinstance(text, Mapping) else {family.input_names[0]: text}
    return {**named, **image_encoder.encode(list(images), height, width, frames)}


def load_bundle(
    model: str,
    model_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
) -> ModelBundle:
    """Load every component of ``model`` (a recipe id) onto ``device`` in ``dtype`` (recipe default)."""
    recipe = load_recipe(model)
    dtype_name = dtype or recipe.defaults.dtype
    if dtype_name not in TORCH_DTYPES:
        raise UserError(f"--dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype_name!r}")
    torch_dtype = TORCH_DTYPES[dtype_name]
    family = family_named(recipe.family)  # an unknown family is refused before any file is touched
    path = resolve_model_path(recipe, model_path)
    two = (path / "transformer_2").is_dir()  # Wan2.2 A14B: a high-noise and a low-noise expert
    if two and recipe.boundary_ratio is None:
        raise UserError(f"{path} holds two transformers (transformer/ and transformer_2/: a two-expert model such as "
                        f"Wan2.2 A14B), but {recipe.model} is a one-transformer model and running the first expert "
                        f"alone would give wrong videos; use a two-expert id ({', '.join(two_expert_models())})")
    if recipe.boundary_ratio is not None and not (two and family.expert_transformer is not None):
        raise ModelNotFoundError(f"{recipe.model} is a two-expert model but {path} has no transformer_2/ folder (the "
                                 "low-noise expert); " + (_download_hint(recipe) if recipe.hub_id else ""))
    transformer = family.transformer(path, torch_dtype).to(device).eval()
    _check_family_of(transformer, family, recipe, path)
    transformer_2 = None
    if recipe.boundary_ratio is not None:
        transformer_2 = family.expert_transformer(path, torch_dtype).to(device).eval()
        _check_family_of(transformer_2, family, recipe, path)
    encoder = family.prompt_encoder(path, torch_dtype)
    if isinstance(encoder, nn.Module) or callable(getattr(encoder, "to", None)):
        encoder.to(device)  # a module, or a component that moves its own modules (FluxPromptEncoder)
    elif isinstance(getattr(encoder, "text_encoder", None), nn.Module):
        encoder.text_encoder.to(device)
    decoder = family.decoder(path, torch_dtype)
    decoder.vae.to(device)
    image_encoder = None if family.image_encoder is None else family.image_encoder(path, torch_dtype, decoder).to(device)
    fingerprint = fingerprint_modules([transformer, transformer_2])
    return ModelBundle(recipe, path, transformer, encoder, decoder, fingerprint, torch_dtype, image_encoder,
                       transformer_2)


def fingerprint_modules(transformers) -> str:
    """The weights' identity of a model's transformer(s): one :func:`fingerprint_module`, or the experts' joined
    by "+" in the order they run (a profile of a two-expert model is about both)."""
    return "+".join(fingerprint_module(t) for t in transformers if t is not None)


def two_expert_models() -> list[str]:
    """Model ids whose recipe has two experts (what a two-transformer folder should be loaded as)."""
    return [m for m in available_models() if load_recipe(m).boundary_ratio is not None]
