"""From a loaded model and calibration prompts to a saved-ready :class:`Profile`."""

from __future__ import annotations

import platform
import time
from typing import Callable, Sequence

import torch

from ertacache.errors import UserError
from ertacache.models.images import images_for
from ertacache.models.loading import ModelBundle
from ertacache.profile.artifact import Profile
from ertacache.profile.calibrate import CalibrationOutcome, CalibrationSet, calibrate
from ertacache.profile.config import CalibrationConfig
from ertacache.sampling.sampler import initial_latents
from ertacache.sampling.settings import SampleSettings
from ertacache.sampling.sigmas import request_sigmas
from ertacache.sampling.steps import move_conditioning


#: a calibration prompts file is a few kilobytes; anything past this is not one
MAX_PROMPTS_FILE_BYTES = 16 << 20


def read_prompts_file(path) -> list[str]:
    """One prompt per line; blank lines and '#' comments are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_PROMPTS_FILE_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"prompts file {path} does not exist; give a text file with one prompt per line") from None
    except IsADirectoryError:
        raise UserError(f"prompts file {path} is a folder; give a text file with one prompt per line") from None
    except UnicodeDecodeError:
        raise UserError(f"prompts file {path} is not UTF-8 text; give a text file with one prompt per line") from None
    except OSError as e:
        raise UserError(f"prompts file {path} cannot be read ({e.strerror})") from None
    if len(text) > MAX_PROMPTS_FILE_BYTES or "\x00" in text:
        raise UserError(f"prompts file {path} is binary or larger than {MAX_PROMPTS_FILE_BYTES >> 20} MB; give a "
                        "text file with one prompt per line")
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"prompts file {path} holds no prompt; put one prompt per line")
    return prompts


def calibration_set(
    bundle: ModelBundle, prompts: Sequence[str], settings: SampleSettings, seed: int = 0, images=None
) -> CalibrationSet:
    """Noise (seeds seed, seed+1, ...) and text embeddings for the calibration prompts.

    An image-to-video model pairs each prompt with an image: ``images`` (cycled) or the built-in
    sample photographs (:func:`ertacache.models.images.images_for`).

    Both stay in host memory: the passes move one micro-batch at a time to the model's device,
    so device memory does not grow with the number of prompts (an image-to-video model's images are
    encoded one at a time, then kept on the host with the text).
    """
    if not prompts:
        raise UserError("no calibration prompts: pass --prompts FILE with one prompt per line")
    shape = bundle.latent_shape(settings.frames, settings.height, settings.width)
    nb = settings.n_branches
    size = settings.video_size
    nominal = request_sigmas(bundle, settings)
    return CalibrationSet(
        adapter=bundle.adapter,
        experts=bundle.experts(nominal, settings),
        more_adapters=tuple(bundle.adapters[1:]),
        latents=initial_latents(shape, [seed + k for k in range(len(prompts))], "cpu"),
        text_embeds=move_conditioning(bundle.encode(list(prompts), settings.negative_prompt, nb,
                                                    images_for(bundle.family, len(prompts), images, size=size),
                                                    size), "cpu"),
        guidance_scale=settings.guidance_scale,
        nominal_sigmas=nominal,
        n_branches=nb,
    )


def build_profile(
    bundle: ModelBundle,
    config: CalibrationConfig,
    settings: SampleSettings,
    prompts: Sequence[str],
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    images=None,
) -> Profile:
    """Calibrate ``bundle`` on ``prompts`` (with ``images`` for an image-to-video model) and return the profile
    (not yet saved)."""
    if config.speedup is not None:
        config.target_full_steps(settings.steps)  # refuse an impossible speedup before any compute
    cal = calibration_set(bundle, prompts, settings, seed, images)
    if config.speedup is not None and cal.experts.count > 1:  # each expert's warm-up counts too: refuse before any pass
        target, forced = config.target_full_steps(settings.steps), int(cal.forced(config).sum())
        if forced > target:
            raise UserError(f"--speedup {config.speedup:g} leaves {target} full steps of {settings.steps}, but the two "
                            f"experts force {forced} (each starts with {config.warmup_steps} full steps, and the "
                            "last step computes); lower --speedup, raise --steps or lower --predictor-order")
    start = time.perf_counter()
    outcome = calibrate(cal, config, progress=progress, log=log)
    return profile_from_outcome(outcome, cal, config, settings, bundle.model_id, bundle.fingerprint, prompts, seed,
                                wall_s=time.perf_counter() - start, dtype=bundle.dtype)


def profile_from_outcome(
    outcome: CalibrationOutcome,
    cal: CalibrationSet,
    config: CalibrationConfig,
    settings: SampleSettings,
    model_id: str,
    fingerprint: str,
    prompts: Sequence[str],
    seed: int,
    wall_s: float,
    dtype: torch.dtype,
) -> Profile:
    """The :class:`Profile` of a finished calibration, with its provenance (no model loading needed)."""
    res = outcome.result
    return Profile(
        model=model_id,
        model_fingerprint=fingerprint,
        steps=settings.steps,
        shift=settings.shift,
        height=settings.height,
        width=settings.width,
        frames=settings.frames,
        latent_shape=list(cal.latents.shape[1:]),
        guidance_scale=settings.guidance_scale,
        n_branches=settings.n_branches,
        lam=float(outcome.lam),
        mask=list(res.mask),
        nominal_sigmas=[float(s) for s in cal.nominal_sigmas],
        sigmas=[float(s) for s in res.sigmas],
        phi=[float(p) for p in res.phi],
        corr_a=res.corr_a,
        corr_b=res.corr_b,
        config=config.to_dict(),
        calibration={
            "prompts": list(prompts),
            "num_prompts": len(prompts),
            "seeds": [seed, seed + len(prompts) - 1],
            "negative_prompt": settings.negative_prompt,
            "wall_s": round(wall_s, 3),
            "device": str(cal.device),
            "dtype": str(dtype).replace("torch.", ""),
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
        stats={
            "residual_error": res.residual_error.tolist(),
            "residual_change": res.residual_change.tolist(),
            "velocity_error": res.velocity_error.tolist(),
            "velocity_change": res.velocity_change.tolist(),
        },
        speedup_target=config.speedup,
        pred_w=res.pred_w,
        pred_b=res.pred_b,
        predictor={**config.predictor.describe(), "phi_rule": config.phi_rule, "phi_at_bound": res.phi_at_bound,
                   "uncached_passes": round(outcome.uncached_passes, 3)},
        guidance=settings.guidance,
        experts=cal.experts if cal.experts.count > 1 else None,
    )
