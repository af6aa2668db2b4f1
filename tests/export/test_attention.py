import torch

from ertacache.export.attention import StackRopeWanAttnProcessor, export_attention, rotate_interleaved
from tests.conftest import tiny_wan


def diffusers_rope(x, cos, sin):
    """diffusers' in-place version, written out: the reference for the stack version."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    return out


def test_rotate_interleaved_equals_the_in_place_version_bit_for_bit():
    x = torch.randn(2, 7, 3, 8)
    cos, sin = torch.randn(1, 7, 1, 8), torch.randn(1, 7, 1, 8)
    assert torch.equal(rotate_interleaved(x, cos, sin), diffusers_rope(x, cos, sin))


def test_swapped_processor_gives_identical_model_output_and_is_restored():
    model = tiny_wan("3x4h")
    x, t, text = torch.randn(2, 4, 2, 8, 8), torch.tensor([500.0, 20.0]), torch.randn(2, 5, 8)
    with torch.no_grad():
        ref = model(x, t, text, return_dict=False)[0]
        with export_attention(model):
            assert all(isinstance(p, StackRopeWanAttnProcessor) for p in model.attn_processors.values())
            got = model(x, t, text, return_dict=False)[0]
    assert (got - ref).abs().max() <= 1e-6
    assert not any(isinstance(p, StackRopeWanAttnProcessor) for p in model.attn_processors.values())
