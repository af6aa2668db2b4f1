"""The FLUX.1 adapter, family entry and eager sampler against diffusers' own FluxTransformer2DModel and FluxPipeline."""

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from ertacache.errors import UserError
from ertacache.models.adapter import adapter_for
from ertacache.models.family import EMBEDDED, IMAGE, family_for_model, family_named
from ertacache.models.flux import FluxLatentDecoder, image_ids, pack_latents, unpack_latents
from ertacache.sampling.sampler import CachedSampler
from ertacache.sampling.steps import StepTables


def tiny_flux(guidance_embeds: bool, seed: int = 0) -> FluxTransformer2DModel:
    """A random two-double, two-single-block FLUX transformer (head dim 8 = rope axes 2 + 2 + 4)."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=12,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    ).eval()


def _inputs(b=2, c=4, h=6, w=8, seq=5):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(b, c, h, w, generator=g)  # (B, C, H', W') unpacked
    cond = {"prompt_embeds": torch.randn(b, seq, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(b, 12, generator=g)}
    return latents, torch.tensor([0.8, 0.3]), cond


def test_pack_and_ids_match_flux_pipeline():
    latents = torch.randn(2, 4, 6, 8)
    packed = pack_latents(latents)  # (2, 12, 16)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), latents)
    vae_scale = 8
    assert torch.equal(unpack_latents(packed, 6, 8), FluxPipeline._unpack_latents(packed, 6 * vae_scale, 8 * vae_scale,
                                                                                    vae_scale))
    assert torch.equal(image_ids(3, 4), FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32))


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_split_equals_the_models_forward(guidance_embeds):
    model = tiny_flux(guidance_embeds)
    adapter = adapter_for(model)
    latents, sigma, cond = _inputs()
    if guidance_embeds:
        cond["guidance"] = torch.tensor([3.5])
    with torch.no_grad():
        ours = adapter.forward(latents, sigma, cond)  # (B, C, H', W')
        ref = model(hidden_states=pack_latents(latents), encoder_hidden_states=cond["prompt_embeds"],
                    pooled_projections=cond["pooled_prompt_embeds"], timestep=sigma,
                    img_ids=image_ids(3, 4), txt_ids=torch.zeros(5, 3),
                    guidance=cond["guidance"].expand(2) if guidance_embeds else None, return_dict=False)[0]
    assert ours.shape == latents.shape
    torch.testing.assert_close(ours, unpack_latents(ref, 6, 8), rtol=0, atol=1e-6)


def test_cached_step_needs_only_the_pooled_embedding_and_reuses_the_head():
    model = tiny_flux(True)
    adapter = adapter_for(model)
    latents, sigma, cond = _inputs()
    cond["guidance"] = torch.tensor([3.5])
    with torch.no_grad():
        full = adapter.pre(latents, sigma, cond)
        h = adapter.blocks(full)
        cached = adapter.pre(latents, sigma, {k: cond[k] for k in ("pooled_prompt_embeds", "guidance")})
        assert cached.block_inputs is None
        torch.testing.assert_close(adapter.head(h, cached), adapter.head(h, full), rtol=0, atol=0)
        assert adapter.modulated_input(full).shape == full.hidden.shape
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        adapter.pre(latents, sigma, {"prompt_embeds": cond["prompt_embeds"]})
    with pytest.raises(ValueError, match="full step"):
        adapter.blocks(cached)
    del cond["guidance"]
    with pytest.raises(UserError, match="guidance"):
        adapter.pre(latents, sigma, cond)


def test_family_entry_describes_flux():
    model = tiny_flux(False)
    family = family_for_model(model)
    assert family is family_named("flux")
    assert (family.latent_kind, family.packing, family.guidance, family.timestep_scale) == (IMAGE, 2, EMBEDDED, 1.0)
    assert family.input_names == ("prompt_embeds", "pooled_prompt_embeds")
    assert [c.name for c in family.conditioning if c.cached_step] == ["pooled_prompt_embeds"]
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1, shift_factor=0.1, scaling_factor=0.5).eval()
    decoder = FluxLatentDecoder(vae)
    layout = family.layout(decoder, adapter_for(model).patch_size, "flux-test")
    assert layout.latent_shape(2, 32, 48) == (2, 4, 16, 24)  # H' = 32 / 2: a 2-level VAE halves once
    with pytest.raises(UserError):
        layout.check(30, 48)  # not a multiple of VAE factor x packing
    frames = decoder.decode(torch.zeros(1, 4, 16, 24))
    assert frames.shape == (1, 1, 32, 48, 3) and frames.dtype == torch.uint8  # an image is a one-frame video


def _flux_pipeline(model: FluxTransformer2DModel) -> FluxPipeline:
    """FluxPipeline around ``model`` with FLUX.1's scheduler config; no text encoders or VAE (embeds are passed)."""
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    return FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_sampler_with_all_full_mask_equals_flux_pipeline(guidance_embeds):
    """The project's sampler (dynamic sigma table, sigma timesteps, embedded guidance) is FluxPipeline's loop."""
    model = tiny_flux(guidance_embeds)
    adapter = adapter_for(model)
    family = adapter.family
    steps, height, width = 4, 64, 64  # FluxPipeline without a VAE assumes factor 8: latents 8 x 8, 16 tokens
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 4, 8, 8, generator=g)  # (B, C, H', W')
    cond = {"prompt_embeds": torch.randn(2, 5, 32, generator=g), "pooled_prompt_embeds": torch.randn(2, 12, generator=g)}
    tables = StepTables(family.sigmas(steps, seq_len=16), n_branches=family.n_branches(3.5), channels=4)
    ours = CachedSampler(adapter, tables, [True] * steps)(noise, cond, 3.5).latents  # (B, C, H', W')
    with torch.no_grad():
        ref = _flux_pipeline(model)(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                                    height=height, width=width, num_inference_steps=steps, guidance_scale=3.5,
                                    latents=pack_latents(noise), output_type="latent", return_dict=False)[0]
    torch.testing.assert_close(ours, unpack_latents(ref, 8, 8), rtol=1e-4, atol=1e-4)
    assert not torch.equal(ours, noise)


def test_cached_step_reuses_the_residual_with_pooled_text_and_guidance():
    """A cached FLUX step = x + dt * head(pre(x, sigma, pooled + guidance) + the last full step's residual)."""
    model = tiny_flux(True)
    adapter = adapter_for(model)
    family = adapter.family
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(1, 4, 8, 8, generator=g)  # (B, C, H', W')
    cond = {"prompt_embeds": torch.randn(1, 5, 32, generator=g), "pooled_prompt_embeds": torch.randn(1, 12, generator=g)}
    sigmas = family.sigmas(3, seq_len=16)
    tables = StepTables(sigmas, n_branches=1, channels=4)
    ours = CachedSampler(adapter, tables, [True, False, True])(noise, cond, 2.0).latents
    s = torch.tensor(sigmas, dtype=torch.float32)
    guided = {**cond, "guidance": torch.tensor([2.0])}
    with torch.no_grad():
        pre0 = adapter.pre(noise, s[0].reshape(1), guided)
        h0 = adapter.blocks(pre0)
        x1 = noise + (s[1] - s[0]) * adapter.head(h0, pre0)
        pre1 = adapter.pre(x1, s[1].reshape(1), {k: guided[k] for k in ("pooled_prompt_embeds", "guidance")})
        x2 = x1 + (s[2] - s[1]) * adapter.head(pre1.hidden + (h0 - pre0.hidden), pre1)
        x3 = x2 + (s[3] - s[2]) * adapter.forward(x2, s[2].reshape(1), guided)
    torch.testing.assert_close(ours, x3, rtol=1e-5, atol=1e-5)


def test_sampler_names_missing_or_misshaped_flux_conditioning():
    model = tiny_flux(True)
    adapter = adapter_for(model)
    tables = StepTables(adapter.family.sigmas(2, seq_len=16), n_branches=1, channels=4)
    sampler = CachedSampler(adapter, tables, [True, False])
    noise = torch.zeros(2, 4, 8, 8)
    with pytest.raises(UserError, match=r"missing \['pooled_prompt_embeds'\]"):
        sampler(noise, {"prompt_embeds": torch.zeros(2, 5, 32)}, 2.0)
    with pytest.raises(UserError, match="pooled_prompt_embeds has 1 rows; expected 2"):
        sampler(noise, {"prompt_embeds": torch.zeros(2, 5, 32), "pooled_prompt_embeds": torch.zeros(1, 12)}, 2.0)
