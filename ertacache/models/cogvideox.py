"""CogVideoX's forward split (issue 17, first piece): the adapter, before the family and its sampler.

diffusers' ``CogVideoXTransformer3DModel`` (CogVideoX-2B / -5B text-to-video) differs from the
flow-matching families in three ways that matter here:

* **the text is in the sequence**: ``patch_embed(text, video)`` returns the projected text tokens
  followed by the video tokens (with 2B's sincos positional table added over both, zero on the
  text part), and every block takes and returns both streams. The head reads the video tokens
  only (``norm_final``, ``norm_out(., temb)``, ``proj_out``), so the block-stack residual a cached
  step needs is the video stream's; the text stream after the last block is never read.
* **the latents are (B, F, C, H, W)**: the adapter transposes at its boundary, so the sampler, the
  per-channel correction tables (channel axis 1) and the graphs keep the project's (B, C, F, H, W).
* **it is a v-prediction model under a DDIM scheduler**, not a flow-matching velocity under Euler:
  the family entry, its step update and the pipeline integration are not written yet
  (docs/families.md, "Not done yet in issue 17"), so this module registers no family, and no
  stage can run a CogVideoX checkpoint yet. What is here, the split, is checked against the
  model's own forward (tests/models/test_cogvideox_adapter.py).

5B's rotary embeddings are made by ``CogVideoXPipeline._prepare_rotary_positional_embeddings`` and
passed to the forward; :meth:`CogVideoXAdapter.rotary` builds them the same way from the latent grid
with diffusers' own ``get_3d_rotary_pos_embed`` (CogVideoX 1.0 layout; 1.5's temporal patch and its
``ofs`` embedding are refused).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ertacache.errors import UserError
from ertacache.models.adapter import ModelAdapter, PreOutput, register_adapter


@dataclass
class _CogHeadInputs:
    temb: torch.Tensor  # (B, D) timestep embedding
    grid: tuple[int, int, int, int]  # (B, F, H', W'): latent frames (not patched in time) and the patch grid


@dataclass
class _CogBlockInputs:
    text: torch.Tensor  # (B, L, D) projected text tokens (the first L tokens of the patch embedding)
    rotary: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin: (F * H' * W', head_dim) each; None for 2B


@register_adapter("CogVideoXTransformer3DModel")
class CogVideoXAdapter(ModelAdapter):
    """diffusers ``CogVideoXTransformer3DModel`` (CogVideoX 1.0 text-to-video: 2B and 5B).

    ``text`` is the T5 states (B, L, D_text) with L = ``max_text_seq_length`` (226), as the pipeline
    pads them: the positional table covers exactly that many text tokens. A cached step (``text``
    None) embeds the video tokens with an all-zero text (the video tokens do not depend on the
    text's values, only on its length).
    """

    @property
    def patch_size(self) -> tuple[int, int, int]:
        cfg = self.model.config
        return (1, int(cfg.patch_size), int(cfg.patch_size))

    @property
    def in_channels(self) -> int:
        """Channels C of the latents being denoised (the output's; an I2V model's input adds the image latents)."""
        cfg = self.model.config
        return int(cfg.out_channels or cfg.in_channels)

    def _check_supported(self) -> None:
        cfg = self.model.config
        if cfg.patch_size_t is not None or getattr(self.model, "ofs_embedding", None) is not None:
            raise UserError("the CogVideoX adapter mirrors CogVideoX 1.0 (2B / 5B: no temporal patch, no ofs "
                            "embedding); CogVideoX 1.5 is not supported yet")
        if cfg.in_channels != cfg.out_channels:
            raise UserError("the CogVideoX adapter mirrors text-to-video (input channels = output channels); "
                            "CogVideoX I2V concatenates image latents and is not supported yet")

    def rotary(self, frames: int, grid_h: int, grid_w: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """5B's rotary tables for a (frames, grid_h, grid_w) token grid, as CogVideoXPipeline makes them; None for
        a model without rotary embeddings (2B)."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        cfg = self.model.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        p = int(cfg.patch_size)
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), cfg.sample_width // p, cfg.sample_height // p)
        return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops,
                                       grid_size=(grid_h, grid_w), temporal_size=frames, device=device)

    def pre(self, latents: torch.Tensor, timestep: torch.Tensor, text) -> PreOutput:
        model = self.model
        self._check_supported()
        b, _, f, h, w = latents.shape
        _, p_h, p_w = self.patch_size
        grid = (b, f, h // p_h, w // p_w)
        x = latents.transpose(1, 2)  # (B, C, F, H, W) -> (B, F, C, H, W), the model's layout
        # the model's own time path: sinusoidal projection, then the MLP (no timestep_cond for text-to-video)
        temb = model.time_embedding(model.time_proj(timestep).to(x.dtype), None)  # (B, D)
        cfg = model.config
        words = text if text is not None else x.new_zeros(b, cfg.max_text_seq_length, cfg.text_embed_dim)
        joint = model.embedding_dropout(model.patch_embed(words, x))  # (B, L + N, D): text tokens, then video
        length = words.shape[1]
        tokens = joint[:, length:]  # (B, N, D), N = F * H' * W'
        head_inputs = _CogHeadInputs(temb=temb, grid=grid)
        if text is None:
            return PreOutput(hidden=tokens, head_inputs=head_inputs, block_inputs=None)
        return PreOutput(hidden=tokens, head_inputs=head_inputs,
                         block_inputs=_CogBlockInputs(text=joint[:, :length],
                                                      rotary=self.rotary(f, *grid[2:], latents.device)))

    def modulated_input(self, pre: PreOutput) -> torch.Tensor:
        """First block's AdaLN-modulated video tokens (the signal TeaCache-style baselines watch): (B, N, D)."""
        if pre.block_inputs is None:
            raise ValueError("modulated_input() needs a full-step PreOutput")
        block = self.model.transformer_blocks[0]
        hidden, _, _, _ = block.norm1(pre.hidden, pre.block_inputs.text, pre.head_inputs.temb)
        return hidden

    def blocks(self, pre: PreOutput) -> torch.Tensor:
        if pre.block_inputs is None:
            raise ValueError("blocks() needs a PreOutput made with text (a full step), got a cached-step one")
        bi, temb = pre.block_inputs, pre.head_inputs.temb
        hidden, text = pre.hidden, bi.text
        for block in self.model.transformer_blocks:
            hidden, text = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb,
                                 image_rotary_emb=bi.rotary)
        return hidden  # (B, N, D): the video tokens; the head never reads the text stream

    def head(self, hidden: torch.Tensor, pre: PreOutput) -> torch.Tensor:
        model = self.model
        b, f, h, w = pre.head_inputs.grid
        _, p_h, p_w = self.patch_size
        out = model.proj_out(model.norm_out(model.norm_final(hidden), temb=pre.head_inputs.temb))  # (B, N, C*ph*pw)
        out = out.reshape(b, f, h, w, -1, p_h, p_w)  # (B, F, H', W', C, ph, pw)
        out = out.permute(0, 4, 1, 2, 5, 3, 6)  # (B, C, F, H', ph, W', pw)
        return out.flatten(5, 6).flatten(3, 4)  # (B, C, F, H, W)
