"""The testbeds' model families: Wan's and FLUX's transformer classes with the testbed's text encoder and pixel VAE.

The testbeds (``wan2.1-tiny``, ``wan2.1-small``) are ``WanTransformer3DModel``s, so they
share everything the stages use with the Wan family (layout, conditioning, timestep
scale, sigmas, guidance, export rewrites); only the components load differently. The
family registers itself when this module is imported; ``ertacache.models`` finds it by
name through :data:`ertacache.models.family.FAMILY_MODULES` and never imports the
testbed package otherwise (so the package import graph stays acyclic).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ertacache.models.components import LatentDecoder, PixelLatentDecoder, PromptEncoder
from ertacache.models.family import register_family
from ertacache.models.flux import FLUX_T2I
from ertacache.models.wan import WAN_T2V


def _load_tiny_text(path: Path, dtype: torch.dtype) -> PromptEncoder:
    from ertacache.testbed.text_encoder import TinyTextEncoder

    return TinyTextEncoder.from_pretrained(path, subfolder="text_encoder").eval()


def _load_pixel_vae(path: Path, dtype: torch.dtype) -> LatentDecoder:
    from ertacache.testbed.pixel_vae import PixelVAE

    return PixelLatentDecoder(PixelVAE.from_pretrained(path, subfolder="vae").eval())


TESTBED = register_family(WAN_T2V.variant(
    "testbed",
    description="the shipped testbeds: WanTransformer3DModel with a word-level text encoder and a pixel VAE",
    prompt_encoder=_load_tiny_text,
    decoder=_load_pixel_vae,
    required_files=("transformer/config.json", "vae/config.json", "text_encoder/config.json"),
    require_safetensors=True,
))


def _load_pooled_text(path: Path, dtype: torch.dtype) -> PromptEncoder:
    from ertacache.testbed.text_encoder import PooledPromptEncoder

    return PooledPromptEncoder(_load_tiny_text(path, dtype))


#: ``flux-tiny``: FLUX's transformer class and stages; FLUX's two text inputs from the testbed's one encoder
FLUX_TESTBED = register_family(FLUX_T2I.variant(
    "flux-testbed",
    description="the shipped FLUX testbed: FluxTransformer2DModel with a word-level text encoder and an RGB pixel VAE",
    prompt_encoder=_load_pooled_text,
    decoder=_load_pixel_vae,
    required_files=("transformer/config.json", "vae/config.json", "text_encoder/config.json"),
    weight_folders=("transformer", "text_encoder", "vae"),
    require_safetensors=True,
))
