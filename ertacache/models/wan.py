"""The Wan2.1 families (text-to-video, image-to-video): the adapter, the loaders and the :class:`ModelFamily` entries.

Everything the package knows about diffusers' ``WanTransformer3DModel`` that is
not the forward split lives here as data (:data:`WAN_T2V`): video latents
(B, C, F', H', W') with the channel axis at 1, one ``text_embeds`` tensor,
timestep = sigma x 1000, the scheduler's static shift, classifier-free
guidance with both branches batched, the export-time rope rewrite, UMT5 and
``AutoencoderKLWan``. The testbed (:mod:`ertacache.testbed.family`) is a
variant of it: the same transformer class with other components.

Image-to-video (:data:`WAN_I2V`, ``wan-i2v``) is the same class with an image embedder
(``image_dim`` set): the family takes three inputs, ``text_embeds``, the CLIP image states
``image_embeds`` and the condition latents ``image_latents`` (the first frame's VAE latents and
the frame mask, concatenated to the noisy latents on channels before the patch embedding, so a
cached step reads them too). The two families tell their models apart by ``image_dim``
(``ModelFamily.claims``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ertacache.errors import UserError
from ertacache.models.adapter import ModelAdapter, PreOutput, TransformerCall, bind_call, register_adapter
from ertacache.models.components import PromptEncoder, UMT5PromptEncoder, WanLatentDecoder, diffusers_loader
from ertacache.models.family import (CFG, ROWS_PER_SAMPLE, VIDEO, ConditioningInput, ModelFamily, SigmaSchedule,
                                     register_family)


@dataclass
class _WanHeadInputs:
    temb: torch.Tensor  # (B, D) timestep embedding; (B, N, D) with per-token timesteps (Wan2.2 TI2V)
    grid: tuple[int, int, int, int]  # (B, F', H', W') token grid after patching


@dataclass
class _WanBlockInputs:
    text: torch.Tensor  # (B, L, D) projected text tokens
    timestep_proj: torch.Tensor  # (B, 6, D) per-block shift/scale/gate; (B, N, 6, D) per token
    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (1, N, 1, head_dim) each


def _per_row(value: torch.Tensor, rows: int) -> torch.Tensor:
    """A per-sample input (B, ...) for ``rows`` = nb*B latent rows (cond rows, then uncond rows): repeated nb times."""
    if rows % value.shape[0]:
        raise ValueError(f"{value.shape[0]} per-sample rows cannot serve {rows} latent rows: give one image row per "
                         "sample (the CFG branches share it), or select the rows of each chosen sample")
    return value.repeat(rows // value.shape[0], *([1] * (value.ndim - 1)))  # (B, ...) -> (nb*B, ...)


@register_adapter("WanTransformer3DModel")
class WanAdapter(ModelAdapter):
    """diffusers ``WanTransformer3DModel`` (Wan2.1 T2V 1.3B/14B and I2V 14B, Wan2.2 TI2V-5B, the testbeds).

    Mirrors ``WanTransformer3DModel.forward`` for text-to-video and, for a model with an image
    embedder (``image_dim`` set, Wan2.1 I2V), image-to-video: then ``text`` is a mapping with
    ``text_embeds``, ``image_embeds`` (B, 257, 1280) and ``image_latents`` (B, 4 + C, F', H', W'),
    the last two one row per sample (repeated here for the CFG branches). The condition embedder is
    called piece by piece so that a cached step can compute the timestep embedding without
    projecting the text.

    The timestep is one per sample (B,), or one per token (B, N) as WanPipeline passes it with
    ``expand_timesteps`` (Wan2.2 TI2V-5B): then the embedding, every block's modulation and the
    head's shift/scale are per token, as in the model's forward.
    """

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.model.config.patch_size)

    @property
    def in_channels(self) -> int:
        """Channels C of the latents being denoised: the output's (I2V's input adds the condition channels)."""
        cfg = self.model.config
        return int(cfg.out_channels or cfg.in_channels)

    @property
    def image_to_video(self) -> bool:
        """Whether the model is conditioned on an image: CLIP image states (Wan2.1 I2V) or condition latents
        concatenated on channels (both Wan2.1 I2V and Wan2.2 I2V-A14B, which has no image embedder)."""
        return self.takes_image_embeds or self.takes_image_latents

    @property
    def takes_image_embeds(self) -> bool:
        """An image embedder for CLIP states (``image_dim`` set): Wan2.1 I2V."""
        return _has_image_embedder(self.model.config)

    @property
    def takes_image_latents(self) -> bool:
        """Condition latents concatenated on channels before the patch embedding (input channels > output's)."""
        return _has_condition_channels(self.model.config)

    def _inputs(self, text):
        """(text states or None, image states or None, condition latents or None) from one tensor or a mapping."""
        if isinstance(text, Mapping):
            return text.get("text_embeds"), text.get("image_embeds"), text.get("image_latents")
        return text, None, None

    def _time_embedding(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ce = self.model.condition_embedder
        t_freq = ce.timesteps_proj(timestep.flatten())  # (B, freq_dim), or (B*N, freq_dim) per token
        if timestep.ndim == 2:
            t_freq = t_freq.unflatten(0, timestep.shape)  # (B*N, freq_dim) -> (B, N, freq_dim)
        time_dtype = next(iter(ce.time_embedder.parameters())).dtype
        return ce.time_embedder(t_freq.to(time_dtype)).to(dtype)  # (B, D) or (B, N, D)

    def pre(self, latents: torch.Tensor, timestep: torch.Tensor, text) -> PreOutput:
        model = self.model
        text, image_embeds, image_latents = self._inputs(text)
        if self.takes_image_latents and image_latents is None:
            raise UserError("this Wan model is image-to-video: it needs image_latents on every step (and, with an "
                            "image embedder, image_embeds on full steps): the wan-i2v families' inputs; give --image")
        if not self.image_to_video and (image_latents is not None or image_embeds is not None):
            raise UserError("this Wan model is text-to-video (no image embedder): it takes no image conditioning")
        b, _, f, h, w = latents.shape
        p_t, p_h, p_w = self.patch_size
        grid = (b, f // p_t, h // p_h, w // p_w)

        x = latents
        if image_latents is not None:  # one row per sample: repeated for the CFG branches
            x = torch.cat([latents, _per_row(image_latents.to(latents.dtype), b)], dim=1)  # (B, C, F, H, W) + (B, 4 + C, F, H, W) -> (B, 2C + 4, F, H, W)
        tokens = model.patch_embedding(x)  # (B, D, F', H', W')
        tokens = tokens.flatten(2).transpose(1, 2).contiguous()  # (B, N, D), N = F'*H'*W'
        dtype = text.dtype if text is not None else tokens.dtype
        temb = self._time_embedding(timestep, dtype)  # (B, D)
        head_inputs = _WanHeadInputs(temb=temb, grid=grid)
        if text is None:
            return PreOutput(hidden=tokens, head_inputs=head_inputs, block_inputs=None)

        ce = model.condition_embedder
        # (B, 6*D) -> (B, 6, D); per token (B, N, 6*D) -> (B, N, 6, D)
        timestep_proj = ce.time_proj(ce.act_fn(temb)).unflatten(temb.ndim - 1, (6, -1))
        context = ce.text_embedder(text)  # (B, L, text_dim) -> (B, L, D)
        if self.takes_image_embeds:
            if image_embeds is None:
                raise UserError("this Wan model is image-to-video: a full step needs image_embeds (the CLIP image states)")
            image = ce.image_embedder(_per_row(image_embeds, b))  # (B, 257, D)
            context = torch.cat([image, context], dim=1)  # (B, 257 + L, D): image tokens first, as the model does
        block_inputs = _WanBlockInputs(
            text=context,
            timestep_proj=timestep_proj,
            rotary=model.rope(latents),
        )
        return PreOutput(hidden=tokens, head_inputs=head_inputs, block_inputs=block_inputs)

    def transformer_call(self, *args, **kwargs) -> TransformerCall:
        """WanPipeline's call: (B, C, F, H, W) latents, (B,) timesteps sigma x 1000, the text states; as is.

        WanImageToVideoPipeline's: the latents with the condition concatenated on channels, split back
        here into the latents and ``image_latents``, and the CLIP states ``encoder_hidden_states_image``.
        """
        owner = type(self.model).__name__
        if not self.image_to_video:
            bound = bind_call(("hidden_states", "timestep", "encoder_hidden_states"), args, kwargs,
                              ignored=("encoder_hidden_states_image", "attention_kwargs"), owner=owner)
            t = bound["timestep"]
            if t.ndim == 2 and not torch.equal(t, t[:, :1].expand_as(t)):  # one host read: the hook runs eagerly
                raise UserError(f"{owner}: the pipeline passes per-token timesteps that differ (Wan2.2 TI2V's "
                                "image-to-video mode keeps the first frame clean); the ERTACache hook supports "
                                "its text-to-video mode only (WanPipeline)")
            return TransformerCall(latents=bound["hidden_states"], timestep=bound["timestep"],
                                   cond=bound["encoder_hidden_states"], cached_cond=None, to_output=lambda v: v)
        bound = bind_call(("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image"),
                          args, kwargs, ignored=("attention_kwargs",), owner=owner)
        if self.takes_image_embeds and bound.get("encoder_hidden_states_image") is None:
            raise UserError(f"{owner} is image-to-video: the pipeline's call has no encoder_hidden_states_image")
        c = self.in_channels
        joint = bound["hidden_states"]  # (B, C + 4 + C, F, H, W): latents, then the condition
        cached = {"image_latents": joint[:, c:]}
        cond = {"text_embeds": bound["encoder_hidden_states"], **cached}
        if self.takes_image_embeds:
            cond["image_embeds"] = bound["encoder_hidden_states_image"]
        return TransformerCall(latents=joint[:, :c], timestep=bound["timestep"], cond=cond, cached_cond=cached,
                               to_output=lambda v: v)

    def model_forward(self, latents: torch.Tensor, timestep: torch.Tensor, text) -> torch.Tensor:
        """WanPipeline's call: the latents, the scaled timesteps and the text states as they are (I2V: the
        condition concatenated on channels and the image states, as WanImageToVideoPipeline passes them)."""
        text, image_embeds, image_latents = self._inputs(text)
        if image_latents is not None:
            rows = latents.shape[0]
            latents = torch.cat([latents, _per_row(image_latents, rows)], dim=1)
            image_embeds = None if image_embeds is None else _per_row(image_embeds, rows)
        return self.model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                          encoder_hidden_states_image=image_embeds, return_dict=False)[0]

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



def _load_umt5(path: Path, dtype: torch.dtype) -> PromptEncoder:
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(path / "text_encoder", torch_dtype=dtype).eval()
    return UMT5PromptEncoder(tokenizer, encoder)


_load_wan_transformer = diffusers_loader("WanTransformer3DModel", "transformer")
#: Wan2.2 A14B's low-noise expert: the same class and shape in transformer_2/
_load_wan_expert = diffusers_loader("WanTransformer3DModel", "transformer_2")
# WanPipeline keeps the VAE in float32: its decode is sensitive to reduced precision.
_load_wan_vae = diffusers_loader("AutoencoderKLWan", "vae", wrap=WanLatentDecoder, float32=True)


class WanImageConditioner:
    """WanImageToVideoPipeline's image path: the CLIP image states and the condition latents of one image per sample.

    ``image_embeds``: the image through CLIP's processor and vision tower, the states of the layer
    before the last (B, 257, 1280 for ViT-H/14). ``image_latents``: the image resized to the video
    (diffusers' ``VideoProcessor``, [-1, 1]), followed by ``frames - 1`` black frames, through the
    VAE encoder (the distribution's mode), normalised by the VAE's per-channel mean and std, after a
    4-channel frame mask that is 1 on the first latent frame (the given frame) and 0 after it.
    """

    def __init__(self, processor, clip_vision, vae):
        from diffusers.video_processor import VideoProcessor

        self.processor, self.clip, self.vae = processor, clip_vision, vae
        self.video_processor = VideoProcessor(vae_scale_factor=int(getattr(vae.config, "scale_factor_spatial", 8)))

    def to(self, device) -> "WanImageConditioner":
        if self.clip is not None:
            self.clip.to(device)
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, images, height: int, width: int, frames: int) -> dict[str, torch.Tensor]:
        """images: one (H, W, 3) uint8 array per sample -> ``image_embeds`` and ``image_latents`` (B rows each).

        One image at a time through CLIP and the VAE: a video's worth of VAE activations per image
        (GBs at 480p) must not be multiplied by the number of calibration prompts.
        """
        embeds, latents = zip(*(self._encode_one(im, height, width, frames) for im in images))
        if self.clip is None:  # Wan2.2 I2V-A14B: the condition latents alone
            return {"image_latents": torch.cat(latents)}
        return {"image_embeds": torch.cat(embeds), "image_latents": torch.cat(latents)}

    def _encode_one(self, image, height: int, width: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        pil = Image.fromarray(image)
        states = None
        if self.clip is not None:
            pixels = self.processor(images=pil, return_tensors="pt").pixel_values.to(self.clip.device, self.clip.dtype)
            states = self.clip(pixels, output_hidden_states=True).hidden_states[-2]  # (1, T, D_clip)
        first = self.video_processor.preprocess(pil, height=height, width=width)  # (1, 3, H, W) in [-1, 1]
        device, dtype = self.vae.device, self.vae.dtype
        video = torch.cat([first.unsqueeze(2), first.new_zeros(1, 3, frames - 1, height, width)], dim=2)
        z = self.vae.encode(video.to(device, dtype)).latent_dist.mode()  # (1, C, F', H', W')
        cfg, c = self.vae.config, int(self.vae.config.z_dim)
        mean = torch.tensor(cfg.latents_mean, device=device, dtype=z.dtype).view(1, c, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=device, dtype=z.dtype).view(1, c, 1, 1, 1)
        z = (z - mean) / std
        mask = torch.zeros(1, 4, *z.shape[2:], device=device, dtype=z.dtype)  # (1, 4, F', H', W')
        mask[:, :, 0] = 1.0  # the first latent frame (the given image's temporal_factor frames) is known
        return states, torch.cat([mask, z], dim=1)  # (1, T, D_clip), (1, 4 + C, F', H', W')


def _load_wan_image_conditioner(path: Path, dtype: torch.dtype, decoder: WanLatentDecoder | None = None
                                ) -> WanImageConditioner:
    """The image path; it encodes with the decoder's float32 VAE when given one (a model bundle), else loads it
    (the runtime and the Triton model, which decode with an exported graph)."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    return WanImageConditioner(
        CLIPImageProcessor.from_pretrained(path / "image_processor"),
        # float32 whatever the transformer's dtype, as the pipeline's documented set-up loads it (0.6B parameters)
        CLIPVisionModel.from_pretrained(path / "image_encoder", torch_dtype=torch.float32).eval(),
        decoder.vae if decoder is not None else _load_wan_vae(path, dtype).vae,
    )


#: the text-embedding input of every Wan step graph
WAN_TEXT = ConditioningInput("text_embeds", doc="(nb*B, L, D_text) text-encoder states: cond rows, then uncond rows")

def _has_image_embedder(config) -> bool:
    """The config has an image embedder for CLIP image states (``image_dim``): Wan2.1 I2V."""
    return getattr(config, "image_dim", None) is not None


def _has_condition_channels(config) -> bool:
    """The config's input adds condition channels to the latents it outputs (I2V: mask + image latents)."""
    out = getattr(config, "out_channels", None)
    return out is not None and out != getattr(config, "in_channels", None)


def _text_to_video(config) -> bool:
    """A Wan checkpoint without an image embedder whose input is its output's latents alone (Wan2.1 T2V, Wan2.2
    TI2V-5B, the testbeds); not Wan2.2 I2V-A14B, which concatenates a condition on channels without CLIP."""
    return not _has_image_embedder(config) and not _has_condition_channels(config)


def _image_to_video(config) -> bool:
    """A Wan checkpoint with an image embedder for CLIP image states (Wan2.1 I2V 480P/720P)."""
    return _has_image_embedder(config)


def _latent_image_to_video(config) -> bool:
    """A Wan checkpoint conditioned on an image by latents concatenated on channels alone, no image embedder
    (Wan2.2 I2V-A14B: 36 input channels, 16 out)."""
    return not _has_image_embedder(config) and _has_condition_channels(config)


def _load_wan_latent_conditioner(path: Path, dtype: torch.dtype, decoder: WanLatentDecoder | None = None
                                 ) -> WanImageConditioner:
    """Wan2.2 I2V-A14B's image path: the VAE alone (no CLIP in the checkpoint)."""
    return WanImageConditioner(None, None, decoder.vae if decoder is not None else _load_wan_vae(path, dtype).vae)


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
    expert_transformer=_load_wan_expert,
    prompt_encoder=_load_umt5,
    decoder=_load_wan_vae,
    required_files=("transformer/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer"),
    claims=_text_to_video,
))

#: CLIP's image states for Wan2.1 I2V: (B, 257, 1280), the penultimate layer; one row per sample (both CFG
#: branches see the same image); only the full step reads them (the image embedder feeds the blocks)
WAN_IMAGE = ConditioningInput("image_embeds", rows=ROWS_PER_SAMPLE,
                              doc="(B, 257, D_clip) CLIP vision states of the conditioning image (penultimate layer)")
#: the condition concatenated to the noisy latents on channels: (B, 4 + C, F', H', W'), the frame mask (1 on the
#: given first frame) then the VAE latents of [image, zeros...]; the patch embedding reads it, so cached steps too
WAN_IMAGE_LATENTS = ConditioningInput("image_latents", rows=ROWS_PER_SAMPLE, cached_step=True,
                                      doc="(B, 4 + C, F', H', W') frame mask + normalised VAE latents of the image")

WAN_I2V = register_family(ModelFamily(
    name="wan-i2v",
    description="Wan2.1 image-to-video (UMT5 text encoder, CLIP image encoder, AutoencoderKLWan)",
    transformer_class="WanTransformer3DModel",
    latent_kind=VIDEO,
    conditioning=(WAN_TEXT, WAN_IMAGE, WAN_IMAGE_LATENTS),
    timestep_scale=1000.0,
    sigma_schedule=SigmaSchedule(kind="static"),
    guidance=CFG,
    export_rewrites=("wan_stack_rope",),  # the rewrite's processor covers the image cross-attention too
    transformer=_load_wan_transformer,
    prompt_encoder=_load_umt5,
    decoder=_load_wan_vae,
    image_encoder=_load_wan_image_conditioner,
    required_files=("transformer/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
                    "image_encoder/config.json", "image_processor"),
    weight_folders=("transformer", "text_encoder", "image_encoder", "vae"),
    claims=_image_to_video,
))

#: Wan2.2 I2V-A14B: the text-to-video entry plus the condition latents and their VAE-only image path
WAN_I2V_LATENT = register_family(replace(
    WAN_T2V,
    name="wan-i2v-a14b",
    description="Wan2.2 I2V-A14B: image-to-video by condition latents alone (no CLIP), two experts",
    conditioning=(WAN_TEXT, WAN_IMAGE_LATENTS),
    image_encoder=_load_wan_latent_conditioner,
    claims=_latent_image_to_video,
))
