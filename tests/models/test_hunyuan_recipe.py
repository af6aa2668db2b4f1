"""The real HunyuanVideo id: a diffusers-format folder loads through from_pretrained, offline fails at once with
the fix, and the prompt encoder is HunyuanVideoPipeline's own ``encode_prompt``.

The folder is HunyuanVideoPipeline's layout with tiny random components (a Llama model with a word-level
fast tokenizer that knows the template's special tokens, CLIP with its BPE tokenizer, the transformer,
AutoencoderKLHunyuanVideo), so the family's loaders, prompt encoder and decoder run the real
transformers/diffusers classes, not stand-ins.
"""

import json

import pytest
import torch

from ertacache.errors import ModelNotFoundError
from ertacache.models.loading import load_bundle
from ertacache.models.recipes import load_recipe
from ertacache.sampling.settings import SampleSettings
from tests.models.test_flux_recipes import _clip_tokenizer

SPECIALS = ["<pad>", "<unk>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _llama_tokenizer(folder):
    """A word-level fast tokenizer over a few words, with the chat template's header tokens as special tokens.

    Newlines are tokens, so the pipeline's template puts exactly its ``crop_start`` (95) tokens before
    the prompt, as the real Llama tokenizer does: the crop keeps the prompt and ``<|eot_id|>``.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = "a red cat walks on the grass video describe main content and of".split()
    vocab = {t: i for i, t in enumerate(SPECIALS + ["\n"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.add_tokens([AddedToken("\n", normalized=False)])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "unk_token": "<unk>",
         "model_max_length": 1024}))
    return len(vocab)


def write_hunyuan_folder(out):
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    n_llama = _llama_tokenizer(out / "tokenizer")
    n_clip = _clip_tokenizer(out / "tokenizer_2")
    LlamaModel(LlamaConfig(vocab_size=n_llama, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                           pad_token_id=0)).save_pretrained(out / "text_encoder")
    CLIPTextModel(CLIPTextConfig(vocab_size=n_clip, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                 eos_token_id=1, pad_token_id=1)).save_pretrained(out / "text_encoder_2")
    HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
                                   text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)
                                   ).save_pretrained(out / "transformer")
    AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                              layers_per_block=1, norm_num_groups=4).save_pretrained(out / "vae")
    return out


@pytest.fixture(scope="module")
def hunyuan_folder(tmp_path_factory):
    return write_hunyuan_folder(tmp_path_factory.mktemp("hunyuan") / "hunyuanvideo")


def test_the_real_id_loads_a_diffusers_folder_and_samples(hunyuan_folder):
    from ertacache.generation import generate

    bundle = load_bundle("hunyuanvideo", hunyuan_folder, dtype="fp32")
    assert bundle.family.name == "hunyuanvideo"
    assert type(bundle.transformer).__name__ == "HunyuanVideoTransformer3DModel"
    settings = SampleSettings.from_recipe(bundle.recipe, height=32, width=32, frames=5, steps=3)
    assert settings.guidance == "embedded" and settings.n_branches == 1 and settings.shift == 7.0
    cond = bundle.encode(["a red cat walks on the grass"], "", 1)
    assert cond["prompt_embeds"].shape == (1, 256, 16) and cond["pooled_prompt_embeds"].shape == (1, 8)
    assert cond["prompt_attention_mask"].shape == (1, 256) and 0 < cond["prompt_attention_mask"].sum() < 256
    result = generate(bundle, ["a red cat walks on the grass"], [0], settings, None)
    assert result.frames.shape == (1, 5, 32, 32, 3) and result.frames.dtype == torch.uint8


def test_the_prompt_encoder_is_the_pipelines_encode_prompt(hunyuan_folder):
    """Template, crop, skipped layers, mask and the pooled CLIP vector as HunyuanVideoPipeline makes them."""
    from diffusers import HunyuanVideoPipeline

    bundle = load_bundle("hunyuanvideo", hunyuan_folder, dtype="fp32")
    encoder = bundle.prompt_encoder
    pipe = HunyuanVideoPipeline(text_encoder=encoder.llama, tokenizer=encoder.llama_tokenizer,
                                transformer=bundle.transformer, vae=None, scheduler=None,
                                text_encoder_2=encoder.clip, tokenizer_2=encoder.clip_tokenizer)
    prompts = ["a red cat walks on the grass now", "the video of a cat"]
    with torch.no_grad():
        embeds, pooled, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"))
    ours = encoder.encode(prompts)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(ours["prompt_attention_mask"], mask.float(), rtol=0, atol=0)
    assert ours["prompt_attention_mask"].sum(dim=1).tolist() == [9.0, 6.0]  # the prompt's words and <|eot_id|>


def test_offline_without_the_weights_names_the_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(ModelNotFoundError, match="hf download hunyuanvideo-community/HunyuanVideo --local-dir"):
        load_bundle("hunyuanvideo")


def test_the_recipe_holds_the_released_settings():
    """720 x 1280, 129 frames, 50 steps, the scheduler's shift 7 and the pipeline's default embedded scale 6."""
    settings = SampleSettings.from_recipe(load_recipe("hunyuanvideo"))
    assert (settings.height, settings.width, settings.frames, settings.steps) == (720, 1280, 129, 50)
    assert (settings.shift, settings.guidance_scale, settings.guidance) == (7.0, 6.0, "embedded")


def test_a_tokenizer_that_does_not_fit_the_template_is_refused(hunyuan_folder):
    """A template whose crop removes every prompt token would divide by zero in the token refiner (NaN video):
    the encoder names the mismatch instead."""
    from ertacache.errors import UserError

    encoder = load_bundle("hunyuanvideo", hunyuan_folder, dtype="fp32").prompt_encoder
    encoder.template = {**encoder.template, "crop_start": 400}
    with pytest.raises(UserError, match="crop_start 400 leaves no token of prompt 0"):
        encoder.encode(["a red cat"])
