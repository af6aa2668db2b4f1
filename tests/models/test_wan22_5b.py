"""Wan2.2 TI2V-5B as text-to-video (`wan2.2-5b`): per-token timesteps and the Wan2.2 VAE.

WanPipeline with ``expand_timesteps=True`` (what TI2V-5B's model_index sets) passes the timestep per
token, (B, N), so the model's embedding, every block's modulation and the head's shift/scale are per
token. The Wan adapter mirrors that path (checked here with per-token timesteps that differ, as
image-to-video's clean first frame makes them); for text-to-video they are all equal, and the
project's sampler, which passes one timestep per sample, equals the pipeline. The Wan2.2 VAE
(48 channels, 16x in space, 4x in time) is read from the VAE config.
"""

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

from ertacache.integrations import enable_ertacache
from ertacache.models.adapter import adapter_for
from ertacache.models.components import WanLatentDecoder
from ertacache.models.loading import load_bundle
from ertacache.models.recipes import load_recipe
from ertacache.sampling import CachedSampler
from ertacache.sampling.settings import SampleSettings
from ertacache.sampling.steps import StepTables
from tests.conftest import save_tiny_wan_folder, tiny_wan

GUIDANCE, SHIFT = 5.0, 5.0


def _latents_and_text(seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 2, 4, 6, generator=g)  # (B, C, F', H', W'): tokens (2, 2, 3) with patch (1, 2, 2)
    return latents, torch.randn(batch, 5, 16, generator=g)


def test_the_split_equals_the_forward_with_per_token_timesteps():
    model = tiny_wan()
    adapter = adapter_for(model)
    latents, text = _latents_and_text()
    n = 2 * 2 * 3
    t = torch.linspace(0, 900, 2 * n).reshape(2, n)  # (B, N): a different timestep on every token
    t[:, :6] = 0.0  # e.g. the clean first frame of image-to-video
    with torch.no_grad():
        ref = model(hidden_states=latents, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        ours = adapter.forward(latents, t, text)
        pre = adapter.pre(latents, t, text)
        per_token = adapter.modulated_input(pre)  # (B, N, D)
        same = adapter.modulated_input(adapter.pre(latents, torch.full((2,), 700.0), text))
        expanded = adapter.modulated_input(adapter.pre(latents, torch.full((2, n), 700.0), text))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert pre.head_inputs.temb.shape[:2] == (2, n) and pre.block_inputs.timestep_proj.shape[:3] == (2, n, 6)
    torch.testing.assert_close(expanded, same, rtol=1e-6, atol=1e-6)  # equal per-token timesteps = one per sample
    assert (per_token[:, :6] - same[:, :6]).abs().max() > 1e-3  # the first tokens' own timestep (0) counts


def test_the_hook_refuses_differing_per_token_timesteps():
    """TI2V's image-to-video mode (a clean first frame) is not the text-to-video path the hook mirrors."""
    from ertacache.errors import UserError

    adapter = adapter_for(tiny_wan())
    latents, text = _latents_and_text()
    t = torch.full((2, 12), 500.0)
    call = adapter.transformer_call(latents, t, text)  # equal per-token timesteps: text-to-video
    assert call.timestep.shape == (2, 12)
    t[:, :6] = 0.0
    with pytest.raises(UserError, match="per-token timesteps that differ"):
        adapter.transformer_call(latents, t, text)


def _pipeline(model):
    return WanPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), expand_timesteps=True)


def _run(pipe, noise, text, neg, steps, guidance_scale=GUIDANCE):
    with torch.no_grad():
        return pipe(prompt_embeds=text, negative_prompt_embeds=neg, height=noise.shape[-2] * 8,
                    width=noise.shape[-1] * 8, num_frames=4 * (noise.shape[2] - 1) + 1, num_inference_steps=steps,
                    guidance_scale=guidance_scale, latents=noise, output_type="latent", return_dict=False)[0]


def test_sampler_and_hook_equal_wanpipeline_with_expanded_timesteps():
    """All-full: the sampler (one timestep per sample) equals WanPipeline's per-token loop; cached: the hook on that
    pipeline (per-token timesteps through the adapter) equals the sampler."""
    from tests.export.fixtures import k3_profile
    from tests.integrations.test_wan_pipeline import LATENT, make_profile

    model = tiny_wan()
    adapter = adapter_for(model)
    noise, text = _latents_and_text(seed=3, batch=1)
    neg = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(4))
    steps = 4
    tables = StepTables(adapter.family.sigmas(steps, shift=SHIFT), n_branches=2, channels=4)
    with torch.no_grad():
        ours = CachedSampler(adapter, tables, [True] * steps)(noise, torch.cat([text, neg]), GUIDANCE).latents
    pipe = _pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_run(pipe, noise, text, neg, steps), ours, rtol=1e-5, atol=1e-5)

    mask = [True, True, True, False, False, True, False, True, False, True]  # the profile's 10 steps, K = 3
    profile = k3_profile(make_profile(model, adapter), model.config.num_attention_heads * model.config.attention_head_dim,
                         mask=mask)
    noise = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(5))  # the profile's latent shape
    enable_ertacache(pipe, profile)
    got = _run(pipe, noise, text, neg, profile.steps, profile.guidance_scale)
    with torch.no_grad():
        want = CachedSampler(adapter, profile.tables(), profile.mask)(noise, torch.cat([text, neg]),
                                                                      profile.guidance_scale).latents
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def tiny_wan22_vae() -> AutoencoderKLWan:
    """The Wan2.2 VAE's structure at toy size: residual blocks, a 2 x 2 pixel patch (12 input channels), 16x in space."""
    torch.manual_seed(2)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 4,
                            latents_std=[1.0] * 4).eval()


def test_the_wan22_vae_sets_the_layout():
    decoder = WanLatentDecoder(tiny_wan22_vae())
    assert (decoder.latent_channels, decoder.spatial_factor, decoder.temporal_factor) == (4, 16, 4)
    layout = adapter_for(tiny_wan()).family.layout(decoder, (1, 2, 2), "wan2.2-5b")
    assert layout.latent_shape(1, 64, 96, 5) == (1, 4, 2, 4, 6)
    frames = decoder.decode(torch.zeros(1, 4, 2, 2, 2))
    assert frames.shape == (1, 5, 32, 32, 3) and frames.dtype == torch.uint8


def test_the_recipe_loads_a_diffusers_folder_with_the_wan22_vae(tmp_path):
    from ertacache.generation import generate

    folder = save_tiny_wan_folder(tmp_path / "wan22")
    tiny_wan22_vae().save_pretrained(folder / "vae")  # the Wan2.2 VAE in place of Wan2.1's
    bundle = load_bundle("wan2.2-5b", folder, dtype="fp32")
    assert bundle.family.name == "wan" and bundle.decoder.spatial_factor == 16
    settings = SampleSettings.from_recipe(bundle.recipe, height=64, width=64, frames=5, steps=3)
    assert (settings.shift, settings.guidance_scale, settings.n_branches) == (SHIFT, GUIDANCE, 2)
    result = generate(bundle, ["a cat walks"], [0], settings, None)
    assert result.frames.shape == (1, 5, 64, 64, 3)


def test_the_recipe_holds_the_released_settings():
    recipe = load_recipe("wan2.2-5b")
    assert recipe.hub_id == "Wan-AI/Wan2.2-TI2V-5B-Diffusers" and recipe.family == "wan"
    settings = SampleSettings.from_recipe(recipe)
    assert (settings.height, settings.width, settings.frames, settings.steps) == (704, 1280, 121, 50)


def test_offline_names_the_download(monkeypatch, tmp_path):
    from ertacache.errors import ModelNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="hf download Wan-AI/Wan2.2-TI2V-5B-Diffusers --local-dir"):
        load_bundle("wan2.2-5b")


@pytest.mark.slow  # profile + ONNX export with the Wan2.2 VAE's decode graph + run + verify: ~40 s on 2 cores
def test_the_5b_folder_exports_runs_and_verifies(tmp_path, capsys):
    """Wan2.2 TI2V-5B as text-to-video through ertacache-export (the per-token-timestep model and the 16x Wan2.2
    VAE as an ONNX decode graph, validated over the whole schedule), ertacache-verify and ertacache-run."""
    from ertacache.cli import run as run_cli
    from ertacache.cli import verify as verify_cli
    from ertacache.contract import load_manifest
    from tests.export.fixtures import cli_export

    folder = save_tiny_wan_folder(tmp_path / "wan22")
    tiny_wan22_vae().save_pretrained(folder / "vae")
    out = cli_export("wan2.2-5b", folder, tmp_path / "out", "--height", "64", "--width", "64")
    manifest = load_manifest(out)
    assert manifest.has_decode and manifest.spec("vae_decode", "frames").shape == (1, 5, 64, 64, 3)
    assert manifest["validation"]["results"]["onnx"]["rel_l2"] < 1e-4
    assert verify_cli.main(["--engines", str(out), "--prompt", "a cat walks"]) == 0
    assert "OK" in capsys.readouterr().out
    assert run_cli.main(["--engines", str(out), "--prompt", "a cat walks", "--out", str(tmp_path / "v.gif")]) == 0
