"""The HunyuanVideo adapter, family entry and eager sampler against diffusers' own HunyuanVideoTransformer3DModel
and HunyuanVideoPipeline (tiny random configs: fidelity needs trained weights, these check the wiring)."""

import pytest
import torch
from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                       HunyuanVideoTransformer3DModel)

from ertacache.errors import UserError
from ertacache.models.adapter import adapter_for
from ertacache.models.family import EMBEDDED, VIDEO, family_for_model, family_named
from ertacache.models.hunyuan_video import HunyuanLatentDecoder, joint_attention_mask
from ertacache.sampling.sampler import CachedSampler
from ertacache.sampling.steps import StepTables

TEXT_DIM, POOLED_DIM, SEQ = 16, 8, 7
SHIFT, GUIDANCE = 7.0, 6.0


def tiny_hunyuan(guidance_embeds: bool = True, seed: int = 0, **changes) -> HunyuanVideoTransformer3DModel:
    """A random one-double, one-single-block HunyuanVideo transformer (head dim 8 = rope axes 2 + 2 + 4)."""
    torch.manual_seed(seed)
    config = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                  num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                  text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=guidance_embeds,
                  rope_axes_dim=(2, 2, 4))
    return HunyuanVideoTransformer3DModel(**{**config, **changes}).eval()


def hunyuan_cond(rows: int = 1, seed: int = 1, real=(5, 3)) -> dict[str, torch.Tensor]:
    """Llama-like states, a right-padded mask (``real`` tokens per row, cycled) and pooled vectors."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, SEQ)
    for r in range(rows):
        mask[r, : real[r % len(real)]] = 1.0  # (rows, L): real tokens first, padding after
    return {"prompt_embeds": torch.randn(rows, SEQ, TEXT_DIM, generator=g), "prompt_attention_mask": mask,
            "pooled_prompt_embeds": torch.randn(rows, POOLED_DIM, generator=g)}


def hunyuan_pipeline(model) -> HunyuanVideoPipeline:
    """HunyuanVideoPipeline around ``model`` with the released scheduler's shift; no text encoders or VAE."""
    return HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=model, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), text_encoder_2=None,
                                tokenizer_2=None)


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_split_equals_the_models_forward(guidance_embeds):
    """pre -> blocks -> head is the model's forward, padding mask included (rows with 5 and 3 real tokens)."""
    model = tiny_hunyuan(guidance_embeds)
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 3, 8, 6, generator=g)  # (B, C, F', H', W')
    cond = hunyuan_cond(2)
    t = torch.tensor([800.0, 300.0])
    guidance = torch.tensor([GUIDANCE, 4.0])
    with torch.no_grad():
        ours = adapter.forward(latents, t, {**cond, "guidance": guidance})
        ref = model(hidden_states=latents, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                    encoder_attention_mask=cond["prompt_attention_mask"].long(),
                    pooled_projections=cond["pooled_prompt_embeds"],
                    guidance=guidance * 1000 if guidance_embeds else None, return_dict=False)[0]
        via_model = adapter.model_forward(latents, t, {**cond, "guidance": guidance})
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(via_model, ref, rtol=0, atol=0)
    assert ours.shape == latents.shape


def test_padding_is_masked_out():
    """Changing the padded text states changes nothing; changing a real token's does."""
    model = tiny_hunyuan()
    adapter = adapter_for(model)
    latents = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    cond = {**hunyuan_cond(1), "guidance": torch.tensor([GUIDANCE])}
    t = torch.tensor([500.0])
    with torch.no_grad():
        base = adapter.forward(latents, t, cond)
        padded = cond["prompt_embeds"].clone()
        padded[:, 5:] += 3.0  # positions 5.. are padding (mask 0)
        same = adapter.forward(latents, t, {**cond, "prompt_embeds": padded})
        real = cond["prompt_embeds"].clone()
        real[:, 0] += 3.0
        other = adapter.forward(latents, t, {**cond, "prompt_embeds": real})
    torch.testing.assert_close(same, base, rtol=1e-5, atol=1e-6)
    assert (other - base).abs().max() > 1e-4
    mask = joint_attention_mask(torch.tensor([[1.0, 1.0, 0.0]]), 2)  # 2 video tokens, 2 real of 3 text
    assert mask.shape == (1, 1, 1, 5) and mask.reshape(-1).tolist() == [True, True, True, True, False]


def tiny_hunyuan_vae() -> AutoencoderKLHunyuanVideo:
    torch.manual_seed(1)
    return AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                     layers_per_block=1, norm_num_groups=4).eval()


def test_family_entry_describes_hunyuanvideo():
    model = tiny_hunyuan()
    family = family_for_model(model)
    assert family is family_named("hunyuanvideo")
    assert (family.latent_kind, family.guidance, family.timestep_scale) == (VIDEO, EMBEDDED, 1000.0)
    assert family.input_names == ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")
    assert [c.name for c in family.conditioning if c.cached_step] == ["pooled_prompt_embeds"]
    assert family.block_stacks == ("transformer_blocks", "single_transformer_blocks")
    decoder = HunyuanLatentDecoder(tiny_hunyuan_vae())
    layout = family.layout(decoder, adapter_for(model).patch_size, "hunyuan-test")
    assert layout.latent_shape(1, 64, 48, 9) == (1, 4, 3, 8, 6)  # 4x in time, 8x in space
    with pytest.raises(UserError, match="4\\*k \\+ 1"):
        layout.check(64, 48, 8)
    with pytest.raises(UserError, match="multiples of 16"):
        layout.check(56, 48, 9)  # VAE 8 x patch 2
    frames = decoder.decode(torch.zeros(1, 4, 2, 2, 2))
    assert frames.shape == (1, 5, 16, 16, 3) and frames.dtype == torch.uint8


def test_the_sigma_table_is_the_pipelines():
    """The family's ramp with the static shift is HunyuanVideoPipeline's linspace(1, 0, T + 1)[:-1], shifted."""
    family = family_named("hunyuanvideo")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    import numpy as np

    for steps in (4, 50):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
        np.testing.assert_allclose(family.sigmas(steps, shift=SHIFT), scheduler.sigmas.double().numpy(), rtol=0,
                                   atol=1e-7)


def _run_pipeline(model, noise, cond, steps, **kwargs):
    pipe = hunyuan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                prompt_attention_mask=cond["prompt_attention_mask"].long(), height=64, width=64, num_frames=9,
                num_inference_steps=steps, guidance_scale=GUIDANCE, latents=noise, output_type="latent",
                return_dict=False)
    with torch.no_grad():
        return pipe(**{**args, **kwargs})[0]


def test_sampler_with_all_full_mask_equals_hunyuan_pipeline():
    """The project's sampler (ramp table shifted by 7, timesteps x 1000, embedded guidance) is the pipeline's loop."""
    model = tiny_hunyuan()
    adapter = adapter_for(model)
    family = adapter.family
    steps = 4
    noise = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(3))  # 9 frames of 64 x 64
    cond = hunyuan_cond(1)
    tables = StepTables(family.sigmas(steps, shift=SHIFT), n_branches=family.n_branches(GUIDANCE), channels=4)
    with torch.no_grad():
        ours = CachedSampler(adapter, tables, [True] * steps)(noise, cond, GUIDANCE).latents
    ref = _run_pipeline(model, noise, cond, steps)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ours, noise)


def test_cached_step_reuses_the_residual_with_pooled_text_and_guidance():
    """A cached step = x + dt * head(pre(x, t, pooled + guidance) + the last full step's residual)."""
    model = tiny_hunyuan()
    adapter = adapter_for(model)
    noise = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    cond = hunyuan_cond(1)
    sigmas = adapter.family.sigmas(3, shift=SHIFT)
    tables = StepTables(sigmas, n_branches=1, channels=4)
    with torch.no_grad():
        ours = CachedSampler(adapter, tables, [True, False, True])(noise, cond, GUIDANCE).latents
        s = torch.tensor(sigmas, dtype=torch.float32)
        guided = {**cond, "guidance": torch.tensor([GUIDANCE])}
        pre0 = adapter.pre(noise, s[0].reshape(1) * 1000, guided)
        h0 = adapter.blocks(pre0)
        x1 = noise + (s[1] - s[0]) * adapter.head(h0, pre0)
        pre1 = adapter.pre(x1, s[1].reshape(1) * 1000, {k: guided[k] for k in ("pooled_prompt_embeds", "guidance")})
        assert pre1.block_inputs is None  # the cached step's pre reads neither the Llama states nor the mask
        x2 = x1 + (s[2] - s[1]) * adapter.head(pre1.hidden + (h0 - pre0.hidden), pre1)
        x3 = x2 + (s[3] - s[2]) * adapter.forward(x2, s[2].reshape(1) * 1000, guided)
    torch.testing.assert_close(ours, x3, rtol=1e-5, atol=1e-5)


def test_bad_conditioning_and_image_to_video_models_are_refused():
    model = tiny_hunyuan()
    adapter = adapter_for(model)
    tables = StepTables(adapter.family.sigmas(2, shift=SHIFT), n_branches=1, channels=4)
    sampler = CachedSampler(adapter, tables, [True, False])
    noise = torch.zeros(1, 4, 2, 4, 4)
    cond = hunyuan_cond(1)
    with pytest.raises(UserError, match=r"missing \['prompt_attention_mask'\]"):
        sampler(noise, {k: v for k, v in cond.items() if k != "prompt_attention_mask"}, GUIDANCE)
    with pytest.raises(UserError, match="pooled_prompt_embeds has 2 rows; expected 1"):
        sampler(noise, {**cond, "pooled_prompt_embeds": torch.zeros(2, POOLED_DIM)}, GUIDANCE)
    i2v = adapter_for(tiny_hunyuan(image_condition_type="latent_concat", in_channels=9))
    with pytest.raises(UserError, match="text-to-video models only.*latent_concat"):
        i2v.pre(noise, torch.tensor([500.0]), {**cond, "guidance": torch.tensor([GUIDANCE])})
