"""Shared fixtures: tiny models built in code from the real diffusers classes."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from ertacache.models.adapter import adapter_for

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
