import pytest
import torch

from ertacache.export.attention import StackRopeWanAttnProcessor, export_attention, family_rewrites, rotate_interleaved
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


def tiny_flux():
    """A random diffusers FluxTransformer2DModel: a diffusers attention model of another family (no export rewrites)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()


def test_the_wan_rewrite_leaves_a_model_of_another_diffusers_class_untouched():
    from ertacache.models.family import find_family

    model = tiny_flux()
    assert hasattr(model, "set_attn_processor") and find_family(model).name == "flux"
    assert find_family(model).export_rewrites == ()
    before = {name: type(p) for name, p in model.attn_processors.items()}
    with export_attention(model) as same:
        assert same is model
        assert {name: type(p) for name, p in model.attn_processors.items()} == before
        assert not any(isinstance(p, StackRopeWanAttnProcessor) for p in model.attn_processors.values())
    with family_rewrites(model) as applied:
        assert applied == ()
        assert {name: type(p) for name, p in model.attn_processors.items()} == before


def test_family_rewrites_apply_what_the_wan_family_declares_and_undo_it():
    model = tiny_wan("3x4h")
    with family_rewrites(model) as applied:
        assert applied == ("wan_stack_rope",)
        assert all(isinstance(p, StackRopeWanAttnProcessor) for p in model.attn_processors.values())
    assert not any(isinstance(p, StackRopeWanAttnProcessor) for p in model.attn_processors.values())


def test_a_family_declaring_an_unknown_rewrite_is_named(monkeypatch):
    import dataclasses

    import ertacache.models.family as family_mod
    from ertacache.models.wan import WAN_T2V

    monkeypatch.setattr(family_mod, "_FAMILIES", dict(family_mod._FAMILIES))
    monkeypatch.setitem(family_mod._FAMILIES, "wan", dataclasses.replace(WAN_T2V, export_rewrites=("fuse_everything",)))
    model = tiny_wan("3x4h")
    with pytest.raises(ValueError, match="declares export rewrites \\['fuse_everything'\\].*EXPORT_REWRITES"):
        with family_rewrites(model):
            pass
    assert not any(isinstance(p, StackRopeWanAttnProcessor) for p in model.attn_processors.values())
