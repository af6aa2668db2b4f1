"""CogVideoX's forward split (ertacache/models/cogvideox.py) against diffusers' own forward.

Tiny random ``CogVideoXTransformer3DModel`` configs stand in for 2B (sincos positional table over the
joint text + video sequence, no rotary) and 5B (rotary embeddings, made here as CogVideoXPipeline
makes them). The adapter sees the model in flow-matching coordinates (state x, time s, velocity u);
the split is checked against the forward through the change of variables written out by hand here,
and a cached step's embedding with the exact residual gives the full step's output.
"""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from ertacache.errors import UserError
from ertacache.models.adapter import adapter_for
from ertacache.models.cogvideox import CogVideoXAdapter, VPNoiseSchedule, attach_noise_schedule
from ertacache.sampling.steps import cached_velocity, full_velocity

TEXT_LEN, TEXT_DIM, C = 6, 12, 4
LATENT = (C, 2, 4, 4)  # (C, F, H, W): 2 latent frames (5 video frames), 4 x 4 latents, patch 2 -> 2 x 2 tokens


def tiny_cogvideox(rotary: bool, seed: int = 0, snr_shift_scale: float = 3.0) -> CogVideoXTransformer3DModel:
    """A tiny random transformer with CogVideoX-2B's scheduler config attached (5B's: ``snr_shift_scale=1``)."""
    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=C, out_channels=C, time_embed_dim=16,
        text_embed_dim=TEXT_DIM, num_layers=2, sample_width=4, sample_height=4, sample_frames=5, patch_size=2,
        max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=rotary).eval()
    attach_noise_schedule(model, VPNoiseSchedule(snr_shift_scale=snr_shift_scale))
    return model


def _inputs(seed=1, batch=2):
    """Flow-matching state, time s (at the DDIM timesteps 999 and 419 of a 50-step 2B schedule) and text."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, *LATENT, generator=g)  # (B, C, F, H, W), the project's layout
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)
    s = VPNoiseSchedule().timestep_sigmas()
    timestep = torch.tensor([s[999], s[419]][:batch], dtype=torch.float32)
    return latents, timestep, text


def _in_model_coordinates(sigma: torch.Tensor):
    """The DDPM view of flow-matching time s, written out independently: timestep t, a = sqrt(ab), b = sqrt(1 - ab)."""
    ab = torch.tensor(VPNoiseSchedule().alphas_cumprod())
    s_t = (1 - ab).sqrt() / (ab.sqrt() + (1 - ab).sqrt())
    t = torch.tensor([int((s_t.float() - x).abs().argmin()) for x in sigma])  # the integer timesteps of _inputs
    return t, ab[t].sqrt().float(), (1 - ab[t]).sqrt().float()


def _model_output(model, latents, sigma, text, rotary):
    """The flow-matching velocity u = eps - x0 from the model's own forward at z = (a + b) x, timestep t(s)."""
    t, a, b = _in_model_coordinates(sigma)
    a, b = a.reshape(-1, 1, 1, 1, 1), b.reshape(-1, 1, 1, 1, 1)
    z = (a + b) * latents
    with torch.no_grad():
        v = model(hidden_states=z.transpose(1, 2), encoder_hidden_states=text, timestep=t,
                  image_rotary_emb=rotary, return_dict=False)[0].transpose(1, 2)  # (B, F, C, H, W) -> (B, C, F, H, W)
    x0, eps = a * z - b * v, b * z + a * v  # v-prediction
    return eps - x0


def _pipeline_rotary(model, latents):
    """The rotary tables exactly as CogVideoXPipeline passes them (its own method, no VAE: 8x in space)."""
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=None)
    _, _, f, h, w = latents.shape
    return pipe._prepare_rotary_positional_embeddings(h * 8, w * 8, f, latents.device)


@pytest.mark.parametrize("rotary,frames", [(False, 2), (False, 3), (True, 2)],
                         ids=["2b-sincos", "2b-sincos-other-size", "5b-rotary"])
def test_the_split_equals_the_forward(rotary, frames):
    """At the config's sample size (2 latent frames) and at another (3: the sincos table is rebuilt)."""
    model = tiny_cogvideox(rotary)
    adapter = adapter_for(model)
    assert isinstance(adapter, CogVideoXAdapter) and adapter.in_channels == C and adapter.patch_size == (1, 2, 2)
    latents, timestep, text = _inputs()
    latents = torch.cat([latents, latents.flip(2)], dim=2)[:, :, :frames]  # (B, C, frames, H, W)
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
    with torch.no_grad():  # the model's own forward as the pipeline calls it, which the peers' hooks sit on
        torch.testing.assert_close(adapter.model_forward(latents, timestep, text), want, rtol=1e-5, atol=1e-5)


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
    with pytest.raises(UserError, match="no ERTACache model family takes this CogVideoXTransformer3DModel"):
        adapter_for(i2v).family  # the family claims CogVideoX 1.0 text-to-video only
    bare = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=C, out_channels=C,
                                       time_embed_dim=16, text_embed_dim=TEXT_DIM, num_layers=1, sample_width=4,
                                       sample_height=4, sample_frames=5, patch_size=2, max_text_seq_length=TEXT_LEN)
    with pytest.raises(UserError, match="no noise schedule attached"):
        adapter_for(bare).pre(latents, timestep, text)
