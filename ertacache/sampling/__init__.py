"""Flow-matching Euler sampling with CFG, and the two step modules caching alternates between."""

from ertacache.sampling.sigmas import nominal_sigmas, validate_sigma_table
from ertacache.sampling.steps import CachedStep, FullStep, StepTables
from ertacache.sampling.sampler import CachedSampler, initial_latents

__all__ = [
    "nominal_sigmas",
    "validate_sigma_table",
    "StepTables",
    "FullStep",
    "CachedStep",
    "CachedSampler",
    "initial_latents",
]
