"""A tiny random Wan model behind the ModelBundle interface, so the whole harness runs in seconds."""

from __future__ import annotations

import hashlib

import pytest
import torch

from ertacache.eval.config import EvalConfig
from ertacache.eval.harness import EvalContext
from ertacache.models.adapter import adapter_for
from ertacache.sampling.settings import SampleSettings
from tests.conftest import tiny_wan

STEPS = 8
CAL_PROMPTS = ["digit 1 moving left", "digit 2 moving up", "digit 3 moving down"]
HELD_OUT = ["digit 4 moving right", "digit 5 moving left"]


class FakeDecoder:
    """Latents (B, 4, F, 8, 8) -> frames (B, F, 32, 32, 3) uint8: 3 channels upsampled 4x (the judge wants 32 px)."""

    latent_channels, spatial_factor, temporal_factor = 4, 1, 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents[:, :3].float().clamp(-1, 1)  # (B, 3, F, H, W)
        x = x.repeat_interleave(4, dim=3).repeat_interleave(4, dim=4)  # (B, 3, F, 4H, 4W)
        return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()  # (B, F, 4H, 4W, 3)


class FakeBundle:
    """What EvalContext uses of a ModelBundle, around tiny_wan(); prompts map to fixed random embeddings."""

    model_id, fingerprint = "tiny-random", "0" * 16

    def __init__(self):
        self.transformer = tiny_wan(seed=3)
        self.decoder = FakeDecoder()
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    @property
    def adapter(self):
        return adapter_for(self.transformer)

    @property
    def adapters(self):
        return [self.adapter]

    def experts(self, nominal_sigmas, settings):
        return None  # one transformer

    @property
    def family(self):
        return self.adapter.family

    def latent_shape(self, frames, height, width):
        return (4, frames, height, width)

    def encode(self, prompts, negative_prompt, n_branches, images=None, size=None):
        assert images is None  # a text-to-video model: the stages pass no images
        rows = list(prompts) + [negative_prompt] * len(prompts) * (n_branches - 1)
        out = []
        for p in rows:
            seed = int(hashlib.sha256(p.encode()).hexdigest()[:8], 16)
            out.append(torch.randn(5, 16, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(out)  # (nb*B, L, D)


def make_ctx(methods=("all",), speedups=(2.0,), **overrides) -> EvalContext:
    settings = SampleSettings(height=8, width=8, frames=2, steps=STEPS, shift=3.0, guidance_scale=4.0)
    cfg = dict(speedups=speedups, methods=methods, calibration_prompts=CAL_PROMPTS, held_out_prompts=HELD_OUT,
               held_out_seeds=[1000, 1001], batch_size=2, calibration_batch_size=2)
    cfg.update(overrides)
    return EvalContext(FakeBundle(), settings, EvalConfig(**cfg), progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def ctx():
    return make_ctx()
