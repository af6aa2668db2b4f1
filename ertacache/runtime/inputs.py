"""A request's inputs from what a user has: a prompt (encoded with the folder's text encoder) or saved embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ertacache.errors import UserError
from ertacache.sampling.sampler import initial_latents

_DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def text_embeds_from_npy(path: str | Path, manifest: Mapping[str, Any]) -> torch.Tensor:
    """(nb*B, L, D_text) embeddings from a .npy file (checked against the folder later)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--text-embeds {path} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"--text-embeds {path} is not a .npy array ({e})") from None
    return torch.from_numpy(np.ascontiguousarray(arr)).to(_DT[manifest["dtype"]])


def text_embeds_from_prompt(prompt: str, manifest: Mapping[str, Any], model_path: str | None = None) -> torch.Tensor:
    """Encode ``prompt`` (repeated over the folder's batch) and, with CFG, the negative prompt.

    Loads only the text encoder of the folder's model (recipe id and path from the manifest).
    """
    from ertacache.models.loading import FAMILIES, resolve_model_path
    from ertacache.models.recipes import load_recipe

    if not prompt or not prompt.strip():
        raise UserError("empty prompt: give a non-empty --prompt")
    model_id = manifest["model"]["id"]
    try:
        recipe = load_recipe(model_id)
    except UserError:
        raise UserError(f"the export folder's model {model_id!r} has no recipe, so its text encoder cannot be loaded; "
                        "pass --text-embeds FILE.npy instead of --prompt") from None
    path = resolve_model_path(recipe, model_path or manifest["model"].get("path"))
    encoder = FAMILIES[recipe.family].prompt_encoder(path, _DT[manifest["dtype"]])
    return encode_prompt(encoder, prompt, manifest)


def encode_prompt(encoder, prompt: str, manifest: Mapping[str, Any]) -> torch.Tensor:
    """(nb*B, L, D_text): ``prompt`` for the folder's batch, then (CFG) its negative prompt, with a loaded encoder.

    Shared by ertacache-run and the Triton model, which loads the encoder once per instance.
    """
    if not prompt or not prompt.strip():
        raise UserError("empty prompt: give a non-empty --prompt")
    batch = manifest["shapes"]["batch_size"]
    nb = manifest["profile"]["n_branches"]
    rows = [prompt] * batch + [manifest["text_encoder"].get("negative_prompt", "")] * batch * (nb - 1)
    with torch.no_grad():
        return encoder.encode(rows).float().to(_DT[manifest["dtype"]]).cpu()


def noise_for(manifest: Mapping[str, Any], seed: int) -> torch.Tensor:
    """(B, C, F', H', W') noise; sample k uses seed + k (as ertacache-generate does for one seed each)."""
    shape = manifest["shapes"]["latents"]
    return initial_latents(shape[1:], [seed + k for k in range(shape[0])])
