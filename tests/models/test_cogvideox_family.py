"""The CogVideoX family: its noise schedule is CogVideoXDDIMScheduler's, and the project's flow-matching sampler
with an all-full mask is CogVideoXPipeline's DDIM loop.

The sampler runs CogVideoX in flow-matching coordinates (ertacache/models/cogvideox.py); the pipeline runs
the model's own v-prediction DDIM. Equal final latents, for a 2B-style (sincos, SNR shift 3) and a 5B-style
(rotary, SNR shift 1) tiny random transformer with CFG, show that the change of variables is exact.
"""

import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

from ertacache.errors import UserError
from ertacache.models.adapter import adapter_for
from ertacache.models.cogvideox import VPNoiseSchedule, model_timestep_of
from ertacache.models.family import family_named
from ertacache.sampling import CachedSampler
from ertacache.sampling.steps import StepTables
from tests.models.test_cogvideox_adapter import LATENT, TEXT_DIM, TEXT_LEN, tiny_cogvideox

GUIDANCE = 6.0


def ddim(snr_shift_scale: float, **changes) -> CogVideoXDDIMScheduler:
    """CogVideoX's DDIM scheduler as the hub checkpoints configure it (2B: shift 3, 5B: shift 1)."""
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                  snr_shift_scale=snr_shift_scale, steps_offset=0, timestep_spacing="trailing")
    return CogVideoXDDIMScheduler(**{**config, **changes})


@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_the_noise_schedule_is_the_schedulers(shift):
    scheduler = ddim(shift)
    schedule = VPNoiseSchedule.from_config(dict(scheduler.config))
    np.testing.assert_allclose(schedule.alphas_cumprod(), scheduler.alphas_cumprod.numpy(), rtol=0, atol=1e-12)
    for steps in (10, 50):
        scheduler.set_timesteps(steps)
        np.testing.assert_array_equal(schedule.timesteps(steps), scheduler.timesteps.numpy())
        sigmas = schedule.sigmas(steps)
        assert sigmas.shape == (steps + 1,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0  # zero terminal SNR
        assert np.all(np.diff(sigmas) < 0)


def test_the_timestep_map_is_exact_at_every_integer_timestep():
    knots = torch.tensor(VPNoiseSchedule().timestep_sigmas(), dtype=torch.float32)
    t = model_timestep_of(knots, knots)
    assert torch.equal(t, torch.arange(1000, dtype=torch.float32))
    mid = model_timestep_of((knots[:-1] + knots[1:]) / 2, knots)  # between knots: between the integers
    assert bool(((mid > t[:-1]) & (mid < t[1:])).all())


def test_unsupported_scheduler_configs_and_step_counts_are_refused():
    with pytest.raises(UserError, match="prediction_type"):
        VPNoiseSchedule.from_config(dict(ddim(3.0, prediction_type="epsilon").config))
    with pytest.raises(UserError, match="timestep_spacing"):
        VPNoiseSchedule.from_config(dict(ddim(3.0, timestep_spacing="linspace").config))
    with pytest.raises(UserError, match="30 steps does not"):
        VPNoiseSchedule().sigmas(30)
    with pytest.raises(UserError, match="snr_shift_scale"):
        VPNoiseSchedule().check_shift(5.0)


def test_the_family_entry():
    model = tiny_cogvideox(False)
    family = adapter_for(model).family
    assert family is family_named("cogvideox")
    assert (family.timestep_scale, family.guidance, family.input_names) == (1.0, "cfg", ("text_embeds",))
    assert family.n_branches(GUIDANCE) == 2 and family.sigma_schedule.kind == "vp"
    with pytest.raises(ValueError, match="checkpoint's scheduler"):
        family.sigmas(10)


def _pipeline_latents(model, scheduler, noise, cond, uncond, steps):
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    _, _, f, h, w = noise.shape
    with torch.no_grad():
        out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=8 * h, width=8 * w,
                   num_frames=4 * (f - 1) + 1, num_inference_steps=steps, guidance_scale=GUIDANCE,
                   latents=noise.transpose(1, 2), output_type="latent", return_dict=False)[0]  # (B, F, C, H, W)
    return out.transpose(1, 2)  # (B, C, F, H, W)


@pytest.mark.parametrize("rotary,shift", [(False, 3.0), (True, 1.0)], ids=["2b", "5b"])
def test_sampler_with_all_full_mask_equals_the_cogvideox_pipeline(rotary, shift):
    model = tiny_cogvideox(rotary, snr_shift_scale=shift)
    adapter = adapter_for(model)
    steps = 10
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(2, *LATENT, generator=g)  # (B, C, F, H, W)
    cond, uncond = torch.randn(2, 2, TEXT_LEN, TEXT_DIM, generator=g)
    tables = StepTables(adapter.noise_schedule.sigmas(steps), n_branches=2, channels=LATENT[0])
    with torch.no_grad():
        ours = CachedSampler(adapter, tables, [True] * steps)(noise, torch.cat([cond, uncond]), GUIDANCE).latents
    ref = _pipeline_latents(model, ddim(shift), noise, cond, uncond, steps)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert (ours - noise).abs().max() > 0.1
