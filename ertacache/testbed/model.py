"""Loading and sampling the shipped ``wan2.1-tiny`` testbed.

The sampler here is deliberately minimal (Euler flow matching with batched CFG) and
independent of ``ertacache.sampling``: it is the reference the testbed was trained
and judged with, so the core sampler can be checked against it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ertacache.sampling.sampler import initial_latents

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "wan2.1-tiny"


@dataclass(frozen=True)
class TransformerSpec:
    """The tiny WanTransformer3DModel configuration (validated)."""

    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    ffn_dim: int = 512
    freq_dim: int = 64
    in_channels: int = 16
    text_dim: int = 32

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_attention_heads, self.attention_head_dim, self.ffn_dim) <= 0:
            raise ValueError(f"all TransformerSpec sizes must be positive: {self}")
        if self.attention_head_dim % 2 or self.attention_head_dim < 12:
            # Wan's 3-D rope splits each head into (t, h, w) parts of even size d - 4*(d//6), 2*(d//6), 2*(d//6).
            raise ValueError("attention_head_dim must be even and >= 12 for Wan's 3-D rope")
        if self.freq_dim % 2:
            raise ValueError("freq_dim must be even (sin/cos halves)")

    def to_diffusers(self) -> dict:
        """Keyword arguments for ``WanTransformer3DModel``."""
        return dict(
            patch_size=(1, 2, 2), num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim, in_channels=self.in_channels,
            out_channels=self.in_channels, text_dim=self.text_dim, freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim, num_layers=self.num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        )


@dataclass
class Testbed:
    """The three components plus the facts in ``testbed.json``."""

    transformer: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    facts: dict

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, F, H/s, W/s) of one sample's latent."""
        s = self.vae.config.spatial_factor
        return (self.vae.config.latent_channels, self.facts["frames"],
                self.facts["height"] // s, self.facts["width"] // s)


#: what writes each testbed folder (quoted when one is missing or broken)
TRAINING_SCRIPTS = "tools/train_testbed.py (wan2.1-tiny) or tools/train_small_testbed.py (wan2.1-small)"


def check_testbed_folder(folder: str | Path) -> Path:
    """``folder`` if it has testbed.json and a whole safetensors file per component; else one clear error.

    A truncated file (an interrupted copy) is named here instead of failing inside diffusers.
    """
    from ertacache.errors import ModelFilesError, ModelNotFoundError
    from ertacache.io import safetensors_problem

    folder = Path(folder)
    if not (folder / "testbed.json").is_file():
        raise ModelNotFoundError(f"{folder} is not a trained testbed folder (no testbed.json); "
                                 f"one is written by {TRAINING_SCRIPTS}")
    for sub in ("transformer", "text_encoder", "vae"):
        files = sorted((folder / sub).glob("*.safetensors"))
        problems = ([p for p in map(safetensors_problem, files) if p] if files
                    else [f"{folder / sub} has no *.safetensors weights file"])
        if problems:
            raise ModelFilesError(f"{problems[0]}; write the folder again with {TRAINING_SCRIPTS}")
    return folder


def load_testbed(folder: str | Path = ASSET_DIR, device: str | torch.device = "cpu") -> Testbed:
    """Load through ``from_pretrained``: the same path a real model folder takes."""
    from diffusers import WanTransformer3DModel

    from ertacache.testbed.pixel_vae import PixelVAE
    from ertacache.testbed.text_encoder import TinyTextEncoder

    folder = check_testbed_folder(folder)
    transformer = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer").to(device).eval()
    text_encoder = TinyTextEncoder.from_pretrained(folder, subfolder="text_encoder").to(device).eval()
    vae = PixelVAE.from_pretrained(folder, subfolder="vae").to(device).eval()
    facts = json.loads((folder / "testbed.json").read_text())
    return Testbed(transformer, text_encoder, vae, facts)


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The sampler's sigma grid: diffusers' FlowMatchEulerDiscreteScheduler, steps + 1 values ending at 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    return sched.sigmas.float().clone()


@torch.no_grad()
def sample_latents(transformer, text_encoder, prompts: list[str], seeds: list[int],
                   latent_shape: tuple[int, ...], steps: int = 50, shift: float = 3.0,
                   guidance_scale: float = 4.0, callback=None) -> torch.Tensor:
    """Uncached Euler flow-matching sampling with CFG (cond and uncond batched in one call).

    ``callback(step_index, sigma)`` runs after each transformer call (used by the
    residual probe to tag hook captures with the step).
    """
    if len(prompts) != len(seeds):
        raise ValueError("need one seed per prompt")
    device = next(transformer.parameters()).device
    cond = text_encoder.encode(list(prompts)).to(device)  # (B, L, D)
    uncond = text_encoder.encode([""] * len(prompts)).to(device)  # (B, L, D)
    use_cfg = guidance_scale != 1.0
    text = torch.cat([uncond, cond]) if use_cfg else cond  # (2B or B, L, D)
    x = initial_latents(latent_shape, seeds, device)  # (B, C, F, h, w), one generator per seed
    sigmas = flow_sigmas(steps, shift).to(device)
    for i in range(steps):
        sigma = sigmas[i]
        xin = torch.cat([x, x]) if use_cfg else x  # (2B or B, C, F, h, w)
        t = (sigma * 1000.0).expand(xin.shape[0]).float()  # (2B or B,)
        v = transformer(hidden_states=xin, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        if use_cfg:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        if callback is not None:
            callback(i, float(sigma))
        x = x + (sigmas[i + 1] - sigma) * v
    return x


def sample_frames(testbed: Testbed, prompts: list[str], seeds: list[int], steps: int | None = None,
                  guidance_scale: float | None = None, shift: float | None = None) -> torch.Tensor:
    """Prompts + seeds -> uint8 frames (B, F, H, W, 3) with the shipped defaults."""
    f = testbed.facts
    lat = sample_latents(testbed.transformer, testbed.text_encoder, prompts, seeds, testbed.latent_shape,
                         steps=steps or f["recommended_steps"],
                         shift=f["shift"] if shift is None else shift,
                         guidance_scale=f["guidance_scale"] if guidance_scale is None else guidance_scale)
    return testbed.vae.decode(lat)
