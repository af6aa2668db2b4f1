"""Prompt(s) in, video out: encode, sample (cached or not), decode.

The convenience layer over the sampler: it needs a loaded model and, optionally, a
profile, so it sits above both ``ertacache.sampling`` and ``ertacache.profile`` (it
used to live in sampling, which made sampling and profile import each other).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ertacache.errors import UserError
from ertacache.models.loading import ModelBundle
from ertacache.profile.artifact import Profile
from ertacache.sampling.sampler import CachedSampler, initial_latents
from ertacache.sampling.settings import SampleSettings
from ertacache.sampling.sigmas import request_sigmas
from ertacache.sampling.steps import StepTables


@dataclass
class GenerationResult:
    latents: torch.Tensor  # (B, C, F', H', W') float32 (video family) or (B, C, H', W') (image family)
    frames: torch.Tensor | None  # (B, F, H, W, 3) uint8 (the decoder's output), None when decode=False
    sample_s: float  # wall time of the denoising loop alone
    full_steps: int
    steps: int


def sampler_for(bundle: ModelBundle, settings: SampleSettings, profile: Profile | None) -> CachedSampler:
    """The cached sampler of ``profile``, or plain Euler (all steps full, nominal sigmas) without one."""
    nominal = request_sigmas(bundle, settings)
    experts = bundle.experts(nominal, settings)  # a two-expert model's switch (None: one transformer)
    if profile is None:
        c = bundle.latent_shape(settings.frames, settings.height, settings.width)[0]
        tables = StepTables(nominal, n_branches=settings.n_branches, channels=c)
        mask = [True] * settings.steps
    else:
        profile.check_matches(model=bundle.model_id, fingerprint=bundle.fingerprint, steps=settings.steps,
                              height=settings.height, width=settings.width, frames=settings.frames)
        tables, mask = profile.tables(), profile.mask
        if experts is not None and profile.experts != experts:
            raise UserError(f"the profile was made with the experts {profile.experts}, this run asks for {experts} "
                            "(guidance scales or switch); use the profile's guidance scales or profile again")
    return CachedSampler(bundle.adapters, tables.to(bundle.device), mask, experts)


def generate(
    bundle: ModelBundle,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: SampleSettings,
    profile: Profile | None = None,
    decode: bool = True,
    images=None,
) -> GenerationResult:
    """Sample one video per (prompt, seed) pair in one batch (an image-to-video model: one image per prompt,
    (H, W, 3) uint8 arrays)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    sampler = sampler_for(bundle, settings, profile)
    shape = bundle.latent_shape(settings.frames, settings.height, settings.width)
    text = bundle.encode(list(prompts), settings.negative_prompt, sampler.tables.n_branches, images,
                         settings.video_size)
    noise = initial_latents(shape, seeds, bundle.device)
    start = time.perf_counter()
    result = sampler(noise, text, settings.guidance_scale)
    if bundle.device.type == "cuda":
        torch.cuda.synchronize(bundle.device)
    sample_s = time.perf_counter() - start
    frames = bundle.decoder.decode(result.latents) if decode else None
    return GenerationResult(result.latents, frames, sample_s, result.full_steps, settings.steps)
