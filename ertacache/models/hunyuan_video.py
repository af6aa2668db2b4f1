"""The HunyuanVideo text-to-video family: its adapter, its loaders and its :class:`ModelFamily` entry.

What differs from Wan (:mod:`ertacache.models.wan`) and FLUX (:mod:`ertacache.models.flux`), all of
it here as data or in the adapter:

* **Latents** are video (B, C, F', H', W') like Wan's (``AutoencoderKLHunyuanVideo``: 4x in time,
  8x in space, 16 channels); the transformer patches them (1, 2, 2) with a Conv3d.
* **Three conditioning tensors**: the Llama states ``prompt_embeds`` (B, L, 4096) and their
  ``prompt_attention_mask`` (B, L) (1 for real tokens, 0 for padding; a float graph input, since
  every engine binds float buffers the same way), which only the full step reads (the token
  refiner and the block stack); CLIP's pooled ``pooled_prompt_embeds`` (B, 768), which the
  timestep embedding reads, so a *cached* step needs it too (``ConditioningInput.cached_step``).
* **Timestep** = sigma x 1000 (HunyuanVideoPipeline passes the scheduler's timesteps as they are).
* **Sigma schedule**: the pipeline's ramp ``linspace(1, 0, T + 1)[:-1]`` with the scheduler's static
  shift (7.0 for the released model): ``SigmaSchedule(kind="ramp")``.
* **Guidance**: guidance-distilled, like FLUX.1-dev (``"embedded"``: one branch; the scale enters
  the timestep embedding as ``guidance x 1000``). The pipeline's "true CFG" with a negative
  prompt is the family's ``"cfg"`` mode, both branches batched.
* **The cached residual** is the video tokens' residual over the whole stack (20 double-stream
  then 40 single-stream blocks in HunyuanVideo); the text tokens leave the stack unused.

Image-to-video checkpoints (``image_condition_type`` set) are refused: their first-frame token
replacement changes the block signature and is not mirrored here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ertacache.errors import UserError
from ertacache.models.adapter import ModelAdapter, PreOutput, TransformerCall, bind_call, register_adapter
from ertacache.models.components import diffusers_loader, to_uint8_frames
from ertacache.models.family import EMBEDDED, VIDEO, ConditioningInput, ModelFamily, SigmaSchedule, register_family

#: the Llama states: (B, L, text_embed_dim); only the full step reads them
HUNYUAN_PROMPT = ConditioningInput("prompt_embeds", doc="(B, L, D_llama) Llama states (template cropped)")
#: which of the L text positions are real tokens: (B, L), 1.0 or 0.0; only the full step reads it
HUNYUAN_MASK = ConditioningInput("prompt_attention_mask", doc="(B, L) 1 for prompt tokens, 0 for padding")
#: CLIP's pooled text vector: (B, pooled_projection_dim); the timestep embedding reads it, cached steps too
HUNYUAN_POOLED = ConditioningInput("pooled_prompt_embeds", doc="(B, D_clip) CLIP pooled output", cached_step=True)

GUIDANCE_UNITS = 1000.0  # the pipeline passes guidance_scale x 1000 to the guidance embedder


def joint_attention_mask(text_mask: torch.Tensor, video_tokens: int) -> torch.Tensor:
    """(B, L) text mask -> (B, 1, 1, N + L) boolean key mask over the joint [video; text] sequence.

    Every video token and the first ``sum(text_mask)`` text tokens are attended to: the
    transformer counts the real tokens and masks the tail, so it assumes right padding (what
    the tokenizer's ``padding="max_length"`` gives).
    """
    b, length = text_mask.shape
    keep = video_tokens + text_mask.sum(dim=1, dtype=torch.int)  # (B,) attended positions
    index = torch.arange(video_tokens + length, device=text_mask.device).unsqueeze(0)  # (1, N + L)
    return (index < keep.unsqueeze(1)).reshape(b, 1, 1, video_tokens + length)  # (B, N + L) -> (B, 1, 1, N + L)


@dataclass
class _HunyuanHeadInputs:
    temb: torch.Tensor  # (B, D) timestep (+ guidance) + pooled-text embedding
    grid: tuple[int, int, int, int]  # (B, F', H', W') token grid after patching


@dataclass
class _HunyuanBlockInputs:
    text: torch.Tensor  # (B, L, D) refined Llama states
    mask: torch.Tensor  # (B, 1, 1, N + L) boolean key mask
    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (N, head_dim) each


@register_adapter("HunyuanVideoTransformer3DModel")
class HunyuanVideoAdapter(ModelAdapter):
    """diffusers ``HunyuanVideoTransformer3DModel`` (HunyuanVideo text-to-video).

    Mirrors ``HunyuanVideoTransformer3DModel.forward`` for text-to-video. ``cond`` is a mapping
    with ``prompt_embeds`` and ``prompt_attention_mask`` (full steps), ``pooled_prompt_embeds``
    (every step) and, for a guidance-distilled model, ``guidance`` (B,) scales (not yet x 1000).
    """

    @property
    def patch_size(self) -> tuple[int, int, int]:
        cfg = self.model.config
        return (int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size))

    def _check_t2v(self) -> None:
        kind = self.model.config.image_condition_type
        if kind is not None:
            raise UserError(f"the HunyuanVideo adapter supports text-to-video models only; this one has "
                            f"image_condition_type={kind!r} (HunyuanVideo-I2V), which it does not mirror")

    def _temb(self, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        model = self.model
        if "pooled_prompt_embeds" not in cond:
            raise ValueError("the HunyuanVideo adapter needs cond['pooled_prompt_embeds'] on every step (the "
                             "timestep embedding reads it)")
        pooled = cond["pooled_prompt_embeds"]  # (B, D_clip)
        guidance = None
        if model.config.guidance_embeds:
            if cond.get("guidance") is None:
                raise UserError("this HunyuanVideo model embeds the guidance scale; pass a guidance scale "
                                "(the recipe's guidance_scale)")
            guidance = cond["guidance"].to(pooled.dtype).expand(timestep.shape[0]) * GUIDANCE_UNITS  # (B,)
        temb, _ = model.time_text_embed(timestep, pooled, guidance)  # (B, D); no token-replace embedding (T2V)
        return temb

    def pre(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor] | None) -> PreOutput:
        model = self.model
        self._check_t2v()
        if cond is None or not isinstance(cond, Mapping):
            raise ValueError("the HunyuanVideo adapter takes its conditioning as a mapping (prompt_embeds, "
                             "prompt_attention_mask, pooled_prompt_embeds[, guidance]); a cached step still needs "
                             "the pooled embeddings")
        b, _, f, h, w = latents.shape
        p_t, p_h, p_w = self.patch_size
        grid = (b, f // p_t, h // p_h, w // p_w)
        temb = self._temb(timestep, cond)  # (B, D)
        tokens = model.x_embedder(latents)  # (B, C, F, H, W) -> (B, N, D)
        head_inputs = _HunyuanHeadInputs(temb=temb, grid=grid)
        if "prompt_embeds" not in cond:  # a cached step's mapping holds only the cached_step inputs
            return PreOutput(hidden=tokens, head_inputs=head_inputs, block_inputs=None)
        text_mask = cond.get("prompt_attention_mask")
        if text_mask is None:
            raise ValueError("the HunyuanVideo adapter needs cond['prompt_attention_mask'] with prompt_embeds")
        # The token refiner reads the timestep too: the text states are refined per step.
        text = model.context_embedder(cond["prompt_embeds"], timestep, text_mask)  # (B, L, D_llama) -> (B, L, D)
        mask = joint_attention_mask(text_mask, tokens.shape[1])  # (B, 1, 1, N + L)
        rotary = model.rope(latents)  # cos, sin: (N, head_dim)
        return PreOutput(hidden=tokens, head_inputs=head_inputs,
                         block_inputs=_HunyuanBlockInputs(text=text, mask=mask, rotary=rotary))

    def transformer_call(self, *args, **kwargs) -> TransformerCall:
        """HunyuanVideoPipeline's call: (B, C, F, H, W) latents, timesteps sigma x 1000, the Llama states and
        mask, the pooled CLIP vector, guidance x 1000 (divided back to the scale the sampler passes)."""
        names = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections",
                 "guidance")
        bound = bind_call(names, args, kwargs, ignored=("attention_kwargs",), owner=type(self.model).__name__)
        missing = [n for n in names[:-1] if bound.get(n) is None]
        if missing:
            raise UserError(f"{type(self.model).__name__}: the pipeline's call has no {missing}; the ERTACache hook "
                            "needs the latents, the timestep, the text states, their mask and the pooled embedding")
        cached = {"pooled_prompt_embeds": bound["pooled_projections"]}
        if bound.get("guidance") is not None:
            cached["guidance"] = bound["guidance"] / GUIDANCE_UNITS  # (B,) scales
        cond = {"prompt_embeds": bound["encoder_hidden_states"],
                "prompt_attention_mask": bound["encoder_attention_mask"], **cached}
        return TransformerCall(latents=bound["hidden_states"], timestep=bound["timestep"], cond=cond,
                               cached_cond=cached, to_output=lambda v: v)

    def model_forward(self, latents: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
        """HunyuanVideoPipeline's call: the latents, scaled timesteps, text states, mask, pooled vector, guidance x 1000."""
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = cond["guidance"].to(latents.dtype).expand(latents.shape[0]) * GUIDANCE_UNITS  # (B,)
        return self.model(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond["prompt_embeds"],
                          encoder_attention_mask=cond["prompt_attention_mask"],
                          pooled_projections=cond["pooled_prompt_embeds"], guidance=guidance, return_dict=False)[0]

    def modulated_input(self, pre: PreOutput) -> torch.Tensor:
        """First double-stream block's AdaLN-Zero output on the video tokens: (B, N, D)."""
        if pre.block_inputs is None:
            raise ValueError("modulated_input() needs a full-step PreOutput")
        return self.model.transformer_blocks[0].norm1(pre.hidden, emb=pre.head_inputs.temb)[0]

    def blocks(self, pre: PreOutput) -> torch.Tensor:
        if pre.block_inputs is None:
            raise ValueError("blocks() needs a PreOutput made with prompt_embeds (a full step), got a cached-step one")
        bi, temb = pre.block_inputs, pre.head_inputs.temb
        _, _, h, w = pre.head_inputs.grid
        hidden, text = pre.hidden, bi.text
        # Positional, as the forward calls them: (video, text, temb, mask, rope, token_replace_emb, first-frame tokens).
        for block in (*self.model.transformer_blocks, *self.model.single_transformer_blocks):
            hidden, text = block(hidden, text, temb, bi.mask, bi.rotary, None, h * w)
        return hidden  # (B, N, D): the video tokens; the text tokens are not read after the stack

    def head(self, hidden: torch.Tensor, pre: PreOutput) -> torch.Tensor:
        model = self.model
        b, f, h, w = pre.head_inputs.grid
        p_t, p_h, p_w = self.patch_size
        out = model.proj_out(model.norm_out(hidden, pre.head_inputs.temb))  # (B, N, pt*ph*pw*C)
        out = out.reshape(b, f, h, w, -1, p_t, p_h, p_w)  # (B, F', H', W', C, pt, ph, pw): channels before the patch
        out = out.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, F', pt, H', ph, W', pw)
        return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, F, H, W)


# ---------------------------------------------------------------------------------------------- components


def default_prompt_template() -> dict:
    """HunyuanVideoPipeline's own prompt template and crop (read from the installed diffusers, not restated)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return dict(DEFAULT_PROMPT_TEMPLATE)


class HunyuanPromptEncoder:
    """HunyuanVideoPipeline's text path, as a mapping by conditioning name.

    Llama: the prompt is put in the pipeline's chat template, tokenized to ``max_sequence_length``
    + ``crop_start`` tokens (padded), the states of the layer ``skip_layers`` below the last are
    taken, and the template's first ``crop_start`` positions are cropped from the states and the
    mask. CLIP: padded to 77 tokens, ``pooler_output``. The mask is returned as floats (1/0).
    """

    def __init__(self, llama_tokenizer, llama, clip_tokenizer, clip, template: dict | None = None,
                 max_sequence_length: int = 256, skip_layers: int = 2):
        self.llama_tokenizer, self.llama = llama_tokenizer, llama
        self.clip_tokenizer, self.clip = clip_tokenizer, clip
        self.template = template or default_prompt_template()
        if "crop_start" not in self.template:
            raise ValueError("the prompt template needs its crop_start (tokens of template before the prompt)")
        self.max_sequence_length = max_sequence_length
        self.skip_layers = skip_layers

    def to(self, device) -> "HunyuanPromptEncoder":
        """Move both text encoders (``load_bundle`` puts the prompt encoder on the model's device)."""
        self.llama.to(device)
        self.clip.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        crop = int(self.template["crop_start"])
        texts = [self.template["template"].format(p) for p in prompts]
        tokens = self.llama_tokenizer(texts, max_length=self.max_sequence_length + crop, padding="max_length",
                                      truncation=True, return_attention_mask=True, return_tensors="pt")
        device = self.llama.device
        mask = tokens.attention_mask.to(device)  # (B, crop + L)
        states = self.llama(input_ids=tokens.input_ids.to(device), attention_mask=mask,
                            output_hidden_states=True).hidden_states[-(self.skip_layers + 1)]  # (B, crop + L, D)
        empty = [i for i, n in enumerate(mask[:, crop:].sum(dim=1).tolist()) if n == 0]
        if empty:  # the token refiner averages over the real tokens: none would give a NaN video
            raise UserError(f"the prompt template's crop_start {crop} leaves no token of prompt {empty[0]} "
                            f"({prompts[empty[0]]!r}): the tokenizer does not match the template (the released "
                            "Llama tokenizer puts exactly crop_start tokens before the prompt)")
        ids = self.clip_tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
        pooled = self.clip(ids.to(self.clip.device), output_hidden_states=False).pooler_output  # (B, D_clip)
        return {"prompt_embeds": states[:, crop:], "prompt_attention_mask": mask[:, crop:].to(states.dtype),
                "pooled_prompt_embeds": pooled}


class HunyuanLatentDecoder:
    """``AutoencoderKLHunyuanVideo`` decode with the pipeline's de-normalisation (latents / scaling_factor)."""

    def __init__(self, vae):
        self.vae = vae
        self.latent_channels = int(vae.config.latent_channels)
        self.spatial_factor = int(vae.spatial_compression_ratio)
        self.temporal_factor = int(vae.temporal_compression_ratio)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() / self.vae.config.scaling_factor
        video = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]  # (B, 3, F, H, W)
        return to_uint8_frames(video)


def _load_hunyuan_text(path: Path, dtype: torch.dtype) -> HunyuanPromptEncoder:
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, LlamaModel

    return HunyuanPromptEncoder(
        AutoTokenizer.from_pretrained(path / "tokenizer"),
        LlamaModel.from_pretrained(path / "text_encoder", torch_dtype=dtype).eval(),
        CLIPTokenizer.from_pretrained(path / "tokenizer_2"),
        CLIPTextModel.from_pretrained(path / "text_encoder_2", torch_dtype=dtype).eval(),
    )


def _text_to_video(config) -> bool:
    """HunyuanVideo text-to-video; HunyuanVideo-I2V (``image_condition_type`` set) is another kind of model."""
    return getattr(config, "image_condition_type", None) is None


HUNYUAN_T2V = register_family(ModelFamily(
    name="hunyuanvideo",
    description="HunyuanVideo text-to-video (Llama + CLIP text encoders, AutoencoderKLHunyuanVideo, guidance-distilled)",
    transformer_class="HunyuanVideoTransformer3DModel",
    latent_kind=VIDEO,
    conditioning=(HUNYUAN_PROMPT, HUNYUAN_MASK, HUNYUAN_POOLED),
    timestep_scale=1000.0,  # the pipeline passes the scheduler's timesteps (sigma x 1000) as they are
    sigma_schedule=SigmaSchedule(kind="ramp"),  # linspace(1, 0, T + 1)[:-1], statically shifted (7.0)
    guidance=EMBEDDED,
    block_stacks=("transformer_blocks", "single_transformer_blocks"),
    transformer=diffusers_loader("HunyuanVideoTransformer3DModel", "transformer"),
    prompt_encoder=_load_hunyuan_text,
    decoder=diffusers_loader("AutoencoderKLHunyuanVideo", "vae", wrap=HunyuanLatentDecoder),
    required_files=("transformer/config.json", "vae/config.json", "text_encoder/config.json",
                    "text_encoder_2/config.json", "tokenizer", "tokenizer_2"),
    weight_folders=("transformer", "text_encoder", "text_encoder_2", "vae"),
    claims=_text_to_video,
))
