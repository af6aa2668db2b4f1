"""Text encoders and latent decoders behind two small interfaces.

Everything outside the denoising loop (prompt -> embeddings, latents -> frames)
runs once per video, so it stays eager PyTorch. The interfaces:

    PromptEncoder.encode(prompts: list[str]) -> (B, L, D) float tensor
    LatentDecoder.decode(latents (B, C, F', H', W')) -> uint8 frames (B, F, H, W, 3)
    LatentDecoder.latent_channels / spatial_factor / temporal_factor
"""

from __future__ import annotations

import re
from typing import Protocol

import torch


class PromptEncoder(Protocol):
    def encode(self, prompts: list[str]) -> torch.Tensor: ...


class LatentDecoder(Protocol):
    latent_channels: int
    spatial_factor: int
    temporal_factor: int

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def diffusers_loader(class_name: str, subfolder: str, wrap=None, float32: bool = False):
    """A family loader ``(folder, dtype) -> component``: diffusers' ``class_name`` from ``subfolder`` of a
    diffusers-format model folder, in eval mode, optionally wrapped (a decoder around its VAE).

    float32: load in float32 whatever the requested dtype (the Wan pipelines keep their VAE there).
    The class is looked up in diffusers when the loader runs, so defining a family imports no diffusers.
    """
    def load(path, dtype):
        import diffusers

        model = getattr(diffusers, class_name).from_pretrained(path, subfolder=subfolder,
                                                                torch_dtype=torch.float32 if float32 else dtype)
        return model.eval() if wrap is None else wrap(model.eval())

    load.__qualname__ = load.__name__ = f"load_{class_name}"
    return load


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8."""
    video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).contiguous()  # (B, F, H, W, 3)


class UMT5PromptEncoder:
    """Wan2.1's text path: UMT5 encoder states, zeroed past each prompt's length.

    Matches WanPipeline's prompt embedding (pad to ``max_length`` tokens, keep
    the states of real tokens, zeros after), except that prompts are only
    whitespace-normalised (WanPipeline also runs ftfy when it is installed).
    """

    def __init__(self, tokenizer, text_encoder, max_length: int = 512):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        prompts = [re.sub(r"\s+", " ", p).strip() for p in prompts]
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self.text_encoder.device
        mask = tokens.attention_mask.to(device)  # (B, L)
        states = self.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state  # (B, L, D)
        return states * mask.unsqueeze(-1).to(states.dtype)


class WanLatentDecoder:
    """``AutoencoderKLWan`` decode with the per-channel latent de-normalisation WanPipeline applies."""

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.latent_channels = int(cfg.z_dim)
        self.spatial_factor = int(getattr(cfg, "scale_factor_spatial", 8))
        self.temporal_factor = int(getattr(cfg, "scale_factor_temporal", 4))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg, vae = self.vae.config, self.vae
        c = self.latent_channels
        mean = torch.tensor(cfg.latents_mean, device=latents.device).view(1, c, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=latents.device).view(1, c, 1, 1, 1)
        latents = latents.float() * std + mean  # undo the pipeline's (z - mean) / std
        video = vae.decode(latents.to(vae.dtype), return_dict=False)[0]  # (B, 3, F, H, W)
        return to_uint8_frames(video)


class PixelLatentDecoder:
    """The testbed's space-to-depth "pixel VAE" behind the same interface."""

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.spatial_factor = int(cfg.spatial_factor)
        self.temporal_factor = int(cfg.temporal_factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.float())  # (B, F, H, W, 3) uint8
