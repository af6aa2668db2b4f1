"""A shipped testbed (``wan2.1-tiny``, or ``model="wan2.1-small"``) as a diffusers ``WanPipeline``, offline.

The testbed's transformer is diffusers' own ``WanTransformer3DModel``; its text encoder and "VAE"
are small classes of this package (``ertacache.testbed``), so the folder has no ``model_index.json``
and ``WanPipeline.from_pretrained`` cannot load it. :func:`load_testbed_pipeline` builds the pipeline
from the shipped components instead:

* ``transformer``: the shipped weights through ``WanTransformer3DModel.from_pretrained``;
* ``scheduler``: flow-matching Euler with the recipe's shift (``enable_ertacache`` replaces it);
* ``vae``: :class:`PixelVAEForWanPipeline`, the testbed's exact space-to-depth decoder behind the
  attributes WanPipeline reads (``scale_factor_*``, ``z_dim``, ``latents_mean/std``, ``decode``);
* no tokenizer and text encoder: call the pipeline with ``prompt_embeds`` / ``negative_prompt_embeds``
  from :func:`encode_testbed_prompts` (diffusers' documented offline way; the testbed's encoder is
  not a transformers tokenizer + T5).

Frames: WanPipeline counts ``num_frames`` as Wan does, ``4 * (latent_frames - 1) + 1``, and the
pixel VAE decodes one frame per latent frame; so ``num_frames=13`` gives the testbed's 4 frames
(:data:`TESTBED_NUM_FRAMES`). The pipeline and ertacache's own sampler then run the same model
on the same inputs (tests/integrations checks they agree). For another testbed or frame count,
:func:`pipeline_num_frames` gives the ``num_frames`` to pass.
"""

from __future__ import annotations

import os

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin

from ertacache.models.loading import resolve_model_path
from ertacache.models.recipes import load_recipe

TESTBED = "wan2.1-tiny"
#: WanPipeline's temporal factor for the testbed (Wan's 4, so 4k + 1 frames need no rounding)
PIPELINE_TEMPORAL_FACTOR = 4


def pipeline_num_frames(frames: int) -> int:
    """WanPipeline's ``num_frames`` for ``frames`` testbed frames (one per latent frame through the pixel VAE)."""
    return PIPELINE_TEMPORAL_FACTOR * (frames - 1) + 1


#: num_frames that gives the recipe's 4 latent frames (= 4 video frames through the pixel VAE)
TESTBED_NUM_FRAMES = pipeline_num_frames(load_recipe(TESTBED).defaults.frames)


class PixelVAEForWanPipeline(ModelMixin, ConfigMixin):
    """The testbed's PixelVAE with the interface WanPipeline's decode uses (latents are not normalised)."""

    @register_to_config
    def __init__(self, z_dim: int = 16, scale_factor_spatial: int = 4, scale_factor_temporal: int = 4,
                 image_channels: int = 1):
        from ertacache.testbed.pixel_vae import PixelVAE  # (ertacache.testbed's __init__ loads its judge too)

        super().__init__()
        self.register_to_config(latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
        self.pixel = PixelVAE(latent_channels=z_dim, spatial_factor=scale_factor_spatial,
                              image_channels=image_channels)

    @classmethod
    def from_pixel_vae(cls, vae) -> "PixelVAEForWanPipeline":
        c = vae.config
        return cls(z_dim=c.latent_channels, scale_factor_spatial=c.spatial_factor,
                   scale_factor_temporal=PIPELINE_TEMPORAL_FACTOR, image_channels=c.image_channels)

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        """(B, C, F, h, w) latents -> (B, 3, F, H, W) frames in [-1, 1], as AutoencoderKLWan.decode returns."""
        x = self.pixel.decode_float(latents).clamp(-1, 1)  # (B, c, F, H, W)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1, -1)  # gray -> (B, 3, F, H, W)
        return DecoderOutput(sample=x) if return_dict else (x,)


def load_testbed_pipeline(model_path: str | os.PathLike | None = None, model: str = TESTBED) -> WanPipeline:
    """A diffusers ``WanPipeline`` of the shipped testbed ``model`` (or a copy of its folder at ``model_path``)."""
    from ertacache.testbed.pixel_vae import PixelVAE

    recipe = load_recipe(model)
    path = resolve_model_path(recipe, model_path)
    transformer = WanTransformer3DModel.from_pretrained(path, subfolder="transformer").eval()
    vae = PixelVAEForWanPipeline.from_pixel_vae(PixelVAE.from_pretrained(path, subfolder="vae")).eval()
    return WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=recipe.defaults.shift))


def encode_testbed_prompts(prompts: list[str], model_path: str | os.PathLike | None = None,
                           model: str = TESTBED) -> torch.Tensor:
    """(B, L, D) embeddings of ``prompts`` by the testbed's text encoder ("" is the unconditional prompt)."""
    from ertacache.testbed.text_encoder import TinyTextEncoder

    path = resolve_model_path(load_recipe(model), model_path)
    encoder = TinyTextEncoder.from_pretrained(path, subfolder="text_encoder").eval()
    with torch.no_grad():
        return encoder.encode(list(prompts))
