"""The real CogVideoX ids: a diffusers-format folder (CogVideoXPipeline.save_pretrained with tiny random T5,
transformer and AutoencoderKLCogVideoX) loads by id, its scheduler config becomes the noise schedule, and
``generate`` equals ``CogVideoXPipeline.from_pretrained`` on the same folder, prompt and noise (prompt
encoder, CFG row order, DDIM). Offline without weights fails at once with the download command.
"""

import json

import pytest
import torch

from ertacache.errors import ModelNotFoundError, UserError
from ertacache.models.cogvideox import VPNoiseSchedule, attach_noise_schedule
from ertacache.models.loading import load_bundle
from ertacache.models.recipes import load_recipe
from ertacache.sampling.settings import SampleSettings
from tests.conftest import tiny_umt5
from tests.models.test_cogvideox_family import ddim

PROMPT = "a red cat walks on the grass"
SIZE = dict(height=32, width=32, frames=9, steps=10)  # latents (4, 3, 4, 4): 3 x 2 x 2 tokens (odd F': the VAE gives 9 frames)


def write_cogvideox_folder(out, rotary: bool = False, snr_shift_scale: float = 3.0):
    """CogVideoXPipeline's layout with tiny random weights: T5 (16-d), the transformer, a 4-level VAE (8x, 4x)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer, _ = tiny_umt5("a red cat walks on the grass dog runs".split())
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                           num_heads=2, relative_attention_num_buckets=8)).eval()
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=2, sample_width=4, sample_height=4, sample_frames=5, patch_size=2,
        max_text_seq_length=226, use_rotary_positional_embeddings=rotary).eval()
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, latent_channels=4,
                                 down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 layers_per_block=1, norm_num_groups=4, temporal_compression_ratio=4).eval()
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=ddim(snr_shift_scale))
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def cogvideox_folder(tmp_path_factory):
    return write_cogvideox_folder(tmp_path_factory.mktemp("cogvideox") / "cogvideox")


def test_the_real_id_loads_a_diffusers_folder_and_equals_the_pipeline(cogvideox_folder):
    from diffusers import CogVideoXPipeline

    from ertacache.generation import generate
    from ertacache.sampling.sampler import initial_latents

    bundle = load_bundle("cogvideox", cogvideox_folder, dtype="fp32")
    assert bundle.family.name == "cogvideox" and bundle.adapter.noise_schedule.snr_shift_scale == 3.0
    settings = SampleSettings.from_recipe(bundle.recipe, **SIZE)
    assert settings.n_branches == 2 and bundle.encode([PROMPT], "", 2).shape == (2, 226, 16)
    result = generate(bundle, [PROMPT], [0], settings, None)
    assert result.frames.shape == (1, 9, 32, 32, 3) and result.frames.dtype == torch.uint8

    pipe = CogVideoXPipeline.from_pretrained(cogvideox_folder)
    pipe.set_progress_bar_config(disable=True)
    noise = initial_latents(bundle.layout.latent_shape(1, 32, 32, 9)[1:], [0])  # (1, C, F', H', W')
    with torch.no_grad():
        ref = pipe(prompt=PROMPT, negative_prompt="", height=32, width=32, num_frames=9, num_inference_steps=10,
                   guidance_scale=6.0, latents=noise.transpose(1, 2), output_type="latent",
                   return_dict=False)[0].transpose(1, 2)  # (B, F, C, H, W) -> (B, C, F, H, W)
    torch.testing.assert_close(result.latents, ref, rtol=1e-4, atol=1e-4)


def test_a_foreign_shift_and_a_step_count_ddim_cannot_take_are_refused_before_loading(cogvideox_folder):
    from ertacache.sampling.sigmas import request_sigmas

    recipe = load_recipe("cogvideox")
    with pytest.raises(UserError, match="snr_shift_scale"):
        SampleSettings.from_recipe(recipe, shift=5.0, **SIZE)
    with pytest.raises(UserError, match=r"30 steps does not\. Use one of \[10, 20, 25, 40, 50, 100\]"):
        SampleSettings.from_recipe(recipe, **{**SIZE, "steps": 30})
    # a 5B checkpoint (SNR shift 1) loaded under the 2B id (shift 3): the table would not be the model's
    bundle = load_bundle("cogvideox", cogvideox_folder, dtype="fp32")
    attach_noise_schedule(bundle.transformer, VPNoiseSchedule(snr_shift_scale=1.0))
    with pytest.raises(UserError, match="snr_shift_scale \\(1 in this checkpoint\\)"):
        request_sigmas(bundle, SampleSettings.from_recipe(bundle.recipe, **SIZE))


def test_a_scheduler_config_sampled_differently_is_refused_at_load(cogvideox_folder, tmp_path):
    import shutil

    folder = shutil.copytree(cogvideox_folder, tmp_path / "eps")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "epsilon"}))
    with pytest.raises(UserError, match="prediction_type"):
        load_bundle("cogvideox", folder, dtype="fp32")


def test_offline_without_the_weights_names_the_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(ModelNotFoundError, match="hf download THUDM/CogVideoX-5b --local-dir"):
        load_bundle("cogvideox-5b")


def test_the_recipes_hold_the_released_settings():
    """480 x 720, 49 frames, 50 steps, CFG 6; the shift is each checkpoint's snr_shift_scale (2B 3, 5B 1)."""
    for model, shift in (("cogvideox", 3.0), ("cogvideox-5b", 1.0)):
        settings = SampleSettings.from_recipe(load_recipe(model))
        assert (settings.height, settings.width, settings.frames, settings.steps) == (480, 720, 49, 50)
        assert (settings.shift, settings.guidance_scale, settings.guidance) == (shift, 6.0, "cfg")


def test_eval_refuses_a_fewer_steps_row_ddim_cannot_sample_before_any_compute(cogvideox_folder, tmp_path, capsys):
    """10 steps at 3x is a 3-step fewer-steps row: refused by name before the uncached reference runs."""
    from ertacache.cli import eval as eval_cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat walks\na dog runs\n")
    rc = eval_cli.main(["--model", "cogvideox", "--model-path", str(cogvideox_folder), "--steps", "10",
                        "--speedups", "2,3", "--height", "32", "--width", "32", "--frames", "9", "--methods",
                        "fewer-steps", "--seeds", "1000-1001", "--prompts", str(prompts), "--calibration-prompts",
                        str(prompts), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and "the fewer-steps row at 3x samples 3 steps" in err and "Traceback" not in err
