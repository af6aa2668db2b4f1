"""The CogVideoX text-to-video family (CogVideoX 1.0: 2B and 5B): adapter, noise schedule, loaders, family entry.

diffusers' ``CogVideoXTransformer3DModel`` differs from the flow-matching families in three ways:

* **the text is in the sequence**: ``patch_embed(text, video)`` returns the projected text tokens
  followed by the video tokens (with 2B's sincos positional table added over both, zero on the
  text part), and every block takes and returns both streams. The head reads the video tokens
  only (``norm_final``, ``norm_out(., temb)``, ``proj_out``), so the block-stack residual a cached
  step needs is the video stream's; the text stream after the last block is never read.
* **the latents are (B, F, C, H, W)**: the adapter transposes at its boundary, so the sampler, the
  per-channel correction tables (channel axis 1) and the graphs keep the project's (B, C, F, H, W).
* **it is a v-prediction DDPM model sampled with DDIM** (``CogVideoXDDIMScheduler``), not a
  flow-matching velocity under Euler.

The third point is absorbed here, so that no stage changes: deterministic DDIM *is* flow-matching
Euler after a change of variables. With ``a_t = sqrt(alphas_cumprod[t])`` and ``b_t = sqrt(1 - a_t^2)``,
the flow-matching time and state of a DDPM latent ``z`` are

    s = b / (a + b),    x = z / (a + b)        (so x = (1 - s) x0 + s eps, a straight line in s)

and one DDIM step from t to t' (x0 and eps predicted at t, held fixed) lands exactly on
``x' = x + (s' - s) (eps - x0)``: an Euler step in s with the velocity ``u = eps - x0``. For a
v-prediction model, ``x0 = a z - b v`` and ``eps = b z + a v``, so with ``c = a + b = 1 / sqrt((1 - s)^2 + s^2)``

    z = c x,    u = c^2 (2 s - 1) x + c v.

So the family's "sigma" is s (the sigma table is the DDIM timesteps' s, ending at 0 where
``final_alpha_cumprod`` is 1), its timestep scale is 1 (the adapter receives s), and the adapter maps
in and out: ``pre`` scales the state to the model's z and turns s back into the model's timestep t
(interpolated in the checkpoint's table of s(t), exact at the integer timesteps DDIM visits), and
``head`` returns u. The sampler, the profile (reuse mask, predictor, rectification, time adjustment),
the step graphs, the runtime and Triton see a flow-matching model. The time adjustment is meaningful in
s; a time-adjusted step feeds the model a fractional timestep (the sinusoidal embedding takes any real t).
The all-full sampler equals ``CogVideoXPipeline`` with its DDIM scheduler (tests/models/test_cogvideox_family.py).

Supported scheduler configs (read from the checkpoint's ``scheduler/scheduler_config.json``;
:class:`VPNoiseSchedule`): v-prediction, ``scaled_linear`` betas, the SNR shift and
zero-terminal-SNR rescale CogVideoX uses, ``set_alpha_to_one``, ``trailing`` spacing and a step count
that divides the training steps (DDIM steps to ``t - 1000 // T``, which is the next timestep only
then). ``CogVideoXDPMScheduler`` (5B's default) is a second-order multistep solver over the same
alphas; this family samples with DDIM, as ``CogVideoXPipeline`` does with ``CogVideoXDDIMScheduler``.

5B's rotary embeddings are made by ``CogVideoXPipeline._prepare_rotary_positional_embeddings`` and
passed to the forward; :meth:`CogVideoXAdapter.rotary` builds them the same way from the latent grid
with diffusers' own ``get_3d_rotary_pos_embed`` (CogVideoX 1.0 layout; 1.5's temporal patch and its
``ofs`` embedding are refused).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ertacache.errors import UserError
from ertacache.models.adapter import ModelAdapter, PreOutput, TransformerCall, bind_call, register_adapter
from ertacache.models.components import diffusers_loader, to_uint8_frames
from ertacache.models.family import CFG, VIDEO, ConditioningInput, ModelFamily, SigmaSchedule, VP, register_family

#: where a loaded (or pipeline-bound) transformer keeps its checkpoint's noise schedule
NOISE_ATTR = "_ertacache_noise_schedule"
#: under enable_ertacache the pipeline's timesteps are the flow-matching scheduler's: s x 1000
PIPELINE_TIMESTEP_UNITS = 1000.0


@dataclass(frozen=True)
class VPNoiseSchedule:
    """A CogVideoX DDIM scheduler's noise schedule, as data (numpy, float64), and its flow-matching view.

    The fields are the ``CogVideoXDDIMScheduler`` config entries that decide ``alphas_cumprod`` and the
    timesteps; :meth:`from_config` refuses configs this family does not sample exactly.
    """

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    snr_shift_scale: float = 3.0
    rescale_betas_zero_snr: bool = True

    def __post_init__(self):
        if self.beta_schedule != "scaled_linear":
            raise UserError(f"CogVideoX scheduler: beta_schedule {self.beta_schedule!r} is not supported "
                            "(CogVideoX's scaled_linear only)")
        if not (0 < self.beta_start < self.beta_end < 1) or self.num_train_timesteps < 2 or self.snr_shift_scale <= 0:
            raise UserError(f"CogVideoX scheduler: implausible config {self}")

    @classmethod
    def from_config(cls, config: dict, where: str = "the scheduler config") -> "VPNoiseSchedule":
        """From a ``scheduler_config.json`` mapping; a :class:`UserError` names any entry sampled differently."""
        want = {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "set_alpha_to_one": True,
                "steps_offset": 0, "trained_betas": None}
        bad = {k: config.get(k) for k, v in want.items() if k in config and config.get(k) != v}
        if bad:
            raise UserError(f"{where}: {bad} is not supported; the cogvideox family samples CogVideoX's DDIM with "
                            f"{want}")
        names = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "snr_shift_scale",
                 "rescale_betas_zero_snr")
        return cls(**{k: config[k] for k in names if k in config})

    @classmethod
    def from_folder(cls, folder: Path) -> "VPNoiseSchedule":
        path = Path(folder) / "scheduler" / "scheduler_config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot read the CogVideoX scheduler config ({e}); the model folder needs "
                            "scheduler/scheduler_config.json as the hub checkpoint has it") from None
        return cls.from_config(config, str(path))

    def alphas_cumprod(self) -> np.ndarray:
        """(N,) float64, as ``CogVideoXDDIMScheduler.__init__`` makes it: betas, cumprod, SNR shift, zero-SNR rescale."""
        n = self.num_train_timesteps
        betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float64) ** 2
        ab = np.cumprod(1.0 - betas)
        ab = ab / (self.snr_shift_scale + (1.0 - self.snr_shift_scale) * ab)  # SNR / shift (SD3-style)
        if self.rescale_betas_zero_snr:  # Lin et al. 2023, Algorithm 1, on sqrt(alphas_cumprod)
            root = np.sqrt(ab)
            first, last = root[0], root[-1]
            root = (root - last) * (first / (first - last))
            ab = root ** 2
        return ab

    def timestep_sigmas(self) -> np.ndarray:
        """(N,) the flow-matching time s(t) = b / (a + b) of every training timestep t, increasing in t.

        Computed once per schedule (read-only): the adapter reads it on every step for the timestep map.
        """
        return self._timestep_sigmas

    @functools.cached_property
    def _timestep_sigmas(self) -> np.ndarray:
        ab = self.alphas_cumprod()
        a, b = np.sqrt(ab), np.sqrt(1.0 - ab)
        table = b / (a + b)
        table.setflags(write=False)
        return table

    def timesteps(self, steps: int) -> np.ndarray:
        """The DDIM timesteps (T,) of ``trailing`` spacing; refuses a T whose DDIM step would skip them."""
        n = self.num_train_timesteps
        SigmaSchedule(kind=VP, num_train_timesteps=n).check_steps(steps)
        return np.arange(n, 0, -n // steps, dtype=np.int64) - 1

    def sigmas(self, steps: int) -> np.ndarray:
        """The flow-matching sigma table (T+1,) float64: s at each DDIM timestep, then 0 (final alpha 1)."""
        return np.append(self.timestep_sigmas()[self.timesteps(steps)], 0.0)

    def check_shift(self, shift: float) -> None:
        """A request's ``shift`` is this schedule's ``snr_shift_scale``: the checkpoint fixes it."""
        if abs(float(shift) - self.snr_shift_scale) > 1e-9:
            raise UserError(f"CogVideoX's shift is its scheduler's snr_shift_scale ({self.snr_shift_scale:g} in this "
                            f"checkpoint), which the model was trained with; got shift {shift:g}: drop --shift")


def attach_noise_schedule(transformer, schedule) -> None:
    """Give ``transformer`` its checkpoint's noise schedule (a :class:`VPNoiseSchedule`, a scheduler or its config).

    The family's loader does it from the folder's ``scheduler/``; ``enable_ertacache`` from the pipeline's
    scheduler; a model built in memory (tests) calls it by hand.
    """
    if not isinstance(schedule, VPNoiseSchedule):
        config = getattr(schedule, "config", schedule)
        schedule = VPNoiseSchedule.from_config(dict(config), f"{type(schedule).__name__}")
    setattr(transformer, NOISE_ATTR, schedule)  # a plain attribute: not a parameter or buffer, so not fingerprinted


@dataclass
class _CogHeadInputs:
    temb: torch.Tensor  # (B, D) timestep embedding
    grid: tuple[int, int, int, int]  # (B, F, H', W'): latent frames (not patched in time) and the patch grid
    state: torch.Tensor  # (B, C, F, H, W) the flow-matching state x the step was given (float32)
    sigma: torch.Tensor  # (B, 1, 1, 1, 1) its flow-matching time s (float32)


@dataclass
class _CogBlockInputs:
    text: torch.Tensor  # (B, L, D) projected text tokens (the first L tokens of the patch embedding)
    rotary: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin: (F * H' * W', head_dim) each; None for 2B


def fm_scale(sigma: torch.Tensor) -> torch.Tensor:
    """c = a + b = 1 / sqrt((1 - s)^2 + s^2): the DDPM latent is c times the flow-matching state (c = 1 at s = 0, 1)."""
    return torch.rsqrt((1.0 - sigma) ** 2 + sigma ** 2)


def model_timestep_of(sigma: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """The model's timestep t for flow-matching times ``sigma`` (rows,), by linear interpolation in ``knots``.

    knots: (N,) s(t) for t = 0..N-1, increasing. Exact at a knot: there the interpolation weight is 0,
    so the integer timesteps DDIM visits reach the model as those integers. Written with a comparison
    and a sum (no searchsorted) so that it exports to ONNX as plain ops.
    """
    n = knots.shape[0]
    below = (knots.unsqueeze(0) <= sigma.unsqueeze(1)).sum(dim=1)  # (rows, N) -> (rows,) knots at or below s
    lo = (below - 1).clamp(0, n - 2)  # (rows,) the interval [lo, lo + 1] holding s (extrapolated at the ends)
    s_lo, s_hi = knots.index_select(0, lo), knots.index_select(0, lo + 1)
    return lo.to(sigma.dtype) + (sigma - s_lo) / (s_hi - s_lo)


@register_adapter("CogVideoXTransformer3DModel")
class CogVideoXAdapter(ModelAdapter):
    """diffusers ``CogVideoXTransformer3DModel`` (CogVideoX 1.0 text-to-video: 2B and 5B), seen as a flow-matching model.

    ``pre`` takes the flow-matching state x (B, C, F, H, W) and time s (B,) (the family's timestep scale
    is 1); ``head`` returns the flow-matching velocity u (float32). See the module docstring for the
    change of variables; it needs the checkpoint's noise schedule (:func:`attach_noise_schedule`).

    ``text`` is the T5 states (B, L, D_text) with L = ``max_text_seq_length`` (226), as the pipeline
    pads them: the positional table covers exactly that many text tokens. A cached step (``text``
    None) embeds the video tokens with an all-zero text (the video tokens do not depend on the
    text's values, only on its length).
    """

    @property
    def noise_schedule(self) -> VPNoiseSchedule:
        """The checkpoint's DDIM noise schedule (attached by the loader, ``enable_ertacache`` or by hand)."""
        schedule = getattr(self.model, NOISE_ATTR, None)
        if schedule is None:
            raise UserError("this CogVideoXTransformer3DModel has no noise schedule attached; load it with "
                            "ertacache.models.loading.load_bundle (which reads scheduler/scheduler_config.json), or "
                            "call ertacache.models.cogvideox.attach_noise_schedule(transformer, scheduler)")
        return schedule

    def own_sigmas(self, steps: int) -> np.ndarray:
        """The checkpoint's DDIM timesteps as flow-matching times (T+1,), ending at 0."""
        return self.noise_schedule.sigmas(steps)

    def _knots(self, device) -> torch.Tensor:
        """(N,) float32 s(t) of every training timestep: a constant of the exported graphs."""
        return torch.tensor(self.noise_schedule.timestep_sigmas(), dtype=torch.float32, device=device)

    def bind_pipeline(self, pipe) -> None:
        """``enable_ertacache`` hands over the pipeline: its DDIM scheduler's config is the noise schedule."""
        attach_noise_schedule(self.model, pipe.scheduler)

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

    def _model_coordinates(self, latents: torch.Tensor, timestep: torch.Tensor):
        """Flow-matching (x (B, C, F, H, W), s) -> the model's (z (B, F, C, H, W), t (B,)), and s (B,) float32."""
        b = latents.shape[0]
        sigma = timestep.float().reshape(-1).expand(b)  # (B,)
        c = fm_scale(sigma).reshape(b, 1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1, 1)
        t = model_timestep_of(sigma, self._knots(latents.device))  # (B,) the model's DDPM timestep
        z = (latents.float() * c).to(latents.dtype)  # the DDPM latent the model was trained on
        return z.transpose(1, 2), t, sigma  # z: (B, C, F, H, W) -> (B, F, C, H, W), the model's layout

    @staticmethod
    def _velocity(v: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The model's v-prediction (B, C, F, H, W) -> u = eps - x0 = c^2 (2s - 1) x + c v (float32); s (B, 1, 1, 1, 1)."""
        c = fm_scale(s)
        return c * c * (2.0 * s - 1.0) * x.float() + c * v.float()

    def pre(self, latents: torch.Tensor, timestep: torch.Tensor, text) -> PreOutput:
        """latents: the flow-matching state x (B, C, F, H, W); timestep: its time s (B,) (or one value)."""
        model = self.model
        self._check_supported()
        b, _, f, h, w = latents.shape
        _, p_h, p_w = self.patch_size
        grid = (b, f, h // p_h, w // p_w)
        x, t, sigma = self._model_coordinates(latents, timestep)  # x: (B, F, C, H, W)
        # the model's own time path: sinusoidal projection, then the MLP (no timestep_cond for text-to-video)
        temb = model.time_embedding(model.time_proj(t).to(x.dtype), None)  # (B, D)
        cfg = model.config
        words = text if text is not None else x.new_zeros(b, cfg.max_text_seq_length, cfg.text_embed_dim)
        joint = model.embedding_dropout(self._embed(words, x))  # (B, L + N, D): text tokens, then video
        length = words.shape[1]
        tokens = joint[:, length:]  # (B, N, D), N = F * H' * W'
        head_inputs = _CogHeadInputs(temb=temb, grid=grid, state=latents.float(), sigma=sigma.reshape(b, 1, 1, 1, 1))
        if text is None:
            return PreOutput(hidden=tokens, head_inputs=head_inputs, block_inputs=None)
        return PreOutput(hidden=tokens, head_inputs=head_inputs,
                         block_inputs=_CogBlockInputs(text=joint[:, :length],
                                                      rotary=self.rotary(f, *grid[2:], latents.device)))

    def _embed(self, words: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``patch_embed(words, x)`` (CogVideoX 1.0 path), with a sincos table for another size that exports.

        At the config's sample size the module's own table is added, as its forward does. At any other size
        its forward rebuilds the table through ``Tensor.data`` (a constant torch.export cannot trace), so the
        table is built here from the same diffusers function and joined with ``cat``: the same values.
        """
        pe = self.model.patch_embed
        b, f, c, h, w = x.shape  # (B, F, C, H, W)
        frames = (f - 1) * pe.temporal_compression_ratio + 1  # the table is keyed by pixel-space frames
        # no sincos table, the sample size, or a learned table (fixed to the sample size; the module refuses another)
        if not pe.use_positional_embeddings or pe.use_learned_positional_embeddings \
                or (pe.sample_height, pe.sample_width, pe.sample_frames) == (h, w, frames):
            return pe(words, x)
        from diffusers.models.embeddings import get_3d_sincos_pos_embed

        text = pe.text_proj(words)  # (B, L, D)
        video = pe.proj(x.reshape(-1, c, h, w))  # (B*F, C, H, W) -> (B*F, D, H', W')
        video = video.view(b, f, *video.shape[1:]).flatten(3).transpose(2, 3).flatten(1, 2)  # (B, F*H'*W', D)
        p = pe.patch_size
        table = get_3d_sincos_pos_embed(pe.embed_dim, (w // p, h // p), f, pe.spatial_interpolation_scale,
                                        pe.temporal_interpolation_scale, device=x.device, output_type="pt")
        table = table.flatten(0, 1).unsqueeze(0)  # (F, H'*W', D) -> (1, F*H'*W', D)
        joint_table = torch.cat([table.new_zeros(1, text.shape[1], pe.embed_dim), table], dim=1)  # zero on the text
        return torch.cat([text, video], dim=1) + joint_table.to(text.dtype)

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
        v = out.flatten(5, 6).flatten(3, 4)  # (B, C, F, H, W): the model's v-prediction
        return self._velocity(v, pre.head_inputs.state, pre.head_inputs.sigma)  # u, the flow-matching velocity

    def model_forward(self, latents: torch.Tensor, timestep: torch.Tensor, text) -> torch.Tensor:
        """The model's own forward as CogVideoXPipeline calls it (the DDPM latent, the timestep, the T5 states and
        the rotary tables), seen in flow-matching coordinates like ``pre``/``head``: x, s in, u out."""
        self._check_supported()
        z, t, sigma = self._model_coordinates(latents, timestep)  # z: (B, F, C, H, W)
        _, p_h, p_w = self.patch_size
        rotary = self.rotary(z.shape[1], z.shape[3] // p_h, z.shape[4] // p_w, z.device)
        v = self.model(hidden_states=z, encoder_hidden_states=text, timestep=t, image_rotary_emb=rotary,
                       return_dict=False)[0].transpose(1, 2)  # (B, F, C, H, W) -> (B, C, F, H, W)
        return self._velocity(v, latents, sigma.reshape(-1, 1, 1, 1, 1))  # s: (B,) -> (B, 1, 1, 1, 1)

    def transformer_call(self, *args, **kwargs) -> TransformerCall:
        """CogVideoXPipeline's call under ``enable_ertacache``: the hook's flow-matching scheduler makes the
        pipeline's latents the flow-matching state x (B, F, C, H, W) and its timesteps s x 1000, and the
        pipeline's update integrates the velocity u the hook returns. The rotary tables the pipeline passes are
        dropped: ``pre`` builds the same ones from the grid."""
        kwargs.pop("image_rotary_emb", None)
        names = ("hidden_states", "encoder_hidden_states", "timestep", "timestep_cond", "ofs")
        bound = bind_call(names, args, kwargs, ignored=("attention_kwargs",), owner=type(self.model).__name__)
        if bound.get("timestep_cond") is not None or bound.get("ofs") is not None:
            raise UserError("CogVideoXTransformer3DModel: timestep_cond / ofs (CogVideoX 1.5) are not mirrored")
        for name in names[:3]:
            if bound.get(name) is None:
                raise UserError(f"CogVideoXTransformer3DModel: the pipeline's call has no {name}")
        text = bound["encoder_hidden_states"]
        return TransformerCall(latents=bound["hidden_states"].transpose(1, 2),  # (B, F, C, H, W) -> (B, C, F, H, W)
                               timestep=bound["timestep"].float() / PIPELINE_TIMESTEP_UNITS,
                               cond=text, cached_cond=None, to_output=lambda u: u.transpose(1, 2))


# ---------------------------------------------------------------------------------------------- components


class T5PromptEncoder:
    """CogVideoXPipeline's text path: T5 encoder states of the prompt padded to ``max_length`` (226) tokens.

    As the pipeline's ``_get_t5_prompt_embeds``: no attention mask and no zeroing of the padding (the
    model was trained on the states of the padded sequence).
    """

    def __init__(self, tokenizer, text_encoder, max_length: int = 226):
        self.tokenizer, self.text_encoder, self.max_length = tokenizer, text_encoder, max_length

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]  # (B, L, D)


class CogVideoXLatentDecoder:
    """``AutoencoderKLCogVideoX`` decode as CogVideoXPipeline's ``decode_latents``: latents / scaling_factor."""

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.spatial_factor = 2 ** (len(cfg.block_out_channels) - 1)  # the pipeline's vae_scale_factor_spatial
        self.temporal_factor = int(cfg.temporal_compression_ratio)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() / self.vae.config.scaling_factor  # (B, C, F', H', W'), the VAE's layout
        video = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]  # (B, 3, F, H, W)
        return to_uint8_frames(video)


def _load_transformer(path: Path, dtype):
    """The transformer, with the folder's scheduler config attached (the sigma table and timestep map need it)."""
    transformer = diffusers_loader("CogVideoXTransformer3DModel", "transformer")(path, dtype)
    attach_noise_schedule(transformer, VPNoiseSchedule.from_folder(path))
    return transformer


def _load_text(path: Path, dtype) -> T5PromptEncoder:
    from transformers import AutoTokenizer, T5EncoderModel

    return T5PromptEncoder(AutoTokenizer.from_pretrained(path / "tokenizer"),
                           T5EncoderModel.from_pretrained(path / "text_encoder", torch_dtype=dtype).eval())


def _text_to_video_1_0(config) -> bool:
    """CogVideoX 1.0 text-to-video; 1.5 (temporal patch) and I2V (image latents on channels) are other models."""
    return getattr(config, "patch_size_t", None) is None and config.in_channels == config.out_channels


COGVIDEOX_T2V = register_family(ModelFamily(
    name="cogvideox",
    description="CogVideoX 1.0 text-to-video (2B / 5B; T5 text, AutoencoderKLCogVideoX; v-prediction DDIM run "
                "as flow matching)",
    transformer_class="CogVideoXTransformer3DModel",
    latent_kind=VIDEO,
    conditioning=(ConditioningInput("text_embeds", doc="(nb*B, 226, D_t5) T5 states, cond rows then uncond"),),
    timestep_scale=1.0,  # the adapter receives the flow-matching time s and maps it to the model's timestep
    sigma_schedule=SigmaSchedule(kind=VP),  # the checkpoint scheduler's DDIM timesteps, as flow-matching times
    guidance=CFG,
    block_stacks=("transformer_blocks",),
    transformer=_load_transformer,
    prompt_encoder=_load_text,
    decoder=diffusers_loader("AutoencoderKLCogVideoX", "vae", wrap=CogVideoXLatentDecoder),
    required_files=("transformer/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
                    "scheduler/scheduler_config.json"),
    weight_folders=("transformer", "text_encoder", "vae"),
    claims=_text_to_video_1_0,
))
