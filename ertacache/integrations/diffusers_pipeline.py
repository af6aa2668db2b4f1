"""The diffusers-native entry: ``enable_ertacache(pipe, profile)`` on a diffusers pipeline (Wan, Wan I2V, FLUX,
HunyuanVideo, CogVideoX).

Two pieces, both through public diffusers extension points:

* the transformer gets a stateful ``ModelHook`` (diffusers' hook registry, as
  its own FirstBlockCache and MagCache use) that, per cache context ("cond",
  "uncond") and step, either computes the block stack and stores the residual,
  or predicts it from the last K stored residuals with the profile's predictor
  (K = 1: reuse) and applies the profile's correction; the model class and its
  forward are untouched. The family's adapter translates the pipeline's call
  (``ModelAdapter.transformer_call``: FluxPipeline passes packed tokens and rope
  ids, WanPipeline the latents as they are), so the hook itself knows no family;
* the scheduler becomes flow-matching Euler over the profile's adjusted sigma
  table, so the model sees the adjusted timesteps and the update integrates
  over the adjusted intervals.

A pipeline that batches both CFG branches in one call (CogVideoXPipeline: ``cache_context("cond_uncond")``,
diffusers' uncond-first row order) is run as the sampler runs a batched step.

The step comes from the cache context when the pipeline supplies it (WanPipeline's
``step_index``) and otherwise from the timestep, looked up in the profile's table
(FluxPipeline's context carries only the name): the table is strictly decreasing, so the
nearest entry is the step, and a timestep between entries is refused.

The result equals :class:`ertacache.sampling.CachedSampler` with the same
profile (WanPipeline runs the CFG branches as two calls instead of one batch,
so fp32 results agree to rounding).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ertacache.errors import UserError
from ertacache.models.adapter import adapter_for
from ertacache.models.family import family_for_model
from ertacache.models.loading import fingerprint_modules
from ertacache.profile.artifact import Profile
from ertacache.sampling.sampler import check_empty_slots, validate_mask
from ertacache.sampling.steps import cached_velocity, full_velocity, predict_residual, rectify, timestep_scale

HOOK_NAME = "ertacache"
_BRANCH = {"cond": 0, "uncond": 1}
#: the context of a pipeline that batches both CFG branches in one call, uncond rows first (CogVideoXPipeline)
BATCHED = "cond_uncond"


class ProfileSigmaScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler whose sigmas are a profile's table, for exactly its step count.

    Built with shift=1 so diffusers passes the given sigmas through unchanged.
    """

    profile_sigmas: list[float] | None = None
    #: what pipelines written for DDPM-style schedulers read (CogVideoXPipeline): the noise is used as it is
    init_noise_sigma = 1.0

    def scale_model_input(self, sample, timestep=None):
        """Flow matching feeds the latents unscaled (a DDPM-style pipeline calls this every step)."""
        return sample

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        # sigmas / mu: what FluxPipeline passes (its ramp and its resolution shift); the profile's table
        # already holds the family's shift, so only their count is read
        if self.profile_sigmas is None:
            raise RuntimeError("ProfileSigmaScheduler used before enable_ertacache() set its sigma table")
        steps = len(self.profile_sigmas) - 1
        asked = len(sigmas) if sigmas is not None else len(timesteps) if timesteps is not None else num_inference_steps
        if asked not in (None, steps):
            raise UserError(f"this ERTACache profile is for {steps} steps; call the pipeline with "
                            f"num_inference_steps={steps} or make a profile for {asked}")
        super().set_timesteps(sigmas=self.profile_sigmas[:-1], device=device)


class _BranchState(BaseState):
    """Per CFG branch: the residuals of the last K full steps, newest first."""

    def __init__(self):
        self.history: list = []

    def reset(self):
        self.history = []


class ERTACacheHook(ModelHook):
    """Replace the block stack by the predicted residual on the profile's cached steps."""

    _is_stateful = True

    def __init__(self, profile: Profile, expert: int = 0):
        super().__init__()
        self.mask = validate_mask(profile.mask, profile.steps, profile.expert_starts)
        check_empty_slots(profile.pred_w, self.mask, profile.expert_starts)
        # a two-expert model: this hook sits on expert ``expert``'s transformer and keeps its own history, so
        # nothing crosses the switch; the expert of each step is the profile's (by step), checked per call
        self.expert, self.experts = expert, profile.experts
        self.corr_a, self.corr_b = profile.corr_a, profile.corr_b
        tables = profile.tables()
        self.k, self.reuse = tables.history, tables.plain_reuse()
        self.pred_w, self.pred_b = tables.pred_w, tables.pred_b  # (T, K, Dw), (T, Db)
        self.n_branches = profile.n_branches
        self.guidance, self.guidance_scale = profile.guidance, float(profile.guidance_scale)
        self.table = [float(s) for s in profile.sigmas[:-1]]  # (T,) each step's sigma, the adjusted table
        self.state_manager = StateManager(_BranchState)
        self._last_step: dict[int, int] = {}  # branch -> the step of its last call (a skipped branch is refused)

    def initialize_hook(self, module):
        self.adapter = adapter_for(module)
        self.scale = timestep_scale(self.adapter)  # the model's timestep = sigma x this
        return module

    def reset_state(self, module):
        self.state_manager.reset()
        self._last_step = {}
        return module

    def _step(self, ctx, timestep) -> int:
        """The step: the context's ``step_index``, else the profile-table entry the timestep is."""
        if ctx.step_index is not None:
            return int(ctx.step_index)
        t = float(timestep.reshape(-1)[0]) / self.scale  # one host read per call: the hook runs eagerly
        table = self.table
        i = min(range(len(table)), key=lambda j: abs(table[j] - t))
        gaps = [abs(table[j] - table[i]) for j in (i - 1, i + 1) if 0 <= j < len(table)]
        if gaps and abs(table[i] - t) > 0.25 * min(gaps):
            raise UserError(f"the pipeline's timestep {t:.6g} (as sigma) is not on this profile's sigma table; "
                            "enable_ertacache replaces the scheduler, so leave pipe.scheduler as it set it")
        return i

    def new_forward(self, module, *args, return_dict=True, **kwargs):
        ctx = self.state_manager.context
        if ctx.name == BATCHED:
            return self._batched_forward(ctx, args, kwargs, return_dict)
        if ctx.name not in _BRANCH:
            raise RuntimeError("ERTACache needs the pipeline's cache_context('cond'|'uncond'|'cond_uncond')")
        branch = _BRANCH[ctx.name]
        if branch >= self.n_branches:
            raise UserError(f"this profile was made with {self.n_branches} branch(es) ({self.guidance} guidance) but "
                            f"the pipeline makes a {ctx.name!r} call; run it without true CFG (no negative prompt, "
                            "true_cfg_scale 1) or profile with CFG")
        call = self.adapter.transformer_call(*args, **kwargs)
        guidance = call.cached_cond.get("guidance") if isinstance(call.cached_cond, dict) else None
        embedded = None if guidance is None else float(guidance.reshape(-1)[0])
        if embedded is not None and abs(embedded - self.guidance_scale) > 1e-6:
            raise UserError(f"this profile was calibrated at guidance scale {self.guidance_scale:g}, the pipeline "
                            f"embeds {embedded:g}; call it with guidance_scale={self.guidance_scale:g} or profile "
                            "at that scale")
        state, i = self.state_manager.get_state(), self._step(ctx, call.timestep)
        first = self._check_expert(i)
        if self.n_branches == 2 and branch == 0 and i > first and self._last_step.get(1) != i - 1:
            raise UserError(f"this profile was made with 2 branches ({self.guidance} guidance) but the pipeline made "
                            f"no 'uncond' call at step {i - 1}; call it with guidance (a negative prompt, and for "
                            f"FluxPipeline true_cfg_scale={self.guidance_scale:g}) or profile without CFG")
        self._last_step[branch] = i
        v = self._velocity(state, i, call, slice(branch, branch + 1))
        out = call.to_output(v.to(call.latents.dtype))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _batched_forward(self, ctx, args, kwargs, return_dict):
        """One call with every CFG branch (diffusers' ``cat([uncond, cond])`` row order): reordered to the
        profile's (cond rows, then uncond), run as the sampler runs a batched step, and put back."""
        call = self.adapter.transformer_call(*args, **kwargs)
        state, i = self.state_manager.get_state(), self._step(ctx, call.timestep)
        self._check_expert(i)
        rows = call.latents.shape[0]
        if self.n_branches == 2 and rows % 2:
            raise UserError(f"this profile was made with CFG (2 branches) but the pipeline's batched call has {rows} "
                            "rows; call it with the profile's guidance scale")
        if isinstance(call.cond, Mapping) or call.cached_cond is not None:
            raise UserError(f"{type(self.adapter).__name__}: a batched-CFG call ('{BATCHED}') is supported for a "
                            "family with one conditioning tensor read by full steps only")
        flip = (lambda t: t.roll(rows // 2, dims=0)) if self.n_branches == 2 else (lambda t: t)  # swap the halves
        call = replace(call, latents=flip(call.latents), cond=flip(call.cond))  # (rows, ...) cond rows first
        v = self._velocity(state, i, call, slice(0, self.n_branches))
        out = call.to_output(flip(v).to(call.latents.dtype))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _check_expert(self, i: int) -> int:
        """Refuse a step the profile gives to the other expert; the first step of step ``i``'s expert."""
        if self.experts is None:
            return 0
        if self.experts.expert(i) != self.expert:
            raise UserError(f"the pipeline ran transformer{'' if self.expert == 0 else '_2'} at step {i}, which "
                            f"the profile gives to the other expert; leave the pipeline's boundary_ratio "
                            f"({self.experts.boundary_ratio:g}) and scheduler as enable_ertacache set them")
        return self.experts.segment_start(i)

    def _velocity(self, state, i: int, call, branches: slice):
        """Step ``i``'s velocity for the call's rows (the CFG branches ``branches``, branch-major): computed and its
        residual stored on a full step, predicted and rectified on a cached one."""
        x = call.latents
        if self.mask[i]:
            v, residual = full_velocity(self.adapter, x, call.timestep, call.cond)
            state.history = [residual, *state.history[: self.k - 1]]
            return v
        if not state.history:
            raise RuntimeError(f"step {i} is cached but no full step of this transformer ran before it")
        # before K full steps only the filled slots are read: their weights are the lower-order ones and the
        # rest are 0 (checked when the hook was made)
        residual = state.history[0] if self.reuse else predict_residual(
            state.history, self.pred_w[i].to(x.device), self.pred_b[i].to(x.device))
        v = cached_velocity(self.adapter, x, call.timestep, residual, call.cached_cond)
        a = self.corr_a[i, branches].to(v.device)  # (branches, C)
        b = self.corr_b[i, branches].to(v.device)
        return rectify(v, a, b)


def enable_ertacache(pipe, profile: Profile, check_fingerprint: bool = True):
    """Turn on ERTACache for ``pipe`` (a diffusers WanPipeline, WanImageToVideoPipeline, FluxPipeline,
    HunyuanVideoPipeline or CogVideoXPipeline: any whose transformer's family adapter translates its call) with
    ``profile``; returns ``pipe``.

    Call the pipeline with ``num_inference_steps=profile.steps`` and the profile's height/width
    (/frames); the guidance scale must be the profile's (an embedded one is checked on every call).
    A two-expert WanPipeline (Wan2.2 A14B: ``transformer_2`` and ``boundary_ratio``) gets a hook on each
    transformer; call it with the profile's ``guidance_scale`` and ``guidance_scale_2``
    (``profile.experts.guidance_scales``: the pipeline combines CFG itself, so the hooks cannot check them).
    """
    transformer, transformer_2 = pipe.transformer, getattr(pipe, "transformer_2", None)
    if (transformer_2 is not None) != (profile.experts is not None):
        have = "two transformers (a two-expert model such as Wan2.2 A14B)" if transformer_2 is not None else "one"
        raise UserError(f"this pipeline has {have}, the profile ({profile.model}) was made for "
                        f"{'two experts' if profile.experts is not None else 'one transformer'}; profile this model")
    if transformer_2 is not None:
        ratio = getattr(pipe.config, "boundary_ratio", None)
        if ratio is None or abs(float(ratio) - profile.experts.boundary_ratio) > 1e-9:
            raise UserError(f"the pipeline switches experts at boundary_ratio {ratio}, the profile at "
                            f"{profile.experts.boundary_ratio:g}; load the pipeline the profile was made for")
    family = family_for_model(transformer)  # refuses a transformer class no family knows
    if not family.accepts_guidance(profile.guidance) or len(profile.latent_shape) != family.latent_rank:
        raise UserError(f"the profile ({profile.model}: {profile.guidance} guidance, {len(profile.latent_shape)}-axis "
                        f"latents) was made for another model family than this pipeline's "
                        f"{type(transformer).__name__} ({family.name}: {family.guidance} guidance, "
                        f"{family.latent_rank}-axis latents); profile this model first")
    if check_fingerprint:
        have = fingerprint_modules([transformer, transformer_2])
        if have != profile.model_fingerprint:
            raise UserError(f"the profile was made for model weights {profile.model_fingerprint} "
                            f"({profile.model}), this pipeline's transformer is {have}; profile this model first")
    adapter_for(transformer).bind_pipeline(pipe)  # e.g. CogVideoX's noise schedule, from the pipeline's scheduler
    for expert, module in enumerate(t for t in (transformer, transformer_2) if t is not None):
        registry = HookRegistry.check_if_exists_or_initialize(module)
        if registry.get_hook(HOOK_NAME) is not None:
            registry.remove_hook(HOOK_NAME)
        registry.register_hook(ERTACacheHook(profile, expert), HOOK_NAME)
    scheduler = ProfileSigmaScheduler(shift=1.0)
    scheduler.profile_sigmas = [float(s) for s in profile.sigmas]
    pipe._ertacache_original_scheduler = pipe.scheduler
    pipe.scheduler = scheduler
    return pipe


def disable_ertacache(pipe):
    """Remove the hook and restore the scheduler ``enable_ertacache`` replaced."""
    for module in (pipe.transformer, getattr(pipe, "transformer_2", None)):
        if module is not None:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(HOOK_NAME)
    original = getattr(pipe, "_ertacache_original_scheduler", None)
    if original is not None:
        pipe.scheduler = original
        del pipe._ertacache_original_scheduler
    return pipe

