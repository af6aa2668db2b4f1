"""Shared fixtures: tiny models built in code from the real diffusers classes."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from ertacache.models.adapter import adapter_for

#: session-scoped export fixtures (tiny, onnx_export, aoti_export), shared by tests/export, tests/engines, tests/runtime
pytest_plugins = ("tests.export.fixtures",)

#: tiny configs of the real Wan2.1 class: (layers, heads, head_dim, text_dim, patch)
TINY_WAN_CONFIGS = {
    "2x2h": dict(num_layers=2, num_attention_heads=2, attention_head_dim=12, text_dim=16, patch_size=(1, 2, 2)),
    "3x4h": dict(num_layers=3, num_attention_heads=4, attention_head_dim=6, text_dim=8, patch_size=(1, 2, 2)),
    "1x1h-p2t": dict(num_layers=1, num_attention_heads=1, attention_head_dim=24, text_dim=16, patch_size=(2, 2, 2)),
}


def tiny_wan(name: str = "2x2h", seed: int = 0, in_channels: int = 4) -> WanTransformer3DModel:
    """A random WanTransformer3DModel small enough for a unit test (float32, eval mode)."""
    torch.manual_seed(seed)
    cfg = dict(TINY_WAN_CONFIGS[name])
    head_dim = cfg["attention_head_dim"]
    dim = cfg["num_attention_heads"] * head_dim
    model = WanTransformer3DModel(
        in_channels=in_channels,
        out_channels=in_channels,
        freq_dim=32,
        ffn_dim=2 * dim,
        cross_attn_norm=True,
        rope_max_seq_len=64,
        **cfg,
    )
    return model.eval()


@pytest.fixture
def wan_model():
    return tiny_wan()


@pytest.fixture
def wan_adapter(wan_model):
    return adapter_for(wan_model)


def tiny_umt5(words: list[str]):
    """(word-level fast tokenizer over ``words`` + pad/eos/unk, random UMT5 encoder with 16-d states): Wan's text path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = ["<pad>", "</s>", "<unk>", *words]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, relative_attention_num_buckets=8)).eval()
    return tokenizer, text_encoder


def save_tiny_wan_folder(path):
    """A diffusers-format Wan2.1 folder (tokenizer, UMT5, transformer, VAE) with tiny random weights.

    Written by WanPipeline.save_pretrained exactly as the real checkpoint is laid
    out, so --model wan2.1 --model-path PATH exercises the real loading code.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    tokenizer, text_encoder = tiny_umt5("a cat walks on the grass dog runs red car".split())
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=tiny_wan(), vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_wan_folder(tmp_path_factory):
    return save_tiny_wan_folder(tmp_path_factory.mktemp("wan-tiny-random"))


#: fixtures that export, compile or calibrate for tens of seconds on 2 cores: every test that uses one is
#: marked slow, so the fast lane (pytest -m "not slow") never builds them
SLOW_FIXTURES = frozenset({"aoti_export", "aoti_export_k3", "wan_folder_export", "cli_export", "evaluated",
                           "i2v_folder_export", "hunyuan_folder_export", "a14b_folder_export"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
