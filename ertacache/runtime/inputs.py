"""A request's inputs from what a user has: a prompt (encoded with the folder's text encoder) or saved embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ertacache.contract import ExportManifest
from ertacache.errors import PromptError, UserError, brief
from ertacache.limits import check_prompt, check_seed
from ertacache.sampling.sampler import initial_latents


def text_embeds_from_npy(path: str | Path, manifest: ExportManifest):
    """(nb*B, L, D_text) embeddings from a .npy file; for a folder with several conditioning inputs
    (FLUX), a mapping from an .npz holding one array per input name. Shapes are checked later."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--text-embeds {path} is a folder; give a .npy file")
    if not path.is_file():
        raise UserError(f"--text-embeds {path} does not exist")
    names = tuple(manifest.conditioning)
    if names != ("text_embeds",):
        return _named_arrays(path, names, manifest)
    return _float_tensor(_load_array(path, ".npy", "numpy.save"), f"--text-embeds {path}", manifest)


def _load_array(path: Path, kind: str, writer: str):
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        # NumPy's message for a non-array file suggests allow_pickle=True: never do that for an input file
        what = "a pickle, which is never loaded" if "pickle" in str(e).lower() else brief(str(e), 120)
        raise UserError(f"--text-embeds {path} is not a {kind} array ({what}); save the embeddings with {writer}") \
            from None


def _float_tensor(arr, where: str, manifest: ExportManifest) -> torch.Tensor:
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
        raise UserError(f"{where} holds {getattr(arr, 'dtype', type(arr).__name__)} values; give floating-point "
                        "embeddings")
    return torch.from_numpy(np.ascontiguousarray(arr)).to(manifest.torch_dtype)


def _named_arrays(path: Path, names: tuple[str, ...], manifest: ExportManifest) -> dict[str, torch.Tensor]:
    """One tensor per conditioning input from an .npz (``numpy.savez(path, prompt_embeds=..., ...)``)."""
    loaded = _load_array(path, ".npz", "numpy.savez")
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise UserError(f"this export folder takes the conditioning inputs {list(names)}; give --text-embeds an "
                        f".npz with one array per name (numpy.savez(path, {names[0]}=..., ...)), not one array")
    with loaded:
        missing = [n for n in names if n not in loaded.files]
        unknown = [n for n in loaded.files if n not in names]
        if missing or unknown:
            raise UserError(f"--text-embeds {path}: missing {missing}, unknown {brief(str(unknown), 120)}; this "
                            f"export folder takes {list(names)}")
        return {n: _float_tensor(loaded[n], f"--text-embeds {path} [{n}]", manifest) for n in names}


def text_embeds_from_prompt(prompt: str, manifest: ExportManifest, model_path: str | None = None,
                            image: str | None = None):
    """Encode ``prompt`` (repeated over the folder's batch) and, with CFG, the negative prompt.

    One tensor (nb*B, L, D_text), or for a folder with several conditioning inputs a mapping by name.
    An image-to-video folder also takes ``image`` (a file), encoded with the model's image encoder at
    the folder's video size.

    Loads only the text (and image) encoder of the folder's model (recipe id and path from the manifest).
    """
    from ertacache.models.family import family_named
    from ertacache.models.loading import resolve_model_path
    from ertacache.models.recipes import load_recipe

    check_prompt(prompt)
    model_id = manifest.model.id
    try:
        recipe = load_recipe(model_id)
    except UserError:
        saved = "FILE.npy" if tuple(manifest.conditioning) == ("text_embeds",) else "FILE.npz (one array per input)"
        raise UserError(f"the export folder's model {brief(model_id, 40)} has no recipe, so its text encoder cannot "
                        f"be loaded; pass --text-embeds {saved} instead of --prompt") from None
    family = family_named(recipe.family)
    images = None
    if family.takes_images:
        from ertacache.models.images import load_image

        if image is None:
            raise UserError(f"{model_id} is image-to-video: give the conditioning image with --image FILE")
        images = [load_image(image)]
    elif image is not None:
        raise UserError(f"{model_id} is not image-conditioned: it takes no --image")
    path = resolve_model_path(recipe, model_path or manifest.model.path)
    encoder = family.prompt_encoder(path, manifest.torch_dtype)
    image_encoder = None if images is None else family.image_encoder(path, manifest.torch_dtype)
    return encode_prompt(encoder, prompt, manifest, images, image_encoder, family)


def encode_prompt(encoder, prompt: str, manifest: ExportManifest, images=None, image_encoder=None, family=None):
    """(nb*B, L, D_text): ``prompt`` for the folder's batch, then (CFG) its negative prompt, with a loaded encoder;
    for a folder with several conditioning inputs (FLUX) a mapping with one such tensor per input name; for an
    image-to-video folder also ``images`` (one, repeated over the batch) through ``image_encoder``.

    Shared by ertacache-run and the Triton model, which loads the encoder once per instance.
    """
    check_prompt(prompt)
    batch = manifest.shapes.batch_size
    nb = manifest.schedule.n_branches
    rows = [prompt] * batch + [manifest.negative_prompt] * batch * (nb - 1)
    with torch.no_grad():
        try:
            embeds = encoder.encode(rows)
        except PromptError:
            raise
        except (ValueError, TypeError) as e:  # a tokenizer refusing the text
            raise PromptError(f"prompt {brief(prompt)} cannot be encoded: {brief(str(e), 200)}") from None
        if images is not None:
            from ertacache.models.loading import add_image_conditioning

            size = (manifest.shapes.frames, manifest.shapes.height, manifest.shapes.width)
            embeds = add_image_conditioning(family, embeds, image_encoder, list(images) * batch, size)
    if isinstance(embeds, Mapping):  # a family with several conditioning inputs (FLUX)
        names = tuple(manifest.conditioning)
        if sorted(embeds) != sorted(names):
            raise UserError(f"the text encoder returned {sorted(embeds)} but this export folder takes {list(names)}; "
                            "pass --text-embeds FILE.npz with one array per input")
        return {n: embeds[n].float().to(manifest.torch_dtype).cpu() for n in names}
    return embeds.float().to(manifest.torch_dtype).cpu()


def noise_for(manifest: ExportManifest, seed: int) -> torch.Tensor:
    """(B, C, F', H', W') noise; sample k uses seed + k (as ertacache-generate does for one seed each)."""
    shape = manifest.shapes.latents
    check_seed(seed, shape[0])
    return initial_latents(shape[1:], [seed + k for k in range(shape[0])])
