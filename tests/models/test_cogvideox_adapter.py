"""CogVideoX's forward split (ertacache/models/cogvideox.py) against diffusers' own forward.

Tiny random ``CogVideoXTransformer3DModel`` configs stand in for 2B (sincos positional table over the
joint text + video sequence, no rotary) and 5B (rotary embeddings, made here as CogVideoXPipeline
makes them). The family entry and its DDIM sampler do not exist yet; what is checked is the split
the rest will stand on: pre / blocks / head equal the forward, and a cached step's embedding with the
exact residual gives the full step's output.
"""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from ertacache.errors import UserError
from ertacache.models.adapter import adapter_for
from ertacache.models.cogvideox import CogVideoXAdapter
from ertacache.sampling.steps import cached_velocity, full_velocity

TEXT_LEN, TEXT_DIM, C = 6, 12, 4
LATENT = (C, 2, 4, 4)  # (C, F, H, W): 2 latent frames (5 video frames), 4 x 4 latents, patch 2 -> 2 x 2 tokens


def tiny_cogvideox(rotary: bool, seed: int = 0) -> CogVideoXTransformer3DModel:
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=C, out_channels=C, time_embed_dim=16,
        text_embed_dim=TEXT_DIM, num_layers=2, sample_width=4, sample_height=4, sample_frames=5, patch_size=2,
        max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=rotary).eval()


def _inputs(seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, *LATENT, generator=g)  # (B, C, F, H, W), the project's layout
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)
    timestep = torch.tensor([999.0, 421.0][:batch])
    return latents, timestep, text


def _model_output(model, latents, timestep, text, rotary):
    with torch.no_grad():
        out = model(hidden_states=latents.transpose(1, 2), encoder_hidden_states=text, timestep=timestep,
                    image_rotary_emb=rotary, return_dict=False)[0]  # (B, F, C, H, W)
    return out.transpose(1, 2)  # (B, C, F, H, W)


def _pipeline_rotary(model, latents):
    """The rotary tables exactly as CogVideoXPipeline passes them (its own method, no VAE: 8x in space)."""
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=None)
    _, _, f, h, w = latents.shape
    return pipe._prepare_rotary_positional_embeddings(h * 8, w * 8, f, latents.device)


@pytest.mark.parametrize("rotary", [False, True], ids=["2b-sincos", "5b-rotary"])
def test_the_split_equals_the_forward(rotary):
    model = tiny_cogvideox(rotary)
    adapter = adapter_for(model)
    assert isinstance(adapter, CogVideoXAdapter) and adapter.in_channels == C and adapter.patch_size == (1, 2, 2)
    latents, timestep, text = _inputs()
    tables = _pipeline_rotary(model, latents) if rotary else None
    want = _model_output(model, latents, timestep, text, tables)
    with torch.no_grad():
        got = adapter.forward(latents, timestep, text)
        mine = adapter.rotary(*latents.shape[2:3], latents.shape[3] // 2, latents.shape[4] // 2, latents.device)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if rotary:
        for a, b in zip(mine, tables):
            torch.testing.assert_close(a, b)
    else:
        assert mine is None


def test_a_cached_step_with_the_exact_residual_gives_the_full_output():
    """The cached step embeds the video tokens without the text (they do not depend on its values) and adds the
    residual: with the full step's own residual it gives the full step's velocity."""
    adapter = adapter_for(tiny_cogvideox(True))
    latents, timestep, text = _inputs(seed=3)
    with torch.no_grad():
        v_full, residual = full_velocity(adapter, latents, timestep, text)  # residual (B, N, D): video tokens only
        v_cached = cached_velocity(adapter, latents, timestep, residual)
        other = cached_velocity(adapter, latents, timestep, residual * 0.5)
    assert residual.shape == (2, 2 * 2 * 2, 32)  # F * H' * W' video tokens, width 2 heads x 16
    torch.testing.assert_close(v_cached, v_full, rtol=1e-5, atol=1e-5)
    assert (other - v_full).abs().max() > 1e-4


def test_unsupported_cogvideox_variants_are_refused_by_name():
    torch.manual_seed(0)
    i2v = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=2 * C,
                                      out_channels=C, time_embed_dim=16, text_embed_dim=TEXT_DIM, num_layers=1,
                                      sample_width=4, sample_height=4, sample_frames=5, patch_size=2,
                                      max_text_seq_length=TEXT_LEN).eval()
    latents, timestep, text = _inputs()
    with pytest.raises(UserError, match="CogVideoX I2V concatenates image latents"):
        adapter_for(i2v).pre(latents, timestep, text)
    with pytest.raises(UserError, match="no ERTACache model family for model class 'CogVideoXTransformer3DModel'"):
        adapter_for(tiny_cogvideox(False)).family  # the family (and its DDIM sampler) is not written yet
