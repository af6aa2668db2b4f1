"""``enable_ertacache`` on a real diffusers ``HunyuanVideoPipeline`` equals the project's own cached sampler.

The pipeline wraps a tiny random ``HunyuanVideoTransformer3DModel`` (no text encoders or VAE: the
embeddings and the mask are passed in). The profile is written by hand: a mask with cached steps,
an adjusted sigma table (so the test sees whether the pipeline runs the profile's table), a K = 3
Lagrange predictor with a bias and a non-zero correction.
"""

import numpy as np
import pytest
import torch

from ertacache.errors import UserError
from ertacache.integrations import disable_ertacache, enable_ertacache
from ertacache.models.adapter import adapter_for
from ertacache.models.loading import fingerprint_module
from ertacache.profile.artifact import Profile
from ertacache.profile.timeadjust import adjusted_sigmas
from ertacache.sampling import CachedSampler
from tests.export.fixtures import k3_profile
from tests.models.test_hunyuan_video import GUIDANCE, SHIFT, hunyuan_cond, hunyuan_pipeline, tiny_hunyuan

STEPS = 8
MASK = [True, True, True, False, False, True, False, True]
LATENT = (4, 3, 8, 8)  # (C, F', H', W'): 9 frames of 64 x 64 (the pipeline's factors 4 and 8 without a VAE)


def hunyuan_profile(model, n_branches: int = 1, guidance: str = "embedded", guidance_scale: float = GUIDANCE) -> Profile:
    adapter = adapter_for(model)
    nominal = adapter.family.sigmas(STEPS, shift=SHIFT)  # (T + 1,)
    phi = np.where(MASK, 1.0, 0.9)  # cached steps shortened, so the table differs from the nominal one
    g = torch.Generator().manual_seed(5)
    corr_a = 0.02 * torch.randn(STEPS, n_branches, LATENT[0], generator=g)  # (T, nb, C)
    corr_b = 0.02 * torch.randn(STEPS, n_branches, LATENT[0], generator=g)
    base = Profile("hunyuan-tiny-test", fingerprint_module(model), STEPS, SHIFT, 64, 64, 9, list(LATENT),
                   guidance_scale, n_branches, 0.1, list(MASK), list(nominal),
                   list(adjusted_sigmas(np.asarray(nominal), phi)), list(phi), corr_a, corr_b, {}, {},
                   guidance=guidance)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    return k3_profile(base, width, MASK)


def _inputs():
    noise = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(11))  # (B, C, F', H', W')
    return noise, hunyuan_cond(1, seed=12)


def _run(pipe, noise, cond, **kwargs):
    args = dict(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                prompt_attention_mask=cond["prompt_attention_mask"].long(), height=64, width=64, num_frames=9,
                num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise, output_type="latent",
                return_dict=False)
    with torch.no_grad():
        return pipe(**{**args, **kwargs})[0]


def test_enable_ertacache_on_hunyuan_pipeline_equals_our_cached_sampler():
    model = tiny_hunyuan()
    profile = hunyuan_profile(model)
    pipe = hunyuan_pipeline(model)
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
    with pytest.raises(UserError, match="guidance_scale=6"):
        enable_ertacache(pipe, profile)
        _run(pipe, noise, cond, guidance_scale=3.0)


def test_true_cfg_profile_drives_the_pipelines_true_cfg():
    """A profile made with CFG: the pipeline's true CFG (a "cond" and an "uncond" call per step, the
    guidance embedding fed the same scale) equals the sampler's batched branches."""
    model = tiny_hunyuan()
    profile = hunyuan_profile(model, n_branches=2, guidance="cfg", guidance_scale=2.5)
    pipe = hunyuan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    noise, cond = _inputs()
    neg = hunyuan_cond(1, seed=13, real=(2,))
    enable_ertacache(pipe, profile)
    got = _run(pipe, noise, cond, true_cfg_scale=2.5, guidance_scale=2.5, negative_prompt_embeds=neg["prompt_embeds"],
               negative_pooled_prompt_embeds=neg["pooled_prompt_embeds"],
               negative_prompt_attention_mask=neg["prompt_attention_mask"].long())
    rows = {k: torch.cat([cond[k], neg[k]]) for k in cond}  # cond rows, then uncond rows
    with torch.no_grad():
        ours = CachedSampler(adapter_for(model), profile.tables(), profile.mask)(noise, rows, 2.5).latents
    torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-5)
