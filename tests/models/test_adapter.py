import pytest
import torch
from torch import nn

from ertacache.errors import UserError
from ertacache.models.adapter import adapter_for
from tests.conftest import TINY_WAN_CONFIGS, tiny_wan


@pytest.mark.parametrize("name", sorted(TINY_WAN_CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_head_of_pre_plus_blocks_equals_model_forward(name, batch):
    model = tiny_wan(name, seed=batch)
    adapter = adapter_for(model)
    p_t = model.config.patch_size[0]
    x = torch.randn(batch, 4, 2 * p_t, 8, 6)  # (B, C, F, H, W)
    t = torch.rand(batch) * 1000
    text = torch.randn(batch, 5, model.config.text_dim)
    with torch.no_grad():
        expected = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        pre = adapter.pre(x, t, text)
        got = adapter.head(adapter.blocks(pre), pre)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_cached_pre_skips_text_but_gives_same_tokens(wan_adapter):
    x = torch.randn(2, 4, 2, 8, 8)
    t = torch.tensor([500.0, 10.0])
    text = torch.randn(2, 5, 16)
    with torch.no_grad():
        full = wan_adapter.pre(x, t, text)
        cached = wan_adapter.pre(x, t, None)
    assert cached.block_inputs is None
    torch.testing.assert_close(cached.hidden, full.hidden)
    torch.testing.assert_close(cached.head_inputs.temb, full.head_inputs.temb)
    with pytest.raises(ValueError, match="full step"):
        wan_adapter.blocks(cached)


def test_unknown_model_class_names_the_fix():
    with pytest.raises(UserError, match="register_adapter"):
        adapter_for(nn.Linear(2, 2))


def test_modulated_input_is_what_the_first_block_feeds_its_self_attention(wan_model, wan_adapter):
    x, t, text = torch.randn(2, 4, 2, 8, 8), torch.tensor([900.0, 100.0]), torch.randn(2, 5, 16)
    seen = {}
    attn = wan_model.blocks[0].attn1
    handle = attn.register_forward_pre_hook(lambda mod, args: seen.setdefault("in", args[0]))
    with torch.no_grad():
        pre = wan_adapter.pre(x, t, text)
        wan_adapter.blocks(pre)
        mod = wan_adapter.modulated_input(pre)
    handle.remove()
    torch.testing.assert_close(mod, seen["in"].float(), rtol=0, atol=1e-6)


def test_transformer_call_takes_a_pipelines_arguments_and_refuses_what_it_does_not_mirror(wan_model, wan_adapter):
    """WanPipeline's call (positional or keyword) maps onto the adapter; image conditioning or unknown names do not."""
    x, t, text = torch.randn(1, 4, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, 16)
    call = wan_adapter.transformer_call(x, t, encoder_hidden_states=text, attention_kwargs=None)
    assert call.latents is x and call.timestep is t and call.cond is text and call.cached_cond is None
    assert call.to_output(x) is x
    with pytest.raises(UserError, match="does not support 'encoder_hidden_states_image'"):
        wan_adapter.transformer_call(x, t, text, encoder_hidden_states_image=torch.zeros(1, 257, 16))
    with pytest.raises(TypeError, match="unexpected argument 'guidance'"):
        wan_adapter.transformer_call(x, t, text, guidance=torch.ones(1))
    with pytest.raises(TypeError, match="'timestep' twice"):
        wan_adapter.transformer_call(x, t, text, timestep=t)
