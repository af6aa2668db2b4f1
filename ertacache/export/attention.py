"""An export-friendly attention processor for Wan's self- and cross-attention.

diffusers' ``WanAttnProcessor`` applies the rotary embedding by writing the two
rotated halves into strided slices of an empty tensor (``out[..., 0::2] = ...``).
``torch.onnx.export`` lowers those in-place slice writes to ``ScatterND``, which
TensorRT handles as a slow generic scatter and which blocks its attention fusion.
Here the same numbers are built with ``torch.stack`` + ``flatten`` (interleave the
two halves), which exports as Unsqueeze/Concat/Reshape. Numerically identical:
the same products and sums, in the same order, only the memory writes differ.

Installed only for the duration of an export through the model's public
``set_attn_processor`` and restored afterwards (:func:`export_attention`), so the
eager model the validation compares against keeps diffusers' own processor.
Swap-and-restore instead of a deep copy: a copy would double the memory of a
14B transformer during export.

It is the Wan family's export-time rewrite (``"wan_stack_rope"`` in
:data:`ertacache.models.wan.WAN_T2V`'s ``export_rewrites``): it is applied only to a
model whose family declares it (:func:`family_rewrites`), never to another diffusers
model, whose attention modules this processor does not know.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ertacache.models.family import find_family


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs, without in-place slice writes.

    x: (B, N, heads, head_dim); cos, sin: (1, N, 1, head_dim) with each
    frequency repeated for the pair (diffusers' layout). Returns x's dtype.
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, N, h, hd/2) each: even and odd lanes
    cos = cos[..., 0::2]  # (1, N, 1, hd/2)
    sin = sin[..., 1::2]
    even = x1 * cos - x2 * sin
    odd = x1 * sin + x2 * cos
    return torch.stack((even, odd), dim=-1).flatten(-2).type_as(x)  # (B, N, h, hd), lanes interleaved


#: Wan's text context length: an I2V cross-attention's context is [image tokens; these many text tokens]
WAN_TEXT_TOKENS = 512


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask=None) -> torch.Tensor:
    """(B, N, h, hd) queries over (B, M, h, hd) keys/values -> (B, N, h*hd); SDPA wants heads before tokens."""
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_mask=mask, dropout_p=0.0, is_causal=False).transpose(1, 2)
    return out.flatten(2, 3).type_as(query)  # (B, N, h, hd) -> (B, N, h*hd)


class StackRopeWanAttnProcessor:
    """Wan attention with :func:`rotate_interleaved` for the rope.

    Supports what Wan2.1 T2V and I2V use: separate or fused q/k/v projections, the q/k RMS norms,
    rope on self-attention, and I2V's image cross-attention (``add_k_proj``: the context's first
    tokens are the image's, the last :data:`WAN_TEXT_TOKENS` the text's; the queries attend to each
    separately and the two outputs are summed before the output projection, as diffusers' processor
    does).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        image_context = None
        if attn.add_k_proj is not None and encoder_hidden_states is not None:
            split = encoder_hidden_states.shape[1] - WAN_TEXT_TOKENS  # image tokens first
            image_context, encoder_hidden_states = encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if getattr(attn, "fused_projections", False):
            if encoder_hidden_states is None:
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                query = attn.to_q(hidden_states)
                key, value = attn.to_kv(context).chunk(2, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)  # (B, N|L, h*hd)

        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # (B, N, h, hd)
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))  # (B, N|L, h, hd)
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = rotate_interleaved(query, *rotary_emb)
            key = rotate_interleaved(key, *rotary_emb)

        out = _attend(query, key, value, attention_mask)  # (B, N, h*hd)
        if image_context is not None:
            if getattr(attn, "fused_projections", False):
                key_img, value_img = attn.to_added_kv(image_context).chunk(2, dim=-1)
            else:
                key_img, value_img = attn.add_k_proj(image_context), attn.add_v_proj(image_context)  # (B, M, h*hd)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))  # (B, M, h, hd)
            value_img = value_img.unflatten(2, (attn.heads, -1))
            out = out + _attend(query, key_img, value_img)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


#: the rewrite's name in a family's ``export_rewrites``
WAN_STACK_ROPE = "wan_stack_rope"


def _declares(model: nn.Module, rewrite: str) -> bool:
    family = find_family(model)
    return family is not None and rewrite in family.export_rewrites


@contextlib.contextmanager
def export_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Install :class:`StackRopeWanAttnProcessor` on every attention of ``model``, restore on exit.

    Only for a model whose family declares the ``"wan_stack_rope"`` rewrite (the Wan family);
    any other model, diffusers or not, is yielded unchanged.
    """
    if not _declares(model, WAN_STACK_ROPE) or not hasattr(model, "set_attn_processor") \
            or not hasattr(model, "attn_processors"):
        yield model
        return
    original = dict(model.attn_processors)
    model.set_attn_processor(StackRopeWanAttnProcessor())
    try:
        yield model
    finally:
        model.set_attn_processor(original)


#: export-time rewrites by the name a family declares: each a context manager over the model
EXPORT_REWRITES = {WAN_STACK_ROPE: export_attention}


@contextlib.contextmanager
def family_rewrites(model: nn.Module) -> Iterator[tuple[str, ...]]:
    """Apply, for the duration of an export, every rewrite ``model``'s family declares; yield their names.

    A model without a family, or whose family declares none, is exported as it is (yields ``()``).
    """
    family = find_family(model)
    names = family.export_rewrites if family is not None else ()
    unknown = [n for n in names if n not in EXPORT_REWRITES]
    if unknown:
        raise ValueError(f"model family {family.name!r} declares export rewrites {unknown} that "
                         f"ertacache.export does not have (known: {sorted(EXPORT_REWRITES)}); add them to "
                         "EXPORT_REWRITES in ertacache/export/attention.py")
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(EXPORT_REWRITES[name](model))
        yield names
