"""``enable_ertacache`` on a real diffusers ``CogVideoXPipeline`` equals the project's own cached sampler.

CogVideoXPipeline batches both CFG branches in one transformer call (``cache_context("cond_uncond")``, uncond
rows first) and steps with a DDIM scheduler. Under the hook the pipeline steps with the profile's
flow-matching table instead, and the adapter maps the calls into CogVideoX's own coordinates. The profile
is written by hand: cached steps, an adjusted sigma table (fractional model timesteps), a K = 3 Lagrange
predictor with a bias, a non-zero correction per branch.
"""

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline

from ertacache.errors import UserError
from ertacache.integrations import disable_ertacache, enable_ertacache
from ertacache.models.adapter import adapter_for
from ertacache.models.loading import fingerprint_module
from ertacache.profile.artifact import Profile
from ertacache.profile.timeadjust import adjusted_sigmas
from ertacache.sampling import CachedSampler
from tests.export.fixtures import k3_profile
from tests.models.test_cogvideox_adapter import LATENT, TEXT_DIM, TEXT_LEN, tiny_cogvideox
from tests.models.test_cogvideox_family import GUIDANCE, ddim

STEPS = 10
MASK = [True, True, True, False, False, True, False, True, False, True]


def cogvideox_profile(model, n_branches: int = 2) -> Profile:
    adapter = adapter_for(model)
    nominal = adapter.noise_schedule.sigmas(STEPS)  # (T + 1,)
    phi = np.where(MASK, 1.0, 0.9)  # cached steps shortened: the table differs from the nominal one
    g = torch.Generator().manual_seed(5)
    corr_a = 0.02 * torch.randn(STEPS, n_branches, LATENT[0], generator=g)  # (T, nb, C)
    corr_b = 0.02 * torch.randn(STEPS, n_branches, LATENT[0], generator=g)
    f, h, w = LATENT[1:]
    base = Profile("cogvideox-tiny-test", fingerprint_module(model), STEPS, adapter.noise_schedule.snr_shift_scale,
                   8 * h, 8 * w, 4 * (f - 1) + 1, list(LATENT), GUIDANCE, n_branches, 0.1, list(MASK), list(nominal),
                   list(adjusted_sigmas(np.asarray(nominal), phi)), list(phi), corr_a, corr_b, {}, {})
    width = model.config.num_attention_heads * model.config.attention_head_dim
    return k3_profile(base, width, MASK)


def _inputs():
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(2, *LATENT, generator=g)  # (B, C, F, H, W)
    cond, uncond = torch.randn(2, 2, TEXT_LEN, TEXT_DIM, generator=g)
    return noise, cond, uncond


def _run(pipe, noise, cond, uncond, **kwargs):
    _, _, f, h, w = noise.shape
    args = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, height=8 * h, width=8 * w, num_frames=4 * (f - 1) + 1,
                num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise.transpose(1, 2),
                output_type="latent", return_dict=False)
    with torch.no_grad():
        return pipe(**{**args, **kwargs})[0].transpose(1, 2)  # (B, F, C, H, W) -> (B, C, F, H, W)


@pytest.mark.parametrize("rotary", [False, True], ids=["2b", "5b"])
def test_enable_ertacache_on_cogvideox_pipeline_equals_our_cached_sampler(rotary):
    model = tiny_cogvideox(rotary)
    profile = cogvideox_profile(model)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=ddim(3.0))
    pipe.set_progress_bar_config(disable=True)
    noise, cond, uncond = _inputs()
    plain = _run(pipe, noise, cond, uncond)

    enable_ertacache(pipe, profile)
    got = _run(pipe, noise, cond, uncond)
    again = _run(pipe, noise, cond, uncond)  # the step comes from the timestep: nothing carries over between calls
    with torch.no_grad():
        ours = CachedSampler(adapter_for(model), profile.tables(), profile.mask)(
            noise, torch.cat([cond, uncond]), GUIDANCE).latents
    torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    assert (plain - got).abs().max() > 1e-3  # caching (and the adjusted table) changed the result

    disable_ertacache(pipe)
    torch.testing.assert_close(_run(pipe, noise, cond, uncond), plain, rtol=0, atol=0)  # DDIM again


def test_a_cfg_profile_refuses_a_pipeline_call_without_cfg():
    model = tiny_cogvideox(False)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=ddim(3.0))
    pipe.set_progress_bar_config(disable=True)
    enable_ertacache(pipe, cogvideox_profile(model))
    noise, cond, uncond = _inputs()
    with pytest.raises(UserError, match="batched call has 1 rows"):
        _run(pipe, noise[:1], cond[:1], uncond[:1], guidance_scale=1.0)
