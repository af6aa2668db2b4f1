"""``enable_ertacache`` on a real diffusers ``FluxPipeline`` equals the project's own cached sampler.

The pipeline is built from a tiny ``FluxTransformer2DModel`` config (no text encoders or VAE: the
embeddings are passed in, latents come back packed). One profile is written by hand (a mask with
cached steps, an adjusted sigma table, so the test sees whether the pipeline runs the profile's
table, a K = 3 Lagrange predictor with a bias and a non-zero correction); another is calibrated
on FLUX's conditioning mapping, open and closed loop.
"""

import dataclasses

import numpy as np
import pytest
import torch

from ertacache.errors import UserError
from ertacache.integrations import disable_ertacache, enable_ertacache
from ertacache.models.adapter import adapter_for
from ertacache.models.flux import pack_latents, unpack_latents
from ertacache.models.loading import fingerprint_module
from ertacache.profile.artifact import Profile
from ertacache.profile.calibrate import CalibrationSet, calibrate
from ertacache.profile.config import CalibrationConfig
from ertacache.profile.predictor import PredictorConfig
from ertacache.profile.timeadjust import adjusted_sigmas
from ertacache.sampling import CachedSampler, initial_latents
from tests.export.fixtures import k3_profile
from tests.models.test_flux_adapter import _flux_pipeline, tiny_flux

STEPS = 8
MASK = [True, True, True, False, False, True, False, True]
SEQ = 16  # 64 x 64 pixels -> 8 x 8 latents (FluxPipeline's factor 8 without a VAE) -> 4 x 4 packed tokens
GUIDANCE = 3.5


def flux_profile(model, guidance_embeds: bool) -> Profile:
    adapter = adapter_for(model)
    nominal = adapter.family.sigmas(STEPS, seq_len=SEQ)  # (T + 1,) FLUX's dynamic shift for 16 tokens
    phi = np.where(MASK, 1.0, 0.9)  # cached steps shortened, so the table differs from the nominal one
    g = torch.Generator().manual_seed(5)
    corr_a = 0.02 * torch.randn(STEPS, 1, 4, generator=g)  # (T, nb, C)
    corr_b = 0.02 * torch.randn(STEPS, 1, 4, generator=g)
    base = Profile("flux-tiny-test", fingerprint_module(model), STEPS, 1.0, 64, 64, None, [4, 8, 8], GUIDANCE, 1,
                   0.1, list(MASK), list(nominal), list(adjusted_sigmas(np.asarray(nominal), phi)), list(phi),
                   corr_a, corr_b, {}, {}, guidance="embedded")
    width = model.config.num_attention_heads * model.config.attention_head_dim
    return k3_profile(base, width, MASK)


def _inputs():
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(1, 4, 8, 8, generator=g)  # (B, C, H', W')
    cond = {"prompt_embeds": torch.randn(1, 5, 32, generator=g), "pooled_prompt_embeds": torch.randn(1, 12, generator=g)}
    return noise, cond


def _run(pipe, noise, cond, **kwargs):
    args = dict(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"], height=64,
                width=64, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=pack_latents(noise),
                output_type="latent", return_dict=False)
    with torch.no_grad():
        return unpack_latents(pipe(**{**args, **kwargs})[0], 8, 8)  # (B, 4C, ...) tokens -> (B, C, H', W')


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev-style", "schnell-style"])
def test_enable_ertacache_on_flux_pipeline_equals_our_cached_sampler(guidance_embeds):
    model = tiny_flux(guidance_embeds)
    profile = flux_profile(model, guidance_embeds)
    pipe = _flux_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    noise, cond = _inputs()

    enable_ertacache(pipe, profile)
    got = _run(pipe, noise, cond)
    again = _run(pipe, noise, cond)  # the step comes from the timestep: nothing carries over between calls
    with torch.no_grad():
        ours = CachedSampler(adapter_for(model), profile.tables(), profile.mask)(noise, cond, GUIDANCE).latents
    torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)

    disable_ertacache(pipe)
    plain = _run(pipe, noise, cond)
    assert (plain - got).abs().max() > 1e-4  # caching changed the result, and disabling removed it
    reuse = dataclasses.replace(profile, pred_w=None, pred_b=None,
                                predictor={"kind": "reuse", "order": 0, "history": 1})
    enable_ertacache(pipe, reuse)
    assert (_run(pipe, noise, cond) - got).abs().max() > 1e-4  # the hook followed the K = 3 predictor


def test_flux_pipeline_calls_the_profile_was_not_made_for_are_refused():
    model = tiny_flux(True)
    pipe = _flux_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    noise, cond = _inputs()
    enable_ertacache(pipe, flux_profile(model, True))
    with pytest.raises(UserError, match="num_inference_steps=8"):
        _run(pipe, noise, cond, num_inference_steps=4)
    with pytest.raises(UserError, match="guidance_scale=3.5"):
        _run(pipe, noise, cond, guidance_scale=5.0)
    with pytest.raises(UserError, match="without true CFG"):
        _run(pipe, noise, cond, true_cfg_scale=2.0, negative_prompt_embeds=cond["prompt_embeds"],
             negative_pooled_prompt_embeds=cond["pooled_prompt_embeds"])


@pytest.mark.parametrize("loop", ["open", "closed"])
def test_a_profile_calibrated_on_flux_conditioning_runs_in_the_pipeline(loop):
    """Calibration takes FLUX's mapping (T5 states, pooled vector; the guidance scale embedded): the
    profile it fits caches steps, fits phi and a correction, and the hooked pipeline equals the sampler."""
    model = tiny_flux(True)
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(2)
    prompts = 4
    text = {"prompt_embeds": torch.randn(prompts, 5, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(prompts, 12, generator=g)}  # (P, L, D_t5), (P, D_clip)
    nominal = adapter.family.sigmas(STEPS, seq_len=SEQ)
    cal = CalibrationSet(adapter, initial_latents((4, 8, 8), range(prompts)), text, GUIDANCE, nominal, n_branches=1)
    config = CalibrationConfig(speedup=1.6, loop=loop, predictor=PredictorConfig(kind="taylor", order=1),
                               batch_size=2)
    outcome = calibrate(cal, config, progress=False, log=lambda s: None)
    res = outcome.result
    assert sum(res.mask) == config.target_full_steps(STEPS) < STEPS
    assert outcome.uncached_passes <= 3.0 + 1e-9
    assert res.corr_a.abs().sum() > 0  # the rectification was fitted on the cached steps
    profile = Profile("flux-tiny-test", fingerprint_module(model), STEPS, 1.0, 64, 64, None, [4, 8, 8], GUIDANCE, 1,
                      outcome.lam, list(res.mask), list(nominal), list(res.sigmas), list(res.phi), res.corr_a,
                      res.corr_b, {}, {}, pred_w=res.pred_w, pred_b=res.pred_b,
                      predictor=config.predictor.describe(), guidance="embedded")

    pipe = _flux_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    noise, cond = _inputs()
    enable_ertacache(pipe, profile)
    got = _run(pipe, noise, cond)
    with torch.no_grad():
        ours = CachedSampler(adapter, profile.tables(), profile.mask)(noise, cond, GUIDANCE).latents
    torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-5)


def test_true_cfg_profile_drives_flux_pipelines_true_cfg():
    """A FLUX model without the guidance embedder, profiled with CFG (the flux-tiny testbed's mode): the
    pipeline's true CFG (a "cond" and an "uncond" call per step) equals the sampler's batched branches."""
    model = tiny_flux(False)
    adapter = adapter_for(model)
    base = flux_profile(model, False)
    g = torch.Generator().manual_seed(6)
    c = 4
    profile = dataclasses.replace(base, n_branches=2, guidance="cfg", guidance_scale=2.5,
                                  corr_a=0.02 * torch.randn(STEPS, 2, c, generator=g),
                                  corr_b=0.02 * torch.randn(STEPS, 2, c, generator=g))
    pipe = _flux_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    noise, cond = _inputs()
    neg = {"prompt_embeds": torch.randn(1, 5, 32, generator=g), "pooled_prompt_embeds": torch.randn(1, 12, generator=g)}
    enable_ertacache(pipe, profile)
    got = _run(pipe, noise, cond, true_cfg_scale=2.5, negative_prompt_embeds=neg["prompt_embeds"],
               negative_pooled_prompt_embeds=neg["pooled_prompt_embeds"])
    rows = {k: torch.cat([cond[k], neg[k]]) for k in cond}  # cond rows, then uncond rows
    with torch.no_grad():
        ours = CachedSampler(adapter, profile.tables(), profile.mask)(noise, rows, 2.5).latents
    torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="made no 'uncond' call at step 0.*true_cfg_scale=2.5"):  # no negative prompt
        _run(pipe, noise, cond)
