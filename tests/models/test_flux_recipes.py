"""The real FLUX.1 ids: a diffusers-format folder loads through from_pretrained, offline fails at once with the fix.

The folder is FluxPipeline's layout with tiny random components (CLIP + its BPE tokenizer, T5 + a
fast tokenizer, the transformer, AutoencoderKL), so the family's loaders, prompt encoder and
decoder run the real transformers/diffusers classes, not stand-ins.
"""

import json

import pytest
import torch

from ertacache.errors import ModelNotFoundError, UserError
from ertacache.models.loading import load_bundle
from ertacache.models.recipes import load_recipe
from ertacache.sampling.settings import SampleSettings


def _clip_tokenizer(folder):
    """A character-level CLIP BPE vocabulary (no merges): every lowercase letter, with and without the word end."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in letters + [f"{c}</w>" for c in letters]:
        vocab[token] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return len(vocab)


def _t5_tokenizer(folder):
    """A Unigram fast tokenizer (tokenizer.json) over a few words, the model type T5TokenizerFast reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -1.0) for w in "a cat red digit on the".split()]
    pieces += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 512, "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
         "tokenizer_class": "T5Tokenizer"}))
    return len(pieces)


def write_flux_folder(out, guidance_embeds: bool):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    n_clip = _clip_tokenizer(out / "tokenizer")
    n_t5 = _t5_tokenizer(out / "tokenizer_2")
    CLIPTextModel(CLIPTextConfig(vocab_size=n_clip, hidden_size=12, intermediate_size=24, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                 eos_token_id=1, pad_token_id=1)
                  ).save_pretrained(out / "text_encoder")
    T5EncoderModel(T5Config(vocab_size=n_t5, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
                   ).save_pretrained(out / "text_encoder_2")
    FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=12,
                           guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4)).save_pretrained(out / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  norm_num_groups=4, layers_per_block=1, shift_factor=0.1, scaling_factor=0.5
                  ).save_pretrained(out / "vae")
    return out


@pytest.mark.parametrize("model_id, guidance_embeds, mode", [("flux.1-dev", True, "embedded"),
                                                              ("flux.1-schnell", False, "none")])
def test_real_ids_load_a_diffusers_folder_and_sample(tmp_path, model_id, guidance_embeds, mode):
    from ertacache.generation import generate

    folder = write_flux_folder(tmp_path / model_id, guidance_embeds)
    bundle = load_bundle(model_id, folder, dtype="fp32")
    assert bundle.family.name == "flux" and type(bundle.transformer).__name__ == "FluxTransformer2DModel"
    settings = SampleSettings.from_recipe(bundle.recipe, height=64, width=64, steps=3)
    assert settings.guidance == mode and settings.n_branches == 1
    cond = bundle.encode(["a red cat"], "", 1)
    assert cond["prompt_embeds"].shape == (1, 512, 32) and cond["pooled_prompt_embeds"].shape == (1, 12)
    result = generate(bundle, ["a red cat"], [0], settings, None)
    assert result.frames.shape == (1, 1, 64, 64, 3) and result.frames.dtype == torch.uint8


def test_offline_without_the_weights_names_the_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    for model_id, hub in (("flux.1-dev", "black-forest-labs/FLUX.1-dev"),
                          ("flux.1-schnell", "black-forest-labs/FLUX.1-schnell")):
        with pytest.raises(ModelNotFoundError, match=f"hf download {hub} --local-dir"):
            load_bundle(model_id)


def test_flags_the_model_cannot_take_are_refused_before_loading():
    with pytest.raises(UserError, match="flux.1-schnell model takes no guidance"):
        SampleSettings.from_recipe(load_recipe("flux.1-schnell"), guidance_scale=4.0)
    with pytest.raises(UserError, match="flux.1-dev generates images: --frames"):
        SampleSettings.from_recipe(load_recipe("flux.1-dev"), frames=5)
    assert SampleSettings.from_recipe(load_recipe("flux.1-dev")).guidance_scale == 3.5


def test_the_flux_family_runs_its_checkpoints_guidance_modes():
    """A guidance-distilled family also runs guidance-free checkpoints ("none") and true CFG ("cfg"); Wan only CFG."""
    from ertacache.models.family import family_named

    flux = family_named("flux")
    assert all(map(flux.accepts_guidance, ("embedded", "none", "cfg")))
    assert not family_named("wan").accepts_guidance("none") and not family_named("wan").accepts_guidance("embedded")
    tiny = SampleSettings.from_recipe(load_recipe("flux-tiny"))  # trained with an empty-prompt branch: true CFG
    assert tiny.guidance == "cfg" and tiny.n_branches == 2
    assert SampleSettings.from_recipe(load_recipe("flux-tiny"), guidance_scale=1.0).n_branches == 1


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schnell_samples_on_its_schedulers_table(tmp_path, shift):
    """FLUX.1-schnell ships FlowMatchEulerDiscreteScheduler(shift=1, use_dynamic_shifting=False), which
    FluxPipeline feeds its ramp linspace(1, 1/T, T): the recipe's "ramp" schedule gives that table."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ertacache.sampling.sigmas import request_sigmas

    bundle = load_bundle("flux.1-schnell", write_flux_folder(tmp_path / "schnell", False), dtype="fp32")
    for steps in (4, 9):
        settings = SampleSettings.from_recipe(bundle.recipe, height=64, width=64, steps=steps, shift=shift)
        sched = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
        sched.set_timesteps(sigmas=list(torch.linspace(1, 1 / steps, steps).numpy()))
        want = sched.sigmas.double().numpy()
        got = request_sigmas(bundle, settings)
        assert got.shape == want.shape and abs(got - want).max() < 1e-6, (got, want)
    assert request_sigmas(bundle, SampleSettings.from_recipe(bundle.recipe, steps=4))[:4].tolist() == \
        pytest.approx([1.0, 0.75, 0.5, 0.25])
