import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from ertacache.errors import UserError
from ertacache.integrations import disable_ertacache, enable_ertacache
from ertacache.models.loading import fingerprint_module
from ertacache.profile.config import CalibrationConfig
from ertacache.profile.artifact import Profile
from ertacache.profile.calibrate import CalibrationSet, calibrate
from ertacache.sampling import CachedSampler, initial_latents, nominal_sigmas
from tests.sampling.test_sampler import tiny_vae

STEPS = 10
LATENT = (4, 2, 8, 8)  # frames 5, 64 x 64 pixels through the tiny Wan VAE


def make_profile(model, adapter) -> Profile:
    cal = CalibrationSet(adapter, initial_latents(LATENT, range(3)), torch.randn(6, 5, 16), 4.0,
                         nominal_sigmas(STEPS, 3.0))
    res = calibrate(cal, CalibrationConfig(speedup=2.0, loop="open"), progress=False, log=lambda s: None).result
    return Profile("tiny", fingerprint_module(model), STEPS, 3.0, 64, 64, 5, list(LATENT), 4.0, 2, 0.1,
                   list(res.mask), list(cal.nominal_sigmas), list(res.sigmas), list(res.phi), res.corr_a,
                   res.corr_b, {}, {})


def test_enable_ertacache_on_wan_pipeline_equals_our_cached_sampler(wan_model, wan_adapter):
    profile = make_profile(wan_model, wan_adapter)
    assert 0 < profile.full_steps < STEPS
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=wan_model, vae=tiny_vae(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    noise = initial_latents(LATENT, [7])
    cond, uncond = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    kwargs = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, height=64, width=64, num_frames=5,
                  guidance_scale=4.0, output_type="latent")

    enable_ertacache(pipe, profile)
    got = pipe(num_inference_steps=STEPS, latents=noise.clone(), **kwargs).frames
    again = pipe(num_inference_steps=STEPS, latents=noise.clone(), **kwargs).frames  # state resets between calls
    ours = CachedSampler(wan_adapter, profile.tables(), profile.mask)(noise, torch.cat([cond, uncond]), 4.0).latents
    torch.testing.assert_close(got, ours, rtol=0, atol=5e-6)
    torch.testing.assert_close(again, got, rtol=0, atol=0)

    with pytest.raises(UserError, match="num_inference_steps=10"):
        pipe(num_inference_steps=20, latents=noise.clone(), **kwargs)

    disable_ertacache(pipe)
    plain = pipe(num_inference_steps=STEPS, latents=noise.clone(), **kwargs).frames
    assert (plain - got).abs().max() > 1e-4  # caching changed something, and disabling removed it
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler


def test_the_hook_follows_a_k3_predictor(wan_model, wan_adapter):
    """A K = 3 Lagrange predictor profile: the pipeline hook keeps three residuals per branch, as the sampler does."""
    from tests.export.fixtures import k3_profile

    base = make_profile(wan_model, wan_adapter)
    mask = [True, True, True, False, False, True, False, True, False, True]
    profile = k3_profile(base, wan_model.config.num_attention_heads * wan_model.config.attention_head_dim, mask)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=wan_model, vae=tiny_vae(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    noise = initial_latents(LATENT, [7])
    cond, uncond = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    enable_ertacache(pipe, profile)
    got = pipe(num_inference_steps=STEPS, latents=noise.clone(), prompt_embeds=cond, negative_prompt_embeds=uncond,
               height=64, width=64, num_frames=5, guidance_scale=4.0, output_type="latent").frames
    ours = CachedSampler(wan_adapter, profile.tables(), profile.mask)(noise, torch.cat([cond, uncond]), 4.0).latents
    torch.testing.assert_close(got, ours, rtol=0, atol=5e-6)
    reuse = CachedSampler(wan_adapter, base.tables(), mask)(noise, torch.cat([cond, uncond]), 4.0).latents
    assert (reuse - got).abs().max() > 1e-4  # the predictor changed the result: the test compares something
    disable_ertacache(pipe)
    # step 2 cached after two full steps: the order-1 extrapolation from them (0 on the third slot), as the sampler
    early = k3_profile(base, wan_model.config.num_attention_heads * wan_model.config.attention_head_dim,
                       [True, True, False, True, False, True, False, True, False, True])
    assert early.pred_w[2, :, 0].tolist() == [2.0, -1.0, 0.0]
    enable_ertacache(pipe, early)
    got = pipe(num_inference_steps=STEPS, latents=noise.clone(), prompt_embeds=cond, negative_prompt_embeds=uncond,
               height=64, width=64, num_frames=5, guidance_scale=4.0, output_type="latent").frames
    ours = CachedSampler(wan_adapter, early.tables(), early.mask)(noise, torch.cat([cond, uncond]), 4.0).latents
    torch.testing.assert_close(got, ours, rtol=0, atol=5e-6)
    disable_ertacache(pipe)
    early.pred_w[2, :, 0] = torch.tensor([3.0, -3.0, 1.0])  # reads a third slot no full step has filled yet
    with pytest.raises(UserError, match="step 2 is cached after 2 full step.*slot 3 of 3, which holds no residual"):
        enable_ertacache(pipe, early)


def test_profile_for_other_weights_is_refused(wan_model, wan_adapter):
    from tests.conftest import tiny_wan

    profile = make_profile(wan_model, wan_adapter)
    other = WanPipeline(tokenizer=None, text_encoder=None, transformer=tiny_wan(seed=9), vae=tiny_vae(),
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    with pytest.raises(UserError, match="profile this model first"):
        enable_ertacache(other, profile)


def test_a_profile_of_another_family_is_refused(wan_model, wan_adapter):
    """An image family's profile (embedded guidance, 3-axis latents) on a Wan pipeline: refused before any hook."""
    profile = dataclasses.replace(make_profile(wan_model, wan_adapter), guidance="embedded", n_branches=1,
                                  frames=None, latent_shape=[4, 8, 8])
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=wan_model, vae=tiny_vae(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    with pytest.raises(UserError, match="another model family than this pipeline's WanTransformer3DModel"):
        enable_ertacache(pipe, profile)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and not hasattr(pipe, "_ertacache_original_scheduler")
