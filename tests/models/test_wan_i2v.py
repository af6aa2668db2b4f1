"""Wan2.1 image-to-video (`wan-i2v`): the family lookup by config, the adapter's split, the export-time attention,
the sampler against diffusers' WanImageToVideoPipeline and the hook on it (tiny random configs).

The I2V transformer is the T2V class with an image embedder (``image_dim``) and an image cross-attention
(``added_kv_proj_dim``); its input is the noisy latents with the condition (frame mask + VAE latents of
the image) concatenated on channels, and its context the CLIP image states before the 512 text states.
"""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel

from ertacache.errors import UserError
from ertacache.models.adapter import adapter_for
from ertacache.models.family import ROWS_PER_SAMPLE, family_for_model, family_named
from ertacache.sampling import CachedSampler
from ertacache.sampling.steps import StepTables
from tests.conftest import tiny_wan

C, TEXT_LEN, TEXT_DIM, IMAGE_TOKENS, IMAGE_DIM = 4, 512, 16, 5, 12
GUIDANCE, SHIFT = 4.0, 3.0


def tiny_wan_i2v(seed: int = 0) -> WanTransformer3DModel:
    """A random two-block Wan I2V transformer: input channels C latents + 4 mask + C condition, output C."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                 in_channels=2 * C + 4, out_channels=C, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32,
                                 num_layers=2, cross_attn_norm=True, image_dim=IMAGE_DIM, added_kv_proj_dim=16,
                                 rope_max_seq_len=64).eval()


def tiny_wan_vae() -> AutoencoderKLWan:
    torch.manual_seed(1)
    return AutoencoderKLWan(base_dim=8, z_dim=C, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                            latents_std=[1.5, 0.8, 1.0, 2.0]).eval()


def i2v_cond(batch: int = 1, n_branches: int = 2, frames: int = 2, h: int = 4, w: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {"text_embeds": torch.randn(n_branches * batch, TEXT_LEN, TEXT_DIM, generator=g),
            "image_embeds": torch.randn(batch, IMAGE_TOKENS, IMAGE_DIM, generator=g),
            "image_latents": torch.randn(batch, 4 + C, frames, h, w, generator=g)}


def test_the_family_is_chosen_by_the_models_config():
    t2v, i2v = family_for_model(tiny_wan()), family_for_model(tiny_wan_i2v())
    assert (t2v.name, i2v.name) == ("wan", "wan-i2v") and t2v.transformer_class == i2v.transformer_class
    assert i2v.input_names == ("text_embeds", "image_embeds", "image_latents")
    assert [c.name for c in i2v.conditioning if c.cached_step] == ["image_latents"]
    assert all(c.rows == ROWS_PER_SAMPLE for c in i2v.conditioning[1:])
    assert adapter_for(tiny_wan_i2v()).in_channels == C  # the latents being denoised, not the 12 input channels
    assert family_named("wan-i2v") is i2v


def test_a_condition_on_channels_without_an_image_embedder_is_wan22_i2v_a14b():
    """Wan2.2 I2V-A14B's transformer: a condition concatenated on channels (in 36, out 16), no image embedder."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                  in_channels=2 * C + 4, out_channels=C, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32,
                                  num_layers=1, rope_max_seq_len=64)
    family = family_for_model(model)
    assert family.name == "wan-i2v-a14b" and family.input_names == ("text_embeds", "image_latents")


def test_a_family_without_a_claims_rule_cannot_share_a_class():
    import dataclasses

    from ertacache.models.family import register_family

    with pytest.raises(ValueError, match="already belongs to family"):
        register_family(dataclasses.replace(family_named("wan"), name="wan-other", claims=None))


def test_split_equals_the_models_forward_with_cfg_rows():
    """Branch rows for the text, one row per sample for the image inputs (repeated for the branches)."""
    model = tiny_wan_i2v()
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, C, 2, 4, 6, generator=g)  # (B, C, F', H', W')
    cond = i2v_cond(batch=2, h=4, w=6)
    x_in, t = torch.cat([x, x]), torch.tensor([800.0, 300.0, 800.0, 300.0])  # cond rows, then uncond rows
    with torch.no_grad():
        ours = adapter.forward(x_in, t, cond)
        joint = torch.cat([x_in, cond["image_latents"].repeat(2, 1, 1, 1, 1)], dim=1)  # (4, 2C + 4, F', H', W')
        ref = model(hidden_states=joint, timestep=t, encoder_hidden_states=cond["text_embeds"],
                    encoder_hidden_states_image=cond["image_embeds"].repeat(2, 1, 1), return_dict=False)[0]
        via_model = adapter.model_forward(x_in, t, cond)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(via_model, ref, rtol=0, atol=0)
    with pytest.raises(UserError, match="image-to-video.*needs image_latents"):
        adapter.pre(x_in, t, cond["text_embeds"])
    with pytest.raises(UserError, match="text-to-video.*takes no image"):
        adapter_for(tiny_wan()).pre(x_in, t, {"text_embeds": cond["text_embeds"], "image_latents": cond["image_latents"]})


def test_the_export_attention_equals_diffusers_on_the_image_cross_attention():
    from ertacache.export.attention import export_attention

    model = tiny_wan_i2v()
    adapter = adapter_for(model)
    x = torch.randn(1, C, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    cond = i2v_cond(batch=1, n_branches=1)
    t = torch.tensor([600.0])
    with torch.no_grad():
        ref = adapter.forward(x, t, cond)
        with export_attention(model):
            assert type(next(iter(model.attn_processors.values()))).__name__ == "StackRopeWanAttnProcessor"
            got = adapter.forward(x, t, cond)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def tiny_clip_vision():
    """A CLIP vision tower and its processor at toy size: 32 px, 16 px patches -> 4 patches + CLS = 5 states of 12."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(3)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=IMAGE_DIM, intermediate_size=24, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=16)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, processor


def i2v_pipeline(model) -> WanImageToVideoPipeline:
    """WanImageToVideoPipeline around ``model`` with a tiny CLIP vision tower and VAE; text embeddings are passed in."""
    vision, processor = tiny_clip_vision()
    return WanImageToVideoPipeline(tokenizer=None, text_encoder=None, image_encoder=vision, image_processor=processor,
                                   transformer=model, vae=tiny_wan_vae(),
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT))


def conditioning_image(size: int = 32, seed: int = 4) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]: what the pipeline's image preprocessor takes as a tensor."""
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def pipeline_condition(pipe, image, frames: int, size: int) -> torch.Tensor:
    """The pipeline's own condition latents (frame mask + normalised VAE latents) for ``image``."""
    pixels = pipe.video_processor.preprocess(image, height=size, width=size).float()
    _, condition = pipe.prepare_latents(pixels, 1, C, size, size, frames, torch.float32, torch.device("cpu"),
                                        None, torch.zeros(1, C, (frames - 1) // 4 + 1, size // 8, size // 8))
    return condition  # (1, 4 + C, F', H', W')


def _run(pipe, noise, image, text, steps, size, frames, guidance=GUIDANCE):
    with torch.no_grad():
        return pipe(image=image, prompt_embeds=text[:1], negative_prompt_embeds=text[1:],
                    height=size, width=size, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
                    latents=noise, output_type="latent", return_dict=False)[0]


def test_sampler_with_all_full_mask_equals_the_i2v_pipeline():
    model = tiny_wan_i2v()
    adapter = adapter_for(model)
    pipe = i2v_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    size, frames, steps = 32, 5, 4
    image = conditioning_image(size)
    cond = i2v_cond(batch=1, frames=2)
    cond["image_latents"] = pipeline_condition(pipe, image, frames, size)
    cond["image_embeds"] = pipe.encode_image(image, torch.device("cpu"))  # (1, 5, 12): the pipeline's own
    noise = torch.randn(1, C, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    tables = StepTables(adapter.family.sigmas(steps, shift=SHIFT), n_branches=2, channels=C)
    with torch.no_grad():
        ours = CachedSampler(adapter, tables, [True] * steps)(noise, cond, GUIDANCE).latents
    ref = _run(pipe, noise, image, cond["text_embeds"], steps, size, frames)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ours, noise)


STEPS = 8
MASK = [True, True, True, False, False, True, False, True]
LATENT = (C, 2, 4, 4)  # 5 frames of 32 x 32


def i2v_profile(model):
    from ertacache.models.loading import fingerprint_module
    from ertacache.profile.artifact import Profile
    from ertacache.profile.timeadjust import adjusted_sigmas
    from tests.export.fixtures import k3_profile

    nominal = adapter_for(model).family.sigmas(STEPS, shift=SHIFT)
    phi = np.where(MASK, 1.0, 0.9)
    g = torch.Generator().manual_seed(6)
    base = Profile("wan-i2v-test", fingerprint_module(model), STEPS, SHIFT, 32, 32, 5, list(LATENT), GUIDANCE, 2, 0.1,
                   list(MASK), list(nominal), list(adjusted_sigmas(np.asarray(nominal), phi)), list(phi),
                   0.02 * torch.randn(STEPS, 2, C, generator=g), 0.02 * torch.randn(STEPS, 2, C, generator=g), {}, {})
    return k3_profile(base, model.config.num_attention_heads * model.config.attention_head_dim, MASK)


def test_enable_ertacache_on_the_i2v_pipeline_equals_our_cached_sampler():
    from ertacache.integrations import disable_ertacache, enable_ertacache

    model = tiny_wan_i2v()
    adapter = adapter_for(model)
    profile = i2v_profile(model)
    pipe = i2v_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    image = conditioning_image(32)
    cond = i2v_cond(batch=1, frames=2)
    cond["image_latents"] = pipeline_condition(pipe, image, 5, 32)
    cond["image_embeds"] = pipe.encode_image(image, torch.device("cpu"))
    noise = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(7))
    enable_ertacache(pipe, profile)
    got = _run(pipe, noise, image, cond["text_embeds"], STEPS, 32, 5)
    with torch.no_grad():
        ours = CachedSampler(adapter, profile.tables(), profile.mask)(noise, cond, GUIDANCE).latents
    torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-5)
    disable_ertacache(pipe)
    plain = _run(pipe, noise, image, cond["text_embeds"], STEPS, 32, 5)
    assert (plain - got).abs().max() > 1e-4


def test_teacache_keeps_each_samples_image_when_samples_decide_apart():
    """A batch of 2 where sample 0 computes and sample 1 reuses: each row gets its own sample's image inputs
    (the per-sample rows are picked by sample, not passed whole)."""
    import numpy as np

    from ertacache.eval.teacache import TeaCachePlan
    from ertacache.sampling.steps import cached_velocity, step_conditioning

    model = tiny_wan_i2v()
    adapter = adapter_for(model)
    family = adapter.family
    x = torch.randn(2, C, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    cond = i2v_cond(batch=2)
    x_in, t = torch.cat([x, x]), torch.full((4,), 500.0)  # rows: sample 0, sample 1 (cond), then (uncond)
    g = torch.tensor(GUIDANCE)
    conds = (step_conditioning(family, cond, g, 4, cached=False), step_conditioning(family, cond, g, 4, cached=True))
    with torch.no_grad():
        v, _ = TeaCachePlan._velocity(adapter, x_in, t, conds, None, np.array([True, False]), 2, 2)
        own = {"text_embeds": cond["text_embeds"][[0, 2]], "image_embeds": cond["image_embeds"][:1],
               "image_latents": cond["image_latents"][:1]}
        computed = adapter.forward(x_in[[0, 2]], t[[0, 2]], own)
        reused = cached_velocity(adapter, x_in[[1, 3]], t[[1, 3]], torch.zeros(2, 8, 16),
                                 {"image_latents": cond["image_latents"][1:2]})
    torch.testing.assert_close(v[[0, 2]], computed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v[[1, 3]], reused, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="2 per-sample rows cannot serve 3 latent rows"):
        adapter.pre(x_in[:3], t[:3], cond)
