"""The ``flux-tiny`` testbed: a small FLUX.1-style image model, what it is made of, and its reference sampler.

A diffusers ``FluxTransformer2DModel`` (2 double-stream + 2 single-stream blocks, width 256)
trained here on :mod:`ertacache.testbed.image_data` ("red digit 3" over photographs), with
the testbed's word-level text encoder behind FLUX's two conditioning inputs
(:class:`~ertacache.testbed.text_encoder.PooledPromptEncoder`) and the parameter-free pixel VAE
(RGB, space-to-depth 4: 48 latent channels at 8 x 8, packed 2 x 2 into 16 tokens of 192, each
token 8 x 8 pixels as in ``wan2.1-tiny``). ``docs/testbed.md`` has the runs that led here: with
4 x 4-pixel tokens the model drew colour and background but no digit shape in the CPU budget, and a
128-wide model cannot carry a 192-value token (noise is left in every sample).

Like FLUX.1-schnell it has no guidance embedder and is sampled with one branch (no CFG):
a guidance embedding only means something after guidance distillation, which a CPU budget
does not afford, and the task is simple enough that conditional sampling alone reaches the
judge's bar. The sigma table is the FLUX family's (dynamic shift at 64 tokens).

The sampler here is deliberately minimal and independent of ``ertacache.sampling``: it is
what the testbed was trained and judged with, so the core sampler can be checked against it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

FLUX_TINY_ID = "flux-tiny"
FLUX_TINY_DIR = Path(__file__).resolve().parent.parent / "assets" / FLUX_TINY_ID

IMAGE_CHANNELS = 3
TEXT_LENGTH = 4  # "red digit 3" is 3 words; 1 spare


@dataclass(frozen=True)
class FluxSpec:
    """The tiny ``FluxTransformer2DModel`` configuration (validated)."""

    spatial_factor: int = 4  # pixel VAE: s x s RGB pixels per latent pixel; a token is 2s x 2s pixels
    num_layers: int = 2  # double-stream blocks
    num_single_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 64  # width 256 > a token's 3 * 8 * 8 = 192 values (128 left noise in every sample)
    text_dim: int = 32  # joint_attention_dim and pooled_projection_dim
    axes_dims_rope: tuple[int, int, int] = (16, 24, 24)

    @property
    def latent_channels(self) -> int:
        """RGB folded s x s into channels: 3 s^2 (48 at s = 4)."""
        return IMAGE_CHANNELS * self.spatial_factor**2

    def __post_init__(self) -> None:
        if min(self.spatial_factor, self.num_layers, self.num_single_layers, self.num_attention_heads,
               self.attention_head_dim, self.text_dim) <= 0:
            raise ValueError(f"all FluxSpec sizes must be positive: {self}")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must be even and sum to attention_head_dim "
                             f"({self.attention_head_dim})")

    def to_diffusers(self) -> dict:
        """Keyword arguments for ``FluxTransformer2DModel``."""
        return dict(patch_size=1, in_channels=self.latent_channels * 4, num_layers=self.num_layers,
                    num_single_layers=self.num_single_layers, attention_head_dim=self.attention_head_dim,
                    num_attention_heads=self.num_attention_heads, joint_attention_dim=self.text_dim,
                    pooled_projection_dim=self.text_dim, guidance_embeds=False,
                    axes_dims_rope=tuple(self.axes_dims_rope))


def build_flux_tiny(seed: int = 0, spec: FluxSpec = FluxSpec()):
    """Fresh, seeded (transformer, text encoder, pixel VAE) of the flux-tiny testbed."""
    from diffusers import FluxTransformer2DModel

    from ertacache.testbed.image_data import VOCABULARY
    from ertacache.testbed.pixel_vae import PixelVAE
    from ertacache.testbed.text_encoder import PAD, TinyTextEncoder

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**spec.to_diffusers())
    text_encoder = TinyTextEncoder(vocab=(PAD, *VOCABULARY), max_length=TEXT_LENGTH, embed_dim=spec.text_dim,
                                   seed=seed)
    vae = PixelVAE(latent_channels=spec.latent_channels, spatial_factor=spec.spatial_factor, temporal_factor=1,
                   image_channels=IMAGE_CHANNELS)
    return transformer, text_encoder, vae


def flux_velocity(transformer, latents: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """FluxPipeline's transformer call on unpacked latents (B, C, H', W'): returns the velocity, same shape.

    ``sigma``: (B,) noise levels (FluxPipeline passes timestep / 1000 = sigma; the model scales by 1000).
    """
    from ertacache.models.flux import PACK, image_ids, pack_latents, unpack_latents

    b, _, h, w = latents.shape
    tokens = pack_latents(latents)  # (B, N, 4C)
    text = cond["prompt_embeds"]  # (B, L, D)
    img_ids = image_ids(h // PACK, w // PACK, device=latents.device)  # (N, 3)
    txt_ids = torch.zeros(text.shape[1], 3, device=latents.device)  # (L, 3)
    out = transformer(hidden_states=tokens, timestep=sigma, encoder_hidden_states=text,
                      pooled_projections=cond["pooled_prompt_embeds"], img_ids=img_ids, txt_ids=txt_ids,
                      guidance=None, return_dict=False)[0]  # (B, N, 4C)
    return unpack_latents(out, h, w)  # (B, C, H', W')


def flux_sigmas(steps: int, height: int, width: int, spatial_factor: int) -> torch.Tensor:
    """The FLUX family's sigma table at this image size (steps + 1 values ending at 0)."""
    from ertacache.models.flux import FLUX_T2I, PACK

    tokens = (height // spatial_factor // PACK) * (width // spatial_factor // PACK)
    return torch.tensor(FLUX_T2I.sigmas(steps, None, tokens), dtype=torch.float32)


@torch.no_grad()
def sample_images(transformer, text_encoder, prompts: list[str], seeds: list[int], height: int = 32,
                  width: int = 32, steps: int = 50, guidance_scale: float = 1.0) -> torch.Tensor:
    """Uncached Euler flow matching: prompts + seeds -> latents (B, C, H', W').

    guidance_scale > 1: classifier-free guidance with the empty prompt, both branches in one batch
    (cond rows, then uncond rows: the toolchain's CFG layout), as FluxPipeline's true CFG computes it.
    """
    from ertacache.sampling.sampler import initial_latents
    from ertacache.testbed.text_encoder import PooledPromptEncoder

    if len(prompts) != len(seeds):
        raise ValueError("need one seed per prompt")
    cfg = guidance_scale > 1.0
    rows = list(prompts) + [""] * len(prompts) * cfg
    cond = PooledPromptEncoder(text_encoder).encode(rows)  # (nb*B, ...) each
    s = int(transformer.config.in_channels) // 4 // IMAGE_CHANNELS  # s^2: latent channels are 3 s^2, packed 2 x 2
    factor = int(round(s**0.5))
    shape = (IMAGE_CHANNELS * factor**2, height // factor, width // factor)
    x = initial_latents(shape, seeds, "cpu")  # (B, C, H', W'), one generator per seed
    sigmas = flux_sigmas(steps, height, width, factor)
    for i in range(steps):
        x_in = torch.cat([x, x]) if cfg else x  # (nb*B, C, H', W')
        v = flux_velocity(transformer, x_in, sigmas[i].expand(x_in.shape[0]), cond)
        if cfg:
            v_c, v_u = v.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def save_facts(folder: Path, facts: dict) -> None:
    (folder / "testbed.json").write_text(json.dumps(facts, indent=2) + "\n")


def spec_facts(spec: FluxSpec) -> dict:
    return {**asdict(spec), "axes_dims_rope": list(spec.axes_dims_rope)}
