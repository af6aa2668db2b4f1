"""The shipped testbed as a real diffusers WanPipeline: enable_ertacache on it equals ertacache's own sampler."""

import numpy as np
import torch
from diffusers import WanPipeline

from ertacache.integrations import TESTBED_NUM_FRAMES, enable_ertacache, encode_testbed_prompts, load_testbed_pipeline
from ertacache.models.loading import load_bundle
from ertacache.profile.artifact import Profile
from ertacache.sampling import CachedSampler, initial_latents, nominal_sigmas

STEPS = 6
MASK = [True, False, True, False, False, True]


def test_the_testbed_pipeline_with_ertacache_matches_our_sampler_and_decoder():
    bundle = load_bundle("wan2.1-tiny")
    d = bundle.recipe.defaults
    latent = bundle.latent_shape(d.frames, d.height, d.width)  # (C, F', H', W')
    c = latent[0]
    sig = nominal_sigmas(STEPS, d.shift).tolist()
    gen = torch.Generator().manual_seed(0)
    profile = Profile("wan2.1-tiny", bundle.fingerprint, STEPS, d.shift, d.height, d.width, d.frames, list(latent),
                      d.guidance_scale, 2, 0.1, MASK, sig, sig, [1.0] * STEPS,
                      0.01 * torch.randn(STEPS, 2, c, generator=gen), 0.01 * torch.randn(STEPS, 2, c, generator=gen),
                      {}, {})

    pipe = load_testbed_pipeline()
    assert type(pipe) is WanPipeline
    pipe.set_progress_bar_config(disable=True)
    enable_ertacache(pipe, profile)  # the fingerprint check passes: the same shipped weights
    embeds = encode_testbed_prompts(["digit 3 moving left", ""])  # (2, L, D): cond, uncond
    torch.testing.assert_close(embeds, bundle.encode(["digit 3 moving left"], "", 2), rtol=0, atol=0)
    noise = initial_latents(latent, [1])
    kwargs = dict(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], num_inference_steps=STEPS,
                  height=d.height, width=d.width, num_frames=TESTBED_NUM_FRAMES, guidance_scale=d.guidance_scale)
    got = pipe(latents=noise.clone(), output_type="latent", **kwargs).frames
    ours = CachedSampler(bundle.adapter, profile.tables(), profile.mask)(noise, embeds, d.guidance_scale).latents
    # the pipeline runs the model's forward, ours the adapter's split: the same operations in another order,
    # so equal up to float rounding (5.7e-6 on an AVX-512 machine, where other kernels are picked)
    torch.testing.assert_close(got, ours, rtol=0, atol=2e-5)

    video = pipe(latents=noise.clone(), output_type="np", **kwargs).frames  # (1, F, H, W, 3) in [0, 1]
    assert video.shape == (1, d.frames, d.height, d.width, 3)
    frames = bundle.decoder.decode(ours).numpy()  # (1, F, H, W, 3) uint8
    assert np.abs(video * 255 - frames.astype(np.float32)).max() <= 1.0
