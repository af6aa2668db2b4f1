import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
from torch.utils._python_dispatch import TorchDispatchMode

from ertacache.errors import UserError
from ertacache.sampling import CachedSampler, StepTables, initial_latents, nominal_sigmas

SHAPE = (4, 2, 8, 8)  # (C, F, H, W) latents of one sample


def plain_sampler(adapter, steps=6, n_branches=2):
    tables = StepTables(nominal_sigmas(steps, 3.0), n_branches=n_branches, channels=SHAPE[0])
    return CachedSampler(adapter, tables, [True] * steps)


def tiny_vae():
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True],
                            latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()


def test_uncached_sampler_equals_diffusers_wan_pipeline_with_euler(wan_model, wan_adapter):
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=wan_model, vae=tiny_vae(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    noise = initial_latents(SHAPE, [3])
    cond, uncond = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=64, width=64, num_frames=5,
                    num_inference_steps=6, guidance_scale=3.5, latents=noise.clone(), output_type="latent").frames
    got = plain_sampler(wan_adapter)(noise, torch.cat([cond, uncond]), 3.5).latents
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


def test_batch_samples_equal_solo_runs(wan_adapter):
    sampler = plain_sampler(wan_adapter)
    seeds = [11, 12, 13]
    cond, uncond = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    batch = sampler(initial_latents(SHAPE, seeds), torch.cat([cond, uncond]), 4.0).latents
    for k, seed in enumerate(seeds):
        solo = sampler(initial_latents(SHAPE, [seed]), torch.cat([cond[k:k + 1], uncond[k:k + 1]]), 4.0).latents
        torch.testing.assert_close(batch[k:k + 1], solo, rtol=0, atol=1e-5)


def test_cfg_in_one_batch_equals_two_separate_branches(wan_adapter):
    noise = initial_latents(SHAPE, [5])
    cond, uncond = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    g = 5.0
    batched = plain_sampler(wan_adapter, steps=1 + 1)(noise, torch.cat([cond, uncond]), g).latents
    # by hand: two single-branch velocities combined, same Euler table
    sig = torch.tensor(nominal_sigmas(2, 3.0), dtype=torch.float32)
    x = noise.clone()
    with torch.no_grad():
        for i in range(2):
            t = (sig[i] * 1000).reshape(1)
            v_c = wan_adapter.forward(x, t, cond)
            v_u = wan_adapter.forward(x, t, uncond)
            x = x + (sig[i + 1] - sig[i]) * (v_u + g * (v_c - v_u))
    torch.testing.assert_close(batched, x, rtol=0, atol=1e-5)


def test_guidance_one_runs_a_single_branch(wan_adapter):
    sampler = plain_sampler(wan_adapter, n_branches=1)
    out = sampler(initial_latents(SHAPE, [1]), torch.randn(1, 5, 16), 1.0)
    assert out.latents.shape == (1, *SHAPE)
    with pytest.raises(UserError, match="rows"):
        sampler(initial_latents(SHAPE, [1]), torch.randn(2, 5, 16), 1.0)


class _NoHostSync(TorchDispatchMode):
    """Fails on .item() / bool(tensor): both dispatch aten._local_scalar_dense."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host sync (.item()) inside the sampling loop")
        return func(*args, **(kwargs or {}))


def test_cached_loop_has_no_item_calls(wan_adapter):
    steps = 6
    tables = StepTables(nominal_sigmas(steps, 3.0), torch.rand(steps, 2, 4) * 0.01, torch.rand(steps, 2, 4) * 0.01)
    sampler = CachedSampler(wan_adapter, tables, [True, False, False, True, False, True])
    noise, text = initial_latents(SHAPE, [1]), torch.randn(2, 5, 16)
    with _NoHostSync():  # the one isfinite check after the loop syncs once; it is tested on its own below
        out = sampler(noise, text, 4.0, check_finite=False)
    assert out.full_steps == 3 and torch.isfinite(out.latents).all()


def test_mask_must_start_full_and_match_steps(wan_adapter):
    tables = StepTables(nominal_sigmas(4, 3.0), n_branches=2, channels=4)
    with pytest.raises(UserError, match="first step"):
        CachedSampler(wan_adapter, tables, [False, True, True, True])
    with pytest.raises(UserError, match="4 steps"):
        CachedSampler(wan_adapter, tables, [True, True])


def test_nan_in_the_eager_loop_names_the_step(wan_adapter):
    """A profile table with NaN at one reused step: the error names that step instead of returning NaN latents."""
    from ertacache.errors import NumericalError

    steps = 6
    a = torch.zeros(steps, 2, 4)
    a[4] = float("nan")
    sampler = CachedSampler(wan_adapter, StepTables(nominal_sigmas(steps, 3.0), a, torch.zeros(steps, 2, 4)),
                            [True, False, False, True, False, True])
    with pytest.raises(NumericalError, match=r"NaN/Inf in the latents after step 4 of 6 \(cached step"):
        sampler(initial_latents(SHAPE, [1]), torch.randn(2, 5, 16), 4.0)
