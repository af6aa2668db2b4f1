"""The model family: everything a stage needs to know about a kind of model, as data.

An adapter (:mod:`ertacache.models.adapter`) splits one transformer's forward into
pre / blocks / head. Everything else that differs between model families lives in
one :class:`ModelFamily` entry, so that no stage outside ``ertacache.models``
branches on the model (DESIGN.md, "One model-family object"):

* the latent layout (:class:`LatentLayout`: video or image, channel axis, VAE and
  patch/packing factors, the latent shape of a request and the refusal of one that
  does not fit);
* the conditioning inputs besides the latents (named tensors, e.g. Wan's
  ``text_embeds``; FLUX's prompt embeddings, pooled embeddings and position ids);
* the timestep scale (the model embeds ``sigma * timestep_scale``);
* the sigma schedule (:class:`SigmaSchedule`: a static shift, as Wan, or FLUX's
  resolution-dependent dynamic shift);
* the guidance mode (``cfg``: batched cond/uncond branches; ``embedded``: a
  distilled guidance embedding, one branch; ``none``);
* the export-time rewrites (names the export stage looks up, e.g. Wan's rope rewrite);
* how the transformer, the text encoder(s) and the decoder are loaded from a
  diffusers-format folder (loader callables and the files they need).

Entries are registered with :func:`register_family` and found by name
(:func:`family_named`, what a recipe's ``family`` field names) or by the
transformer's class (:func:`family_for_model`, keyed like the adapter registry).
A *variant* (``variant_of``) is a family that loads other components (e.g. the
testbed: Wan's transformer class with a tiny text encoder and a pixel VAE) but
must agree with its base on everything the stages use, so a lookup by class
(which cannot tell the two apart) answers the base and is still right. Where one transformer
class serves two kinds of checkpoint that differ in what the stages use (Wan's text-to-video and
image-to-video), each is a base family with a ``claims`` rule on the model's config, and the
lookup by class picks by config.

This module imports no torch: reading a recipe and its family stays cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from importlib import import_module
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ertacache.errors import UserError

VIDEO, IMAGE = "video", "image"
LATENT_KINDS = (VIDEO, IMAGE)

#: guidance modes: batched classifier-free guidance branches, a distilled guidance embedding (one branch), none
CFG, EMBEDDED, NO_GUIDANCE = "cfg", "embedded", "none"
GUIDANCE_MODES = (CFG, EMBEDDED, NO_GUIDANCE)

#: how many rows a conditioning tensor has: one per CFG branch and sample, one per sample, or no batch axis
ROWS_PER_BRANCH, ROWS_PER_SAMPLE, ROWS_SHARED = "branch", "sample", "shared"
ROW_RULES = (ROWS_PER_BRANCH, ROWS_PER_SAMPLE, ROWS_SHARED)

#: graph input names the step graphs own; a conditioning input may not take one of them
RESERVED_INPUTS = ("latents", "step", "guidance_scale", "residual")


def guidance_branches(mode: str, guidance_scale: float) -> int:
    """Rows per sample the transformer sees: 2 with CFG above scale 1, else 1 (embedded or no guidance)."""
    return 2 if mode == CFG and guidance_scale > 1.0 else 1


def check_guidance(mode: str, guidance_scale: float, family: str = "this") -> None:
    """Refuse a guidance scale that is not a number, or one a guidance-free family would ignore."""
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"guidance mode must be one of {GUIDANCE_MODES}, got {mode!r}")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise UserError(f"--guidance-scale must be a finite number >= 0, got {guidance_scale}")
    if mode == NO_GUIDANCE and guidance_scale > 1.0:
        who = "this model" if family == "this" else f"the {family} model"
        raise UserError(f"{who} takes no guidance (no CFG, no guidance embedding); "
                        f"drop --guidance-scale (got {guidance_scale:g})")


# ---------------------------------------------------------------------------------------------- latent layout


@dataclass(frozen=True)
class LatentLayout:
    """Shape rules of one loaded model's latents: what the noise and every graph's ``latents`` look like.

    kind: ``"video"`` -> latents (B, C, F', H', W'); ``"image"`` -> (B, C, H', W'). The channel
        axis is :attr:`channel_axis` (1) in both, which is what the per-channel correction tables index.
    channels: C, the latent channels (the decoder's).
    spatial_factor: the VAE's downsampling of height and width (pixels per latent pixel).
    patch: the transformer's patch over the latent axes after C: (pt, ph, pw) for video, (ph, pw) for images.
    temporal_factor: video only, the VAE's downsampling of time: frames = temporal_factor * (F' - 1) + 1.
    packing: latent pixels packed into one token along each spatial side before the patch
        embedding (FLUX packs 2 x 2 latent pixels into a token; 1 for Wan).
    model: the model id that error messages name.
    """

    kind: str
    channels: int
    spatial_factor: int
    patch: tuple[int, ...]
    temporal_factor: int = 1
    packing: int = 1
    model: str = "this model"

    channel_axis = 1  # not a field: every layout keeps channels at axis 1

    def __post_init__(self):
        object.__setattr__(self, "patch", tuple(int(p) for p in self.patch))
        if self.kind not in LATENT_KINDS:
            raise ValueError(f"LatentLayout.kind must be one of {LATENT_KINDS}, got {self.kind!r}")
        want = 3 if self.kind == VIDEO else 2
        if len(self.patch) != want:
            raise ValueError(f"a {self.kind} layout needs a patch of {want} factors "
                             f"({'(pt, ph, pw)' if want == 3 else '(ph, pw)'}), got {self.patch}")
        for name in ("channels", "spatial_factor", "temporal_factor", "packing"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LatentLayout.{name} must be >= 1, got {getattr(self, name)}")
        if min(self.patch) < 1:
            raise ValueError(f"LatentLayout.patch factors must be >= 1, got {self.patch}")
        if self.kind == IMAGE and self.temporal_factor != 1:
            raise ValueError("an image layout has no time axis: temporal_factor must be 1")

    @property
    def is_video(self) -> bool:
        return self.kind == VIDEO

    @property
    def rank(self) -> int:
        """Axes of one sample's latent (C, F', H', W') or (C, H', W'): 4 for video, 3 for images."""
        return 4 if self.is_video else 3

    def pixel_multiples(self) -> tuple[int, int]:
        """(height, width) multiples a request must have: VAE factor x packing x patch on each side."""
        ph, pw = self.patch[-2:]
        return self.spatial_factor * self.packing * ph, self.spatial_factor * self.packing * pw

    def check(self, height: int, width: int, frames: int | None = None) -> None:
        """Refuse, with the fix, a request whose size the VAE and the patch embedding cannot take."""
        mh, mw = self.pixel_multiples()
        if height <= 0 or width <= 0 or height % mh or width % mw:
            sf, ph = self.spatial_factor, self.patch[-2]
            how = f"VAE factor {sf} x patch {ph}" if self.packing == 1 else \
                f"VAE factor {sf} x packing {self.packing} x patch {ph}"
            size = f"multiples of {mh}" if mh == mw else f"multiples of {mh} (height) and {mw} (width)"
            raise UserError(
                f"height {height} and width {width} must be positive {size} ({how}) for {self.model}; e.g. "
                f"--height {max(1, height // mh) * mh} --width {max(1, width // mw) * mw}"
            )
        if not self.is_video:
            if frames is not None:
                raise UserError(f"{self.model} generates images: --frames applies to video models only; drop it")
            return
        if frames is None:
            raise UserError(f"{self.model} generates video: give the number of frames (--frames)")
        tf = self.temporal_factor
        if frames < 1 or (frames - 1) % tf:
            raise UserError(f"frames must be {tf}*k + 1 for {self.model} (VAE temporal factor {tf}); got {frames}"
                            + (f", e.g. --frames {((max(frames, 1) - 1) // tf) * tf + 1}" if tf > 1 else ""))
        latent_frames = (frames - 1) // tf + 1
        if latent_frames % self.patch[0]:
            raise UserError(f"{latent_frames} latent frames are not a multiple of the temporal patch {self.patch[0]} "
                            f"for {self.model}; use --frames {tf * self.patch[0] * math.ceil(latent_frames / self.patch[0]) - tf + 1}")

    def latent_shape(self, batch: int, height: int, width: int, frames: int | None = None) -> tuple[int, ...]:
        """(B, C, F', H', W') for video, (B, C, H', W') for images; refuses sizes that do not fit (:meth:`check`)."""
        self.check(height, width, frames)
        spatial = (height // self.spatial_factor, width // self.spatial_factor)
        if self.is_video:
            return (batch, self.channels, (frames - 1) // self.temporal_factor + 1, *spatial)
        return (batch, self.channels, *spatial)

    def tokens(self, height: int, width: int, frames: int | None = None) -> int:
        """Tokens the transformer sees per sample (the sequence length a dynamic shift depends on)."""
        shape = self.latent_shape(1, height, width, frames)[2:]  # (F', H', W') or (H', W')
        grid = [shape[-2] // (self.packing * self.patch[-2]), shape[-1] // (self.packing * self.patch[-1])]
        if self.is_video:
            grid.append(shape[0] // self.patch[0])
        return math.prod(grid)


# ---------------------------------------------------------------------------------------------- sigma schedule


def static_shift(sigma, shift: float):
    """Wan's (SD3's) time shift: pushes sigmas toward 1 (more steps at high noise) for shift > 1."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def exponential_shift(sigma, mu: float):
    """FLUX's resolution-dependent shift: e^mu / (e^mu + (1/sigma - 1)) (diffusers' ``time_shift_type="exponential"``)."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigma - 1.0))


STATIC, DYNAMIC, RAMP, VP = "static", "dynamic", "ramp", "vp"
#: every sigma schedule kind (a recipe's ``sigma_schedule`` names one to override its family's)
SCHEDULE_KINDS = (STATIC, DYNAMIC, RAMP, VP)


@dataclass(frozen=True)
class SigmaSchedule:
    """How a family's flow-matching sigma table is made (diffusers' ``FlowMatchEulerDiscreteScheduler``).

    ``static``: the shift is a setting (the recipe's ``shift``, Wan's 3.0 or 5.0). The table equals
    ``FlowMatchEulerDiscreteScheduler(shift=S).set_timesteps(T)``: diffusers shifts twice on that
    path (once in the constructor, to find ``sigma_min``; again in ``set_timesteps``), reproduced here.

    ``dynamic``: the shift depends on the resolution (FLUX; ``use_dynamic_shifting=True``). The
    pipeline's ramp ``linspace(1, 1/T, T)`` is shifted by the exponential time shift with
    ``mu = m * seq_len + b``, the line through (base_seq_len, base_shift) and (max_seq_len, max_shift),
    with seq_len the image tokens (FluxPipeline's ``calculate_shift``). The recipe's ``shift`` is not used.

    ``ramp``: the pipeline's ramp ``linspace(1, 1/T, T)`` with the static shift (the recipe's
    ``shift``): FluxPipeline with a scheduler whose ``use_dynamic_shifting`` is off, as FLUX.1-schnell
    ships (shift 1: the ramp itself).

    ``vp``: a variance-preserving DDPM model sampled with DDIM (CogVideoX), run as flow-matching Euler
    in its flow-matching time (:mod:`ertacache.models.cogvideox`). Its table depends on the checkpoint's
    scheduler config, so the loaded model's adapter makes it (``adapter.own_sigmas``), not this object;
    :meth:`table` refuses.

    Every table has ``steps + 1`` float64 entries ending exactly at 0.
    """

    kind: str = STATIC
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"SigmaSchedule.kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.kind == DYNAMIC:
            if not (0 < self.base_seq_len < self.max_seq_len):
                raise ValueError(f"a dynamic shift needs 0 < base_seq_len < max_seq_len, got "
                                 f"{self.base_seq_len} and {self.max_seq_len}")
            if not all(map(math.isfinite, (self.base_shift, self.max_shift))):
                raise ValueError("base_shift and max_shift must be finite")

    def check_steps(self, steps: int) -> None:
        """Refuse, before any model loads, a step count this schedule cannot sample.

        ``vp`` (DDIM): a step goes from t to t - N // T, which is the next of the T timesteps only when T
        divides the N training timesteps; any other T would feed the model timesteps its latents are not at.
        """
        n = self.num_train_timesteps
        if self.kind == VP and (steps < 1 or n % steps):
            ok = [k for k in range(10, 101) if n % k == 0]
            raise UserError(f"DDIM steps from t to t - {n} // T, which is the next timestep only when T divides {n}; "
                            f"{steps} steps does not. Use one of {ok} (--steps)")

    @property
    def uses_shift(self) -> bool:
        """Whether the ``shift`` setting changes the table (static, ramp) or is ignored (dynamic)."""
        return self.kind in (STATIC, RAMP)

    def mu(self, seq_len: int) -> float:
        """The dynamic shift's exponent for ``seq_len`` tokens (linear in the sequence length)."""
        m = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return seq_len * m + (self.base_shift - m * self.base_seq_len)

    def table(self, steps: int, shift: float | None = None, seq_len: int | None = None) -> np.ndarray:
        """The nominal sigma table: ``steps + 1`` values from ~1 down to exactly 0 (float64)."""
        if steps < 1:
            raise UserError(f"steps must be >= 1, got {steps}")
        n = self.num_train_timesteps
        if self.kind == VP:
            raise ValueError("a 'vp' sigma table comes from the checkpoint's scheduler: ask the loaded model's "
                             "adapter (adapter.own_sigmas(steps)), as request_sigmas does")
        if self.kind == STATIC:
            if shift is None or not shift > 0:
                raise UserError(f"shift must be > 0, got {shift}")
            # The scheduler builds sigma_min from its float32 training table, then shifts it.
            sigma_min = float(np.float32(static_shift(np.float32(1.0 / n), np.float32(shift))))
            ramp = np.linspace(1.0 * n, sigma_min * n, steps) / n  # shift(1) == 1: sigma_max is 1
            sigmas = static_shift(ramp, shift)
        elif self.kind == RAMP:
            if shift is None or not shift > 0:
                raise UserError(f"shift must be > 0, got {shift}")
            # FluxPipeline's ramp; set_timesteps(sigmas=...) shifts it statically in float32.
            ramp = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
            sigmas = static_shift(ramp, np.float32(shift)).astype(np.float32).astype(np.float64)
        else:
            if seq_len is None or seq_len < 1:
                raise UserError(f"a dynamic sigma shift needs the image's token count, got {seq_len}")
            # FluxPipeline's ramp; the scheduler takes it as float32 and shifts in float32.
            ramp = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
            sigmas = exponential_shift(ramp, self.mu(seq_len)).astype(np.float32).astype(np.float64)
        return np.append(sigmas, 0.0)


# ---------------------------------------------------------------------------------------------- the family


@dataclass(frozen=True)
class ConditioningInput:
    """One named conditioning tensor the step graphs take besides the latents.

    rows: ``"branch"`` (nb*B rows: the cond rows, then with CFG the uncond rows), ``"sample"``
    (B rows) or ``"shared"`` (no batch axis, e.g. position ids). ``doc``: its shape and meaning.
    cached_step: whether a cached step reads it too (FLUX's pooled text embedding feeds the
    timestep embedding the head needs; Wan's text states feed only the skipped blocks).
    """

    name: str
    rows: str = ROWS_PER_BRANCH
    doc: str = ""
    cached_step: bool = False

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"conditioning input name {self.name!r} must be an identifier (it names a graph input)")
        if any(self.name == r or self.name.startswith(r + "_") for r in RESERVED_INPUTS):
            raise ValueError(f"conditioning input {self.name!r} collides with the step graphs' own inputs "
                             f"{RESERVED_INPUTS}; choose another name")
        if self.rows not in ROW_RULES:
            raise ValueError(f"conditioning input {self.name!r}: rows must be one of {ROW_RULES}, got {self.rows!r}")

    def expected_rows(self, batch: int, n_branches: int) -> int | None:
        """Its leading-axis length for ``batch`` samples and ``n_branches`` CFG branches (None: no batch axis)."""
        return {ROWS_PER_BRANCH: n_branches * batch, ROWS_PER_SAMPLE: batch}.get(self.rows)


Loader = Callable[[Path, Any], Any]  # (model folder, torch dtype) -> component


#: the fields every stage reads; a variant must agree with its base family on all of them
STAGE_FIELDS = ("transformer_class", "latent_kind", "packing", "conditioning", "timestep_scale", "sigma_schedule",
                "guidance", "export_rewrites")


@dataclass(frozen=True)
class ModelFamily:
    """One model family, as data and small functions (see the module docstring).

    name: what a recipe's ``family`` names.
    transformer_class: the diffusers class of its transformer (:func:`family_for_model` keys on it,
        as :func:`~ertacache.models.adapter.adapter_for` does).
    latent_kind: ``"video"`` or ``"image"``; :meth:`layout` turns it into a :class:`LatentLayout`
        once the decoder and the transformer's patch are known.
    packing: latent pixels per token side packed before the patch embedding (FLUX 2, Wan 1).
    conditioning: the conditioning tensors, in graph-input order.
    timestep_scale: the model's timestep input is ``sigma * timestep_scale``.
    sigma_schedule: how the nominal sigma table is made.
    guidance: ``"cfg"``, ``"embedded"`` or ``"none"``.
    export_rewrites: names of graph rewrites the export stage applies while exporting
        (looked up in ``ertacache.export``; e.g. ``"wan_stack_rope"``).
    transformer, prompt_encoder, decoder: loaders ``(folder, torch dtype) -> component`` (the
        prompt encoder and decoder behind :mod:`ertacache.models.components`' interfaces).
    image_encoder: for an image-conditioned family (Wan2.1 I2V), the loader of its image path,
        ``(folder, torch dtype, decoder=None) -> component`` (given the loaded decoder, it may share its
        VAE instead of loading a second copy): a component whose ``encode(images, height, width, frames)``
        returns the family's image conditioning inputs by name (one row per image); None for
        text-only families.
    required_files: paths a model folder must have; ``weight_folders``: subfolders whose
        ``*.safetensors`` are checked before loading; ``require_safetensors``: each must hold one.
    expert_transformer: for a family with two-expert checkpoints (Wan2.2 A14B), the loader of the
        second (low-noise) transformer (``transformer_2/``), same class as the first; a recipe with a
        ``boundary_ratio`` needs it. None: one transformer per checkpoint.
    variant_of: the base family this one only loads differently (see the module docstring).
    block_stacks: the transformer's block lists (attribute names, in execution order): what peer
        caching libraries hook and the eval counts (Wan ``blocks``; FLUX double- then single-stream).
    claims: for a transformer class that several base families share (Wan's text-to-video and
        image-to-video checkpoints are both ``WanTransformer3DModel``), which models' configs this
        family takes: ``claims(model.config) -> bool``. None: every model of the class (the class
        then has one base family).
    """

    name: str
    transformer_class: str
    latent_kind: str
    conditioning: tuple[ConditioningInput, ...]
    timestep_scale: float
    sigma_schedule: SigmaSchedule
    guidance: str
    transformer: Loader
    prompt_encoder: Loader
    decoder: Loader
    required_files: tuple[str, ...]
    export_rewrites: tuple[str, ...] = ()
    packing: int = 1
    weight_folders: tuple[str, ...] = ("transformer", "text_encoder", "vae")
    require_safetensors: bool = False
    variant_of: str | None = None
    block_stacks: tuple[str, ...] = ("blocks",)
    claims: Callable[[Any], bool] | None = field(default=None, compare=False)
    image_encoder: Loader | None = None
    expert_transformer: Loader | None = None
    description: str = field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "conditioning", tuple(self.conditioning))
        object.__setattr__(self, "export_rewrites", tuple(self.export_rewrites))
        object.__setattr__(self, "required_files", tuple(self.required_files))
        object.__setattr__(self, "weight_folders", tuple(self.weight_folders))
        object.__setattr__(self, "block_stacks", tuple(self.block_stacks))
        where = f"model family {self.name!r}"
        if not self.name or not all(c.isalnum() or c in "._-" for c in self.name):
            raise ValueError(f"{where}: a family name is a short id of letters, digits, '.', '_' or '-'")
        if not self.transformer_class.isidentifier():
            raise ValueError(f"{where}: transformer_class must be a class name, got {self.transformer_class!r}")
        if self.latent_kind not in LATENT_KINDS:
            raise ValueError(f"{where}: latent_kind must be one of {LATENT_KINDS}, got {self.latent_kind!r}")
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"{where}: guidance must be one of {GUIDANCE_MODES}, got {self.guidance!r}")
        if not (self.timestep_scale > 0 and math.isfinite(self.timestep_scale)):
            raise ValueError(f"{where}: timestep_scale must be a positive number, got {self.timestep_scale}")
        if not isinstance(self.sigma_schedule, SigmaSchedule):
            raise ValueError(f"{where}: sigma_schedule must be a SigmaSchedule")
        if int(self.packing) < 1:
            raise ValueError(f"{where}: packing must be >= 1, got {self.packing}")
        if not self.conditioning or not all(isinstance(c, ConditioningInput) for c in self.conditioning):
            raise ValueError(f"{where}: conditioning must be one or more ConditioningInput entries")
        names = [c.name for c in self.conditioning]
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: conditioning input names repeat: {names}")
        for r in self.export_rewrites:
            if not r.isidentifier():
                raise ValueError(f"{where}: export rewrite names are identifiers, got {r!r}")
        for name in ("transformer", "prompt_encoder", "decoder"):
            if not callable(getattr(self, name)):
                raise ValueError(f"{where}: {name} must be a loader callable (folder, torch dtype) -> component")
        if self.expert_transformer is not None and not callable(self.expert_transformer):
            raise ValueError(f"{where}: expert_transformer must be a loader callable or None")
        if self.image_encoder is not None and not callable(self.image_encoder):
            raise ValueError(f"{where}: image_encoder must be a loader callable or None")
        if self.image_encoder is not None and len(self.conditioning) < 2:
            raise ValueError(f"{where}: an image_encoder makes image inputs, so the conditioning must list them "
                             "beside the text input")
        if not self.required_files:
            raise ValueError(f"{where}: required_files must list what a model folder holds (e.g. transformer/config.json)")
        if self.variant_of == self.name:
            raise ValueError(f"{where}: a family cannot be a variant of itself")
        if self.claims is not None and not callable(self.claims):
            raise ValueError(f"{where}: claims must be a callable (model config) -> bool, or None")

    # -- what the stages ask

    @property
    def is_video(self) -> bool:
        return self.latent_kind == VIDEO

    @property
    def latent_rank(self) -> int:
        """Axes of one sample's latent: 4 (C, F', H', W') for video, 3 (C, H', W') for images."""
        return 4 if self.is_video else 3

    @property
    def takes_images(self) -> bool:
        """Whether a request needs a conditioning image (an image-to-video family)."""
        return self.image_encoder is not None

    @property
    def input_names(self) -> tuple[str, ...]:
        """The conditioning tensors' names, in graph-input order."""
        return tuple(c.name for c in self.conditioning)

    def layout(self, decoder, patch_size, model: str | None = None) -> LatentLayout:
        """The :class:`LatentLayout` of one loaded model: this family's kind, the decoder's factors, the patch."""
        patch = tuple(int(p) for p in patch_size)
        if not self.is_video and len(patch) == 3 and patch[0] == 1:
            patch = patch[1:]  # an image model with a video-style (1, ph, pw) patch
        return LatentLayout(
            kind=self.latent_kind,
            channels=int(decoder.latent_channels),
            spatial_factor=int(decoder.spatial_factor),
            temporal_factor=int(getattr(decoder, "temporal_factor", 1)) if self.is_video else 1,
            patch=patch,
            packing=int(self.packing),
            model=model or f"the {self.name} family",
        )

    def sigmas(self, steps: int, shift: float | None = None, seq_len: int | None = None) -> np.ndarray:
        """The nominal sigma table (``steps + 1`` float64 values ending at 0): see :class:`SigmaSchedule`."""
        return self.sigma_schedule.table(steps, shift, seq_len)

    def n_branches(self, guidance_scale: float) -> int:
        """Rows per sample the transformer sees: 2 with CFG above scale 1, else 1 (embedded or no guidance)."""
        return guidance_branches(self.guidance, guidance_scale)

    def accepts_guidance(self, mode: str) -> bool:
        """Whether a model of this family may be run in guidance ``mode``.

        The family's own mode; in a guidance-distilled family also ``"none"`` and ``"cfg"``: FLUX.1-schnell
        is a ``FluxTransformer2DModel`` without the guidance embedder, so its recipe narrows the family's
        ``"embedded"`` to ``"none"`` (one branch, a guidance scale refused); a model trained with an
        unconditional branch (the ``flux-tiny`` testbed) runs ``"cfg"``, FluxPipeline's true CFG
        (``true_cfg_scale`` with a negative prompt), both branches batched as for Wan.
        """
        return mode == self.guidance or (self.guidance == EMBEDDED and mode in (NO_GUIDANCE, CFG))

    def check_guidance(self, guidance_scale: float) -> None:
        """Refuse a guidance scale this family has no use for (a guidance-free model asked to guide)."""
        check_guidance(self.guidance, guidance_scale, self.name)

    def variant(self, name: str, **changes) -> "ModelFamily":
        """A family loading other components (``transformer``, ``prompt_encoder``, ``decoder``, files)."""
        bad = sorted(set(changes) & set(STAGE_FIELDS))
        if bad:
            raise ValueError(f"a variant of {self.name!r} loads other components; it cannot change {bad}")
        return replace(self, name=name, variant_of=self.name, **changes)


# ---------------------------------------------------------------------------------------------- registry

_FAMILIES: dict[str, ModelFamily] = {}
_BY_CLASS: dict[str, list[str]] = {}  # transformer class -> its base families (several only when each claims)

#: where each known family is defined: name -> the module whose import registers it. Imported on
#: demand, like an entry point: reading a recipe imports no torch, and ``ertacache.models`` never imports
#: a package above it (the testbed registers itself), so the package import graph stays acyclic.
FAMILY_MODULES = {
    "wan": "ertacache.models.wan",
    "wan-i2v": "ertacache.models.wan",
    "wan-i2v-a14b": "ertacache.models.wan",
    "flux": "ertacache.models.flux",
    "hunyuanvideo": "ertacache.models.hunyuan_video",
    "cogvideox": "ertacache.models.cogvideox",
    "testbed": "ertacache.testbed.family",
    "flux-testbed": "ertacache.testbed.family",
}

#: the modules of ertacache.models itself; a lookup by transformer class imports these first
BUILTIN_FAMILY_MODULES = tuple(m for m in FAMILY_MODULES.values() if m.startswith("ertacache.models."))

_loaded_builtins = False


def _load_builtins() -> None:
    global _loaded_builtins
    if not _loaded_builtins:
        _loaded_builtins = True
        for module in BUILTIN_FAMILY_MODULES:
            import_module(module)


def is_known_family(name: str) -> bool:
    """Whether ``name`` names a family, without importing any family module (so without torch)."""
    return name in _FAMILIES or name in FAMILY_MODULES


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to the registry (by name; a base family also by its transformer class). Returns it.

    Registering the same name again replaces the entry (a module reload). A second base family for a
    transformer class that already has one is refused unless both say which configs they ``claims``
    (Wan's text-to-video and image-to-video); otherwise make it a variant (:meth:`ModelFamily.variant`).
    """
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register_family takes a ModelFamily, got {type(family).__name__}")
    if family.variant_of is None:
        owners = [o for o in _BY_CLASS.get(family.transformer_class, []) if o != family.name]
        if owners and (family.claims is None or any(_FAMILIES[o].claims in (None, family.claims) for o in owners)):
            raise ValueError(f"{family.transformer_class} already belongs to family {owners[0]!r}; register "
                             f"{family.name!r} as a variant of it (family.variant(...)), use another class, or give "
                             "both families `claims` rules that tell their models apart by config")
        _BY_CLASS[family.transformer_class] = [*owners, family.name]
    else:
        base = _FAMILIES.get(family.variant_of)
        if base is None:
            base = family_named(family.variant_of)
        differ = [f for f in STAGE_FIELDS if getattr(base, f) != getattr(family, f)]
        if differ:
            raise ValueError(f"family {family.name!r} is a variant of {base.name!r} but differs in {differ}; "
                             "a variant may change only how components load")
    _FAMILIES[family.name] = family
    return family


def known_families() -> list[str]:
    """Every family name a recipe may use (imports no family module)."""
    return sorted(set(_FAMILIES) | set(FAMILY_MODULES))


def family_named(name: str) -> ModelFamily:
    """The family a recipe's ``family`` field names; a clear :class:`UserError` for an unknown one."""
    if name not in _FAMILIES and name in FAMILY_MODULES:
        import_module(FAMILY_MODULES[name])
    if name not in _FAMILIES:
        raise UserError(f"unknown model family {name!r}; known families: {known_families()}. A recipe's "
                        "\"family\" must name one of them (a new family is registered with register_family, "
                        "see docs/families.md)")
    return _FAMILIES[name]


def find_family(model) -> ModelFamily | None:
    """The base family of ``model``'s class (the one whose ``claims`` takes its config where the class has
    several), or None when no family claims it."""
    _load_builtins()
    names = _BY_CLASS.get(type(model).__name__, [])
    config = getattr(model, "config", None)
    found = [n for n in names if _FAMILIES[n].claims is None or _FAMILIES[n].claims(config)]
    if len(found) > 1:
        raise ValueError(f"families {found} all claim this {type(model).__name__}; their `claims` rules overlap")
    return _FAMILIES[found[0]] if found else None


def family_for_model(model) -> ModelFamily:
    """The (base) family of a transformer, by its class name (and config, where the class has several: ``claims``);
    a clear :class:`UserError` for a class or config no family takes."""
    family = find_family(model)
    if family is None:
        name = type(model).__name__
        if name in _BY_CLASS:
            raise UserError(f"no ERTACache model family takes this {name}: its config matches none of the families "
                            f"of the class ({_BY_CLASS[name]}); a checkpoint of another kind (e.g. another input "
                            "layout) needs its own family entry with a `claims` rule (docs/families.md)")
        raise UserError(f"no ERTACache model family for model class {name!r}; supported classes: "
                        f"{sorted(_BY_CLASS)}. Add one with register_family(ModelFamily(transformer_class={name!r}, "
                        "...)) next to its adapter (docs/families.md)")
    return family
