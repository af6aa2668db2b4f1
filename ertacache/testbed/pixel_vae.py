"""A parameter-free "VAE": space-to-depth on grayscale frames.

The caching code only needs a latent with the Wan layout (B, C, F, H', W') and a
decoder to uint8 RGB frames; a learned VAE would cost training time and add its own
error. Folding each s x s pixel block into channels keeps the latent exact and
invertible, so the judge measures the transformer alone.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class PixelVAE(ModelMixin, ConfigMixin):
    """Space-to-depth by ``spatial_factor``; ``latent_channels = image_channels * s * s``."""

    @register_to_config
    def __init__(self, latent_channels: int = 16, spatial_factor: int = 4, temporal_factor: int = 1,
                 image_channels: int = 1):
        super().__init__()
        if temporal_factor != 1:
            raise ValueError("PixelVAE keeps every frame: temporal_factor must be 1")
        if latent_channels != image_channels * spatial_factor**2:
            raise ValueError(
                f"latent_channels ({latent_channels}) must equal image_channels * spatial_factor**2 "
                f"({image_channels * spatial_factor**2})"
            )
        # A zero-size buffer gives the module a device/dtype and keeps save/load working.
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=True)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames in [-1, 1], (B, F, H, W) or (B, c, F, H, W) -> latents (B, C, F, H/s, W/s)."""
        c, s = self.config.image_channels, self.config.spatial_factor
        if frames.ndim == 4:
            frames = frames.unsqueeze(1)  # (B, F, H, W) -> (B, 1, F, H, W)
        b, ch, f, h, w = frames.shape
        if ch != c or h % s or w % s:
            raise ValueError(f"expected (B, {c}, F, H, W) with H, W divisible by {s}, got {tuple(frames.shape)}")
        x = frames.float().reshape(b, c, f, h // s, s, w // s, s)  # (B, c, F, H/s, s, W/s, s)
        x = x.permute(0, 1, 4, 6, 2, 3, 5)  # (B, c, s, s, F, H/s, W/s)
        return x.reshape(b, c * s * s, f, h // s, w // s).contiguous()  # (B, C, F, H/s, W/s)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, c, H, W) -> image latents (B, C, H/s, W/s) (an image is a one-frame video)."""
        return self.encode(images.unsqueeze(2))[:, :, 0]  # (B, c, 1, H, W) -> (B, C, H/s, W/s)

    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, F, h, w), or image latents (B, C, h, w) -> frames (B, c, F, h*s, w*s) in float, unclipped."""
        c, s = self.config.image_channels, self.config.spatial_factor
        if latents.ndim == 4:
            latents = latents.unsqueeze(2)  # (B, C, h, w) -> (B, C, 1, h, w): one frame
        b, ch, f, h, w = latents.shape
        if ch != c * s * s:
            raise ValueError(f"expected {c * s * s} latent channels, got {ch}")
        x = latents.float().reshape(b, c, s, s, f, h, w)  # (B, c, s, s, F, h, w)
        x = x.permute(0, 1, 4, 5, 2, 6, 3)  # (B, c, F, h, s, w, s)
        return x.reshape(b, c, f, h * s, w * s)  # (B, c, F, H, W)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, F, h, w) or (B, C, h, w) -> uint8 RGB frames (B, F, H, W, 3) (F = 1 for images); gray is replicated."""
        x = self.decode_float(latents)  # (B, c, F, H, W)
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        x = x.permute(0, 2, 3, 4, 1)  # (B, F, H, W, c)
        if x.shape[-1] == 1:
            x = x.expand(*x.shape[:-1], 3)  # (B, F, H, W, 3)
        return x.contiguous()
