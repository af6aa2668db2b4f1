"""The runtime against eager PyTorch on the same inputs: agreement, and fidelity against uncached sampling.

The eager reference is :class:`ertacache.sampling.CachedSampler` with the profile's tables, so it
runs the profile's predictor over the same K full-step residuals the runtime's ring holds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ertacache.export.runners import relative_l2
from ertacache.metrics import psnr
from ertacache.models.adapter import ModelAdapter, adapter_list
from ertacache.profile.artifact import Profile
from ertacache.runtime.runtime import Runtime
from ertacache.sampling.sampler import CachedSampler
from ertacache.sampling.steps import Conditioning, StepTables, move_conditioning


@dataclass
class VerifyReport:
    backend: str
    dtype: str
    rel_l2: float  # runtime vs eager cached sampler, final latents
    max_abs: float
    tolerance: float
    psnr_vs_uncached: float | None  # runtime's decoded video vs eager uncached, dB
    eager_psnr_vs_uncached: float | None  # eager cached vs eager uncached (what caching itself costs)
    full_steps: int
    steps: int
    history: int = 1  # K: the full-step residuals the cached step read
    predictor: str = "reuse"  # the profile's predictor kind

    @property
    def ok(self) -> bool:
        return self.rel_l2 <= self.tolerance

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


#: default bound per dtype: fp32 is exact up to kernel differences; half precision is reported, loosely bounded
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


def verify_runtime(rt: Runtime, adapter: ModelAdapter | list[ModelAdapter], profile: Profile, noise: torch.Tensor,
                   text: Conditioning, decoder=None, tolerance: float | None = None) -> VerifyReport:
    """Run ``rt`` and the eager samplers (cached, uncached) on ``noise`` / ``text``; compare.

    ``adapter``: one per expert (a list) for a two-expert folder; both samplers then run each step
    on its expert with that expert's CFG scale, as the runtime does.
    """
    m = rt.manifest
    adapters = adapter_list(adapter)
    device = next(adapters[0].model.parameters()).device
    noise_d, text_d = noise.to(device), move_conditioning(text, device)
    cached = CachedSampler(adapters, profile.tables().to(device), profile.mask, profile.experts)
    ref = cached(noise_d, text_d, profile.guidance_scale).latents
    got = rt.sample(noise.to(rt.device), move_conditioning(text, rt.device)).clone().to(ref.device)
    row = dict(rel_l2=relative_l2(got, ref), max_abs=float((got - ref).abs().max()))
    p_rt = p_eager = None
    if decoder is not None:
        channels = profile.latent_shape[0]
        # the profile's own nominal table: the family's schedule at the profiled size
        plain = CachedSampler(adapters, StepTables(profile.nominal_sigmas,
                                                   n_branches=profile.n_branches, channels=channels).to(device),
                              [True] * profile.steps, profile.experts)
        uncached = decoder.decode(plain(noise_d, text_d, profile.guidance_scale).latents).cpu().numpy()
        frames = (rt.decode() if rt.has_decode else decoder.decode(got)).cpu().numpy()
        p_rt = psnr(uncached, frames)
        p_eager = psnr(uncached, decoder.decode(ref).cpu().numpy())
    tol = tolerance if tolerance is not None else TOLERANCES[m.dtype]
    return VerifyReport(rt.backend, m.dtype, row["rel_l2"], row["max_abs"], tol, p_rt, p_eager,
                        sum(profile.mask), profile.steps, profile.history, str(profile.predictor.get("kind")))
