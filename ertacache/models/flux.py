"""The FLUX.1 text-to-image family: its adapter, its loaders and its :class:`ModelFamily` entry.

What differs from Wan (:mod:`ertacache.models.wan`), all of it here as data or in the adapter:

* **Latents** are images (B, C, H', W') that the pipeline packs 2 x 2 into tokens of 4C
  channels before the transformer's linear ``x_embedder`` (``packing=2``; the adapter packs
  and unpacks, so every stage keeps the unpacked (B, C, H', W') layout and a per-channel
  correction table still indexes axis 1).
* **Two conditioning tensors**: the T5 states ``prompt_embeds`` (B, L, 4096), which only the
  block stack reads, and CLIP's pooled ``pooled_prompt_embeds`` (B, 768), which the timestep
  embedding reads, so a *cached* step needs it too (``ConditioningInput.cached_step``).
  The rope position ids (``txt_ids`` zeros, ``img_ids`` the token grid) follow from the
  shapes and are made inside ``pre``, so static graphs fold them to constants.
* **Timestep** = sigma: FluxPipeline passes ``timestep / 1000`` and the transformer
  multiplies by 1000 itself (``timestep_scale=1``).
* **Sigma schedule**: the resolution-dependent dynamic shift (``SigmaSchedule(kind="dynamic")``).
* **Guidance**: FLUX.1-dev embeds the guidance scale (``"embedded"``: one branch, the scale
  goes into ``pre`` as ``cond["guidance"]``); schnell has no guidance embedder.
* **The cached residual** is the image tokens' residual over the whole stack (19 double-stream
  then 38 single-stream blocks in FLUX.1); the text tokens leave the stack unused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ertacache.errors import UserError
from ertacache.models.adapter import ModelAdapter, PreOutput, TransformerCall, bind_call, register_adapter
from ertacache.models.components import diffusers_loader, to_uint8_frames
from ertacache.models.family import EMBEDDED, IMAGE, ConditioningInput, ModelFamily, SigmaSchedule, register_family

#: the T5 states: (B, L, joint_attention_dim); only the block stack reads them
FLUX_PROMPT = ConditioningInput("prompt_embeds", doc="(B, L, D_t5) T5 encoder states")
#: CLIP's pooled text vector: (B, pooled_projection_dim); the timestep embedding reads it, cached steps too
FLUX_POOLED = ConditioningInput("pooled_prompt_embeds", doc="(B, D_clip) CLIP pooled output", cached_step=True)

PACK = 2  # latent pixels per token side (FluxPipeline packs 2 x 2)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H', W') -> (B, H'/2 * W'/2, 4C) tokens, channel-major within each 2 x 2 cell (FluxPipeline's order)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // PACK, PACK, w // PACK, PACK)  # (B, C, h, 2, w, 2)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, 2, 2)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)  # (B, h*w, 4C)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: (B, h*w, 4C) -> (B, C, H', W') for a latent of H' x W'."""
    b, _, d = tokens.shape
    h, w, c = height // PACK, width // PACK, d // (PACK * PACK)
    x = tokens.reshape(b, h, w, c, PACK, PACK)  # (B, h, w, C, 2, 2)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, h, 2, w, 2)
    return x.reshape(b, c, height, width)  # (B, C, H', W')


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h*w, 3) rope position ids of the packed token grid: (0, row, column), row-major like the packing."""
    rows = torch.arange(h, device=device, dtype=dtype).view(h, 1).expand(h, w)  # (h, w)
    cols = torch.arange(w, device=device, dtype=dtype).view(1, w).expand(h, w)  # (h, w)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3)  # (h*w, 3)


@dataclass
class _FluxHeadInputs:
    temb: torch.Tensor  # (B, D) timestep (+ guidance) + pooled-text embedding
    size: tuple[int, int]  # (H', W') of the unpacked latent


@dataclass
class _FluxBlockInputs:
    text: torch.Tensor  # (B, L, D) context-embedded T5 states
    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (L + N, head_dim) each


@register_adapter("FluxTransformer2DModel")
class FluxAdapter(ModelAdapter):
    """diffusers ``FluxTransformer2DModel`` (FLUX.1-dev/schnell and the flux testbed).

    Mirrors ``FluxTransformer2DModel.forward`` without ControlNet or IP-Adapter inputs.
    ``cond`` is a mapping with ``prompt_embeds`` (full steps), ``pooled_prompt_embeds``
    (every step) and, for a guidance-distilled model, ``guidance`` (B,) scales; optional
    ``txt_ids`` / ``img_ids`` replace the ids made from the shapes.
    """

    @property
    def patch_size(self) -> tuple[int, int]:
        p = int(self.model.config.patch_size)
        return (p, p)

    @property
    def in_channels(self) -> int:
        """Latent channels C of the unpacked (B, C, H', W') layout: the config's in_channels counts a
        packed token's 4C."""
        return int(self.model.config.in_channels) // (PACK * PACK)

    def _temb(self, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        model = self.model
        if "pooled_prompt_embeds" not in cond:
            raise ValueError("the FLUX adapter needs cond['pooled_prompt_embeds'] on every step (the timestep "
                             "embedding reads it)")
        pooled = cond["pooled_prompt_embeds"]  # (B, D_clip)
        t = timestep.to(dtype) * 1000  # the model takes sigma and scales it itself
        if model.config.guidance_embeds:
            if cond.get("guidance") is None:
                raise UserError("this FLUX model embeds the guidance scale (FLUX.1-dev style); pass a guidance "
                                "scale (the recipe's guidance_scale)")
            g = cond["guidance"].to(dtype).expand(t.shape[0]) * 1000  # (B,)
            return model.time_text_embed(t, g, pooled)  # (B, D)
        return model.time_text_embed(t, pooled)  # (B, D)

    def pre(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor] | None) -> PreOutput:
        model = self.model
        if cond is None or not isinstance(cond, Mapping):
            raise ValueError("the FLUX adapter takes its conditioning as a mapping (prompt_embeds, "
                             "pooled_prompt_embeds[, guidance]); a cached step still needs the pooled embeddings")
        full = "prompt_embeds" in cond  # a cached step's mapping holds only the cached_step inputs
        _, _, h, w = latents.shape
        tokens = model.x_embedder(pack_latents(latents))  # (B, N, 4C) -> (B, N, D)
        temb = self._temb(timestep, cond, tokens.dtype)  # (B, D)
        head_inputs = _FluxHeadInputs(temb=temb, size=(h, w))
        if not full:
            return PreOutput(hidden=tokens, head_inputs=head_inputs, block_inputs=None)
        text = model.context_embedder(cond["prompt_embeds"])  # (B, L, D_t5) -> (B, L, D)
        txt_ids = cond.get("txt_ids")
        if txt_ids is None:
            txt_ids = torch.zeros(text.shape[1], 3, device=text.device, dtype=text.dtype)  # (L, 3)
        img_ids = cond.get("img_ids")
        if img_ids is None:
            img_ids = image_ids(h // PACK, w // PACK, device=tokens.device, dtype=text.dtype)  # (N, 3)
        rotary = model.pos_embed(torch.cat([txt_ids, img_ids], dim=0))  # ids (L + N, 3) -> cos, sin
        return PreOutput(hidden=tokens, head_inputs=head_inputs, block_inputs=_FluxBlockInputs(text, rotary))

    def transformer_call(self, *args, **kwargs) -> TransformerCall:
        """FluxPipeline's call: packed (B, N, 4C) tokens, sigma timesteps, guidance scales, the two text
        tensors and the rope ids; unpacked here to (B, C, H', W') (the grid size read from ``img_ids``),
        and the velocity packed back."""
        names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
                 "guidance")
        bound = bind_call(names, args, kwargs, ignored=("joint_attention_kwargs", "controlnet_block_samples",
                                                        "controlnet_single_block_samples", "controlnet_blocks_repeat"),
                          owner=type(self.model).__name__)
        missing = [n for n in names[:-1] if bound.get(n) is None]
        if missing:
            raise UserError(f"{type(self.model).__name__}: the pipeline's call has no {missing}; the ERTACache hook "
                            "needs the text states, the pooled embedding, the timestep and the rope ids")
        img_ids, txt_ids = bound["img_ids"], bound["txt_ids"]
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # (N, 3); a batch axis is the deprecated form
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids  # (L, 3)
        h, w = int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1  # the packed token grid (h, w)
        tokens = bound["hidden_states"]  # (B, h*w, 4C)
        if tokens.shape[1] != h * w:
            raise UserError(f"{type(self.model).__name__}: {tokens.shape[1]} image tokens but img_ids describe a "
                            f"{h} x {w} grid; the hook needs FluxPipeline's packed latents and ids")
        latents = unpack_latents(tokens, h * PACK, w * PACK)  # (B, C, H', W')
        cached = {"pooled_prompt_embeds": bound["pooled_projections"]}
        if bound.get("guidance") is not None:
            cached["guidance"] = bound["guidance"]  # (B,) scales; the transformer (and pre) multiply by 1000
        cond = {"prompt_embeds": bound["encoder_hidden_states"], **cached, "txt_ids": txt_ids, "img_ids": img_ids}
        return TransformerCall(latents=latents, timestep=bound["timestep"], cond=cond, cached_cond=cached,
                               to_output=pack_latents)

    def model_forward(self, latents: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
        """FluxPipeline's call: packed tokens, sigma timesteps, both text inputs, rope ids, guidance; unpacked back."""
        b, _, h, w = latents.shape
        text = cond["prompt_embeds"]  # (B, L, D)
        img_ids = image_ids(h // PACK, w // PACK, device=latents.device, dtype=latents.dtype)  # (N, 3)
        txt_ids = torch.zeros(text.shape[1], 3, device=latents.device, dtype=latents.dtype)  # (L, 3)
        guidance = cond.get("guidance") if self.model.config.guidance_embeds else None  # (B,) scales
        out = self.model(hidden_states=pack_latents(latents), timestep=timestep, encoder_hidden_states=text,
                         pooled_projections=cond["pooled_prompt_embeds"], img_ids=img_ids, txt_ids=txt_ids,
                         guidance=guidance, return_dict=False)[0]  # (B, N, 4C)
        return unpack_latents(out, h, w)  # (B, C, H', W')

    def modulated_input(self, pre: PreOutput) -> torch.Tensor:
        """First double-stream block's AdaLN-Zero output on the image tokens: (B, N, D)."""
        if pre.block_inputs is None:
            raise ValueError("modulated_input() needs a full-step PreOutput")
        return self.model.transformer_blocks[0].norm1(pre.hidden, emb=pre.head_inputs.temb)[0]

    def blocks(self, pre: PreOutput) -> torch.Tensor:
        if pre.block_inputs is None:
            raise ValueError("blocks() needs a PreOutput made with prompt_embeds (a full step), got a cached-step one")
        bi, temb = pre.block_inputs, pre.head_inputs.temb
        hidden, text = pre.hidden, bi.text
        for block in (*self.model.transformer_blocks, *self.model.single_transformer_blocks):
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb,
                                 image_rotary_emb=bi.rotary)
        return hidden  # (B, N, D): the image tokens; the text tokens are not read after the stack

    def head(self, hidden: torch.Tensor, pre: PreOutput) -> torch.Tensor:
        model = self.model
        out = model.proj_out(model.norm_out(hidden, pre.head_inputs.temb))  # (B, N, 4C)
        return unpack_latents(out, *pre.head_inputs.size)  # (B, C, H', W')


# ---------------------------------------------------------------------------------------------- components


class FluxPromptEncoder:
    """FluxPipeline's text path: CLIP's pooled output and T5's states, as a mapping by conditioning name.

    CLIP: ``max_length`` = the tokenizer's (77), padded, ``pooler_output``. T5: padded to
    ``max_sequence_length``, ``last_hidden_state`` (FluxPipeline does not zero the padding states).
    The loader uses 512 for both ids (FluxPipeline's default and maximum; schnell is often run at
    256, which a profile made here does not match). A family with several conditioning tensors returns a
    mapping from :meth:`encode`; one with a single tensor (Wan) returns the tensor.
    """

    def __init__(self, clip_tokenizer, clip, t5_tokenizer, t5, max_sequence_length: int = 512):
        self.clip_tokenizer, self.clip = clip_tokenizer, clip
        self.t5_tokenizer, self.t5 = t5_tokenizer, t5
        self.max_sequence_length = max_sequence_length

    def to(self, device) -> "FluxPromptEncoder":
        """Move both text encoders (``load_bundle`` puts the prompt encoder on the model's device)."""
        self.clip.to(device)
        self.t5.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        ids = self.clip_tokenizer(prompts, padding="max_length", max_length=self.clip_tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = self.clip(ids.to(self.clip.device), output_hidden_states=False).pooler_output  # (B, D_clip)
        ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, return_tensors="pt").input_ids
        states = self.t5(ids.to(self.t5.device), output_hidden_states=False)[0]  # (B, L, D_t5)
        return {"prompt_embeds": states, "pooled_prompt_embeds": pooled}


class FluxLatentDecoder:
    """``AutoencoderKL`` decode with FluxPipeline's de-normalisation; an image is a one-frame video.

    The decoded output keeps the toolchain's ``frames`` name and (B, F, H, W, 3) uint8 layout
    with F = 1, so export folders, the Triton model and clients bind to one output for both kinds.
    """

    temporal_factor = 1

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.spatial_factor = 2 ** (len(cfg.block_out_channels) - 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = latents.float() / cfg.scaling_factor + (cfg.shift_factor or 0.0)  # undo the pipeline's normalisation
        image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]  # (B, 3, H, W)
        return to_uint8_frames(image.unsqueeze(2))  # (B, 3, 1, H, W) -> (B, 1, H, W, 3)


def _load_flux_text(path: Path, dtype: torch.dtype) -> FluxPromptEncoder:
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    return FluxPromptEncoder(
        CLIPTokenizer.from_pretrained(path / "tokenizer"),
        CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype).eval(),
        T5TokenizerFast.from_pretrained(path / "tokenizer_2"),
        T5EncoderModel.from_pretrained(path / "text_encoder_2", torch_dtype=dtype).eval(),
    )


FLUX_T2I = register_family(ModelFamily(
    name="flux",
    description="FLUX.1 text-to-image (CLIP + T5 text encoders, AutoencoderKL, packed 2 x 2 latents)",
    transformer_class="FluxTransformer2DModel",
    latent_kind=IMAGE,
    packing=PACK,
    conditioning=(FLUX_PROMPT, FLUX_POOLED),
    timestep_scale=1.0,  # FluxPipeline passes sigma; the transformer multiplies by 1000 inside
    sigma_schedule=SigmaSchedule(kind="dynamic", base_shift=0.5, max_shift=1.15, base_seq_len=256, max_seq_len=4096),
    guidance=EMBEDDED,
    block_stacks=("transformer_blocks", "single_transformer_blocks"),
    transformer=diffusers_loader("FluxTransformer2DModel", "transformer"),
    prompt_encoder=_load_flux_text,
    decoder=diffusers_loader("AutoencoderKL", "vae", wrap=FluxLatentDecoder),
    required_files=("transformer/config.json", "vae/config.json", "text_encoder/config.json",
                    "text_encoder_2/config.json", "tokenizer", "tokenizer_2"),
    weight_folders=("transformer", "text_encoder", "text_encoder_2", "vae"),
))
