"""Model adapters: split a diffusion transformer's forward into pre / blocks / head.

Feature caching needs three pieces of a forward pass that the model class
does not expose on its own (DESIGN.md, section 1):

    h_in = pre(x_t, t, text)          # patch embedding, rope, timestep/text conditioning
    h    = blocks(h_in, ...)          # the stack a cached step skips
    v    = head(h, t)                 # norm_out + timestep modulation + proj_out + unpatchify

An adapter reads the model's own submodules (it never changes weights or the
class) and is registered under the model's class name, the way diffusers'
``TransformerBlockRegistry`` keys block metadata by class. Supporting a new
model family means writing one adapter class and decorating it with
:func:`register_adapter`; nothing else in the package branches on the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ertacache.errors import UserError

_ADAPTERS: dict[str, type["ModelAdapter"]] = {}


def register_adapter(class_name: str) -> Callable[[type["ModelAdapter"]], type["ModelAdapter"]]:
    """Register an adapter class for transformers whose class is named ``class_name``."""

    def decorator(cls: type["ModelAdapter"]) -> type["ModelAdapter"]:
        _ADAPTERS[class_name] = cls
        return cls

    return decorator


def adapter_for(model: nn.Module) -> "ModelAdapter":
    """Return the adapter that knows how to split ``model``'s forward."""
    name = type(model).__name__
    if name not in _ADAPTERS:
        raise UserError(
            f"No ERTACache adapter for model class {name!r}. Supported classes: "
            f"{sorted(_ADAPTERS)}. Add one with @register_adapter({name!r}) in ertacache/models/."
        )
    return _ADAPTERS[name](model)


@dataclass
class PreOutput:
    """What `pre` hands to `blocks` and `head`.

    ``block_inputs`` is None for a cached step: a cached step needs only the
    tokens (to add the stored residual to) and the timestep embedding (for the
    head), not the rope tables, the text projection or the per-block modulation.
    """

    hidden: torch.Tensor  # (B, N, D) tokens entering the block stack
    head_inputs: Any  # adapter-specific, consumed by `head` (e.g. temb and the token grid)
    block_inputs: Any | None  # adapter-specific, consumed by `blocks`; None on cached steps


class ModelAdapter:
    """Base class: subclasses implement the three pieces for one model family."""

    #: attribute holding the latent channel count in the model config
    in_channels_key: ClassVar[str] = "in_channels"

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def in_channels(self) -> int:
        return int(self.model.config[self.in_channels_key])

    @property
    def patch_size(self) -> tuple[int, ...]:
        raise NotImplementedError

    def pre(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor | None) -> PreOutput:
        """Embed the latent video (and, unless ``text`` is None, everything the blocks need)."""
        raise NotImplementedError

    def modulated_input(self, pre: PreOutput) -> torch.Tensor:
        """The first block's timestep-modulated input (for TeaCache-style baselines)."""
        raise NotImplementedError

    def blocks(self, pre: PreOutput) -> torch.Tensor:
        """Run the transformer block stack; returns hidden states shaped like ``pre.hidden``."""
        raise NotImplementedError

    def head(self, hidden: torch.Tensor, pre: PreOutput) -> torch.Tensor:
        """Map block-stack output back to a velocity shaped like the latents."""
        raise NotImplementedError

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``head(blocks(pre(...)))``: must equal the model's own forward."""
        pre = self.pre(latents, timestep, text)
        return self.head(self.blocks(pre), pre)


@dataclass
class _WanHeadInputs:
    temb: torch.Tensor  # (B, D) timestep embedding
    grid: tuple[int, int, int, int]  # (B, F', H', W') token grid after patching


@dataclass
class _WanBlockInputs:
    text: torch.Tensor  # (B, L, D) projected text tokens
    timestep_proj: torch.Tensor  # (B, 6, D) per-block shift/scale/gate
    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (1, N, 1, head_dim) each


@register_adapter("WanTransformer3DModel")
class WanAdapter(ModelAdapter):
    """diffusers ``WanTransformer3DModel`` (Wan2.1 T2V 1.3B/14B and the testbed).

    Mirrors ``WanTransformer3DModel.forward`` for text-to-video (no image
    conditioning, one timestep per sample). The condition embedder is called
    piece by piece so that a cached step can compute the timestep embedding
    without projecting the text.
    """

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.model.config.patch_size)

    def _time_embedding(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ce = self.model.condition_embedder
        t_freq = ce.timesteps_proj(timestep)  # (B, freq_dim)
        time_dtype = next(iter(ce.time_embedder.parameters())).dtype
        return ce.time_embedder(t_freq.to(time_dtype)).to(dtype)  # (B, D)

    def pre(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor | None) -> PreOutput:
        model = self.model
        if model.config.image_dim is not None:
            raise UserError("The Wan adapter supports text-to-video models only (image_dim must be None).")
        b, _, f, h, w = latents.shape
        p_t, p_h, p_w = self.patch_size
        grid = (b, f // p_t, h // p_h, w // p_w)

        tokens = model.patch_embedding(latents)  # (B, D, F', H', W')
        tokens = tokens.flatten(2).transpose(1, 2).contiguous()  # (B, N, D), N = F'*H'*W'
        dtype = text.dtype if text is not None else tokens.dtype
        temb = self._time_embedding(timestep, dtype)  # (B, D)
        head_inputs = _WanHeadInputs(temb=temb, grid=grid)
        if text is None:
            return PreOutput(hidden=tokens, head_inputs=head_inputs, block_inputs=None)

        ce = model.condition_embedder
        timestep_proj = ce.time_proj(ce.act_fn(temb)).unflatten(1, (6, -1))  # (B, 6*D) -> (B, 6, D)
        block_inputs = _WanBlockInputs(
            text=ce.text_embedder(text),  # (B, L, text_dim) -> (B, L, D)
            timestep_proj=timestep_proj,
            rotary=model.rope(latents),
        )
        return PreOutput(hidden=tokens, head_inputs=head_inputs, block_inputs=block_inputs)

    def modulated_input(self, pre: PreOutput) -> torch.Tensor:
        """First block's timestep-modulated input norm1(h) * (1 + scale) + shift: (B, N, D).

        The signal TeaCache-style baselines watch to decide reuse at run time.
        """
        if pre.block_inputs is None:
            raise ValueError("modulated_input() needs a PreOutput made with text (a full-step pre)")
        block = self.model.blocks[0]
        mod = block.scale_shift_table + pre.block_inputs.timestep_proj.float()  # (B, 6, D)
        shift, scale = mod[:, 0:1], mod[:, 1:2]  # (B, 1, D) each
        return block.norm1(pre.hidden.float()) * (1 + scale) + shift

    def blocks(self, pre: PreOutput) -> torch.Tensor:
        if pre.block_inputs is None:
            raise ValueError("blocks() needs a PreOutput made with text (a full step), got a cached-step one")
        bi = pre.block_inputs
        hidden = pre.hidden
        for block in self.model.blocks:
            hidden = block(hidden, bi.text, bi.timestep_proj, bi.rotary)
        return hidden

    def head(self, hidden: torch.Tensor, pre: PreOutput) -> torch.Tensor:
        model = self.model
        temb, (b, f, h, w) = pre.head_inputs.temb, pre.head_inputs.grid
        p_t, p_h, p_w = self.patch_size
        shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)  # (B, 1, D) each
        hidden = (model.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        out = model.proj_out(hidden)  # (B, N, C*p_t*p_h*p_w)
        out = out.reshape(b, f, h, w, p_t, p_h, p_w, -1)  # (B, F', H', W', pt, ph, pw, C)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, F', pt, H', ph, W', pw)
        return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, F, H, W)

