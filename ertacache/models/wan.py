"""The Wan2.1 text-to-video family: its adapter, its loaders and its :class:`ModelFamily` entry.

Everything the package knows about diffusers' ``WanTransformer3DModel`` that is
not the forward split lives here as data (:data:`WAN_T2V`): video latents
(B, C, F', H', W') with the channel axis at 1, one ``text_embeds`` tensor,
timestep = sigma x 1000, the scheduler's static shift, classifier-free
guidance with both branches batched, the export-time rope rewrite, UMT5 and
``AutoencoderKLWan``. The testbed (:mod:`ertacache.testbed.family`) is a
variant of it: the same transformer class with other components.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ertacache.errors import UserError
from ertacache.models.adapter import ModelAdapter, PreOutput, TransformerCall, bind_call, register_adapter
from ertacache.models.components import LatentDecoder, PromptEncoder, UMT5PromptEncoder, WanLatentDecoder
from ertacache.models.family import CFG, VIDEO, ConditioningInput, ModelFamily, SigmaSchedule, register_family


@dataclass
class _WanHeadInputs:
    temb: torch.Tensor  # (B, D) timestep embedding; (B, N, D) with per-token timesteps (Wan2.2 TI2V)
    grid: tuple[int, int, int, int]  # (B, F', H', W') token grid after patching


@dataclass
class _WanBlockInputs:
    text: torch.Tensor  # (B, L, D) projected text tokens
    timestep_proj: torch.Tensor  # (B, 6, D) per-block shift/scale/gate; (B, N, 6, D) per token
    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (1, N, 1, head_dim) each


@register_adapter("WanTransformer3DModel")
class WanAdapter(ModelAdapter):
    """diffusers ``WanTransformer3DModel`` (Wan2.1 T2V 1.3B/14B and the testbed).

    Mirrors ``WanTransformer3DModel.forward`` for text-to-video (no image
    conditioning). The condition embedder is called piece by piece so that a
    cached step can compute the timestep embedding without projecting the text.

    The timestep is one per sample (B,), or one per token (B, N) as WanPipeline passes it with
    ``expand_timesteps`` (Wan2.2 TI2V-5B): then the embedding, every block's modulation and the
    head's shift/scale are per token, as in the model's forward.
    """

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.model.config.patch_size)

    def _time_embedding(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ce = self.model.condition_embedder
        t_freq = ce.timesteps_proj(timestep.flatten())  # (B, freq_dim), or (B*N, freq_dim) per token
        if timestep.ndim == 2:
            t_freq = t_freq.unflatten(0, timestep.shape)  # (B*N, freq_dim) -> (B, N, freq_dim)
        time_dtype = next(iter(ce.time_embedder.parameters())).dtype
        return ce.time_embedder(t_freq.to(time_dtype)).to(dtype)  # (B, D) or (B, N, D)

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
        # (B, 6*D) -> (B, 6, D); per token (B, N, 6*D) -> (B, N, 6, D)
        timestep_proj = ce.time_proj(ce.act_fn(temb)).unflatten(temb.ndim - 1, (6, -1))
        block_inputs = _WanBlockInputs(
            text=ce.text_embedder(text),  # (B, L, text_dim) -> (B, L, D)
            timestep_proj=timestep_proj,
            rotary=model.rope(latents),
        )
        return PreOutput(hidden=tokens, head_inputs=head_inputs, block_inputs=block_inputs)

    def transformer_call(self, *args, **kwargs) -> TransformerCall:
        """WanPipeline's call: (B, C, F, H, W) latents, (B,) timesteps sigma x 1000, the text states; as is."""
        bound = bind_call(("hidden_states", "timestep", "encoder_hidden_states"), args, kwargs,
                          ignored=("encoder_hidden_states_image", "attention_kwargs"), owner=type(self.model).__name__)
        return TransformerCall(latents=bound["hidden_states"], timestep=bound["timestep"],
                               cond=bound["encoder_hidden_states"], cached_cond=None, to_output=lambda v: v)

    def model_forward(self, latents: torch.Tensor, timestep: torch.Tensor, text) -> torch.Tensor:
        """WanPipeline's call: the latents, the scaled timesteps and the text states as they are."""
        return self.model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]

    def modulated_input(self, pre: PreOutput) -> torch.Tensor:
        """First block's timestep-modulated input norm1(h) * (1 + scale) + shift: (B, N, D).

        The signal TeaCache-style baselines watch to decide reuse at run time.
        """
        if pre.block_inputs is None:
            raise ValueError("modulated_input() needs a PreOutput made with text (a full-step pre)")
        block = self.model.blocks[0]
        proj = pre.block_inputs.timestep_proj.float()
        if proj.ndim == 4:  # per token: (B, N, 6, D)
            mod = block.scale_shift_table.unsqueeze(0) + proj  # (1, 1, 6, D) + (B, N, 6, D)
            shift, scale = mod[:, :, 0], mod[:, :, 1]  # (B, N, D) each
        else:
            mod = block.scale_shift_table + proj  # (B, 6, D)
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
        if temb.ndim == 3:  # per token: (1, 1, 2, D) + (B, N, 1, D) -> (B, N, 2, D)
            shift, scale = (model.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unbind(2)  # (B, N, D) each
        else:
            shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)  # (B, 1, D) each
        hidden = (model.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        out = model.proj_out(hidden)  # (B, N, C*p_t*p_h*p_w)
        out = out.reshape(b, f, h, w, p_t, p_h, p_w, -1)  # (B, F', H', W', pt, ph, pw, C)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, F', pt, H', ph, W', pw)
        return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, F, H, W)



def _load_wan_transformer(path: Path, dtype: torch.dtype) -> nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)


def _load_umt5(path: Path, dtype: torch.dtype) -> PromptEncoder:
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(path / "text_encoder", torch_dtype=dtype).eval()
    return UMT5PromptEncoder(tokenizer, encoder)


def _load_wan_vae(path: Path, dtype: torch.dtype) -> LatentDecoder:
    from diffusers import AutoencoderKLWan

    # WanPipeline keeps the VAE in float32: its decode is sensitive to reduced precision.
    return WanLatentDecoder(AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32).eval())


#: the text-embedding input of every Wan step graph
WAN_TEXT = ConditioningInput("text_embeds", doc="(nb*B, L, D_text) text-encoder states: cond rows, then uncond rows")

WAN_T2V = register_family(ModelFamily(
    name="wan",
    description="Wan2.1 text-to-video (UMT5 text encoder, AutoencoderKLWan)",
    transformer_class="WanTransformer3DModel",
    latent_kind=VIDEO,
    conditioning=(WAN_TEXT,),
    timestep_scale=1000.0,  # diffusers' FlowMatchEulerDiscreteScheduler: timestep = sigma * num_train_timesteps
    sigma_schedule=SigmaSchedule(kind="static"),
    guidance=CFG,
    export_rewrites=("wan_stack_rope",),  # ertacache.export.attention: rope without ScatterND
    transformer=_load_wan_transformer,
    prompt_encoder=_load_umt5,
    decoder=_load_wan_vae,
    required_files=("transformer/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer"),
))
