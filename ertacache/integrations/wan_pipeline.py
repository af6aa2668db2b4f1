"""The diffusers-native entry: ``enable_ertacache(pipe, profile)`` on a ``WanPipeline``.

Two pieces, both through public diffusers extension points:

* the transformer gets a stateful ``ModelHook`` (diffusers' hook registry, as
  its own FirstBlockCache and MagCache use) that, per cache context ("cond",
  "uncond") and ``step_index`` supplied by the pipeline, either computes the
  block stack and stores the residual, or predicts it from the last K stored
  residuals with the profile's predictor (K = 1: reuse) and applies the
  profile's correction; the model class and its forward are untouched;
* the scheduler becomes flow-matching Euler over the profile's adjusted sigma
  table, so the model sees the adjusted timesteps and the update integrates
  over the adjusted intervals.

The result equals :class:`ertacache.sampling.CachedSampler` with the same
profile (the pipeline runs the CFG branches as two calls instead of one batch,
so fp32 results agree to rounding).
"""

from __future__ import annotations

from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ertacache.errors import UserError
from ertacache.models.adapter import adapter_for
from ertacache.models.family import family_for_model
from ertacache.models.loading import fingerprint_module
from ertacache.profile.artifact import Profile
from ertacache.sampling.sampler import validate_mask
from ertacache.sampling.steps import cached_velocity, full_velocity, predict_residual, rectify

HOOK_NAME = "ertacache"
_BRANCH = {"cond": 0, "uncond": 1}


class ProfileSigmaScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler whose sigmas are a profile's table, for exactly its step count.

    Built with shift=1 so diffusers passes the given sigmas through unchanged.
    """

    profile_sigmas: list[float] | None = None

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        if self.profile_sigmas is None:
            raise RuntimeError("ProfileSigmaScheduler used before enable_ertacache() set its sigma table")
        steps = len(self.profile_sigmas) - 1
        if num_inference_steps not in (None, steps):
            raise UserError(f"this ERTACache profile is for {steps} steps; call the pipeline with "
                            f"num_inference_steps={steps} or make a profile for {num_inference_steps}")
        super().set_timesteps(sigmas=self.profile_sigmas[:-1], device=device)


class _BranchState(BaseState):
    """Per CFG branch: the residuals of the last K full steps, newest first."""

    def __init__(self):
        self.history: list = []

    def reset(self):
        self.history = []


class ERTACacheHook(ModelHook):
    """Replace the block stack by the cached residual on the profile's reused steps."""

    _is_stateful = True

    def __init__(self, profile: Profile):
        super().__init__()
        self.mask = validate_mask(profile.mask, profile.steps, profile.history)
        self.corr_a, self.corr_b = profile.corr_a, profile.corr_b
        tables = profile.tables()
        self.k, self.reuse = tables.history, tables.plain_reuse()
        self.pred_w, self.pred_b = tables.pred_w, tables.pred_b  # (T, K, Dw), (T, Db)
        self.state_manager = StateManager(_BranchState)

    def initialize_hook(self, module):
        self.adapter = adapter_for(module)
        return module

    def reset_state(self, module):
        self.state_manager.reset()
        return module

    def new_forward(self, module, hidden_states, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
        ctx = self.state_manager.context
        if ctx.step_index is None or ctx.name not in _BRANCH:
            raise RuntimeError("ERTACache needs the pipeline's cache_context('cond'|'uncond', step_index=i)")
        state, i, branch = self.state_manager.get_state(), ctx.step_index, _BRANCH[ctx.name]
        if self.mask[i]:
            v, residual = full_velocity(self.adapter, hidden_states, timestep, encoder_hidden_states)
            state.history = [residual, *state.history[: self.k - 1]]
        else:
            if len(state.history) < self.k:
                raise RuntimeError(f"step {i} predicts from {self.k} residual(s) but {len(state.history)} full "
                                  "step(s) ran before it")
            residual = state.history[0] if self.reuse else predict_residual(
                state.history, self.pred_w[i].to(hidden_states.device), self.pred_b[i].to(hidden_states.device))
            v = cached_velocity(self.adapter, hidden_states, timestep, residual)
            a = self.corr_a[i, branch : branch + 1].to(v.device)  # (1, C)
            b = self.corr_b[i, branch : branch + 1].to(v.device)
            v = rectify(v, a, b)
        v = v.to(hidden_states.dtype)
        return Transformer2DModelOutput(sample=v) if return_dict else (v,)


def enable_ertacache(pipe, profile: Profile, check_fingerprint: bool = True):
    """Turn on ERTACache for ``pipe`` (a diffusers WanPipeline) with ``profile``; returns ``pipe``.

    Call the pipeline with ``num_inference_steps=profile.steps`` and the
    profile's height/width/frames; guidance_scale > 1 must match the profile's CFG.
    """
    transformer = pipe.transformer
    family = family_for_model(transformer)  # refuses a transformer class no family knows
    if profile.guidance != family.guidance or len(profile.latent_shape) != family.latent_rank:
        raise UserError(f"the profile ({profile.model}: {profile.guidance} guidance, {len(profile.latent_shape)}-axis "
                        f"latents) was made for another model family than this pipeline's "
                        f"{type(transformer).__name__} ({family.name}: {family.guidance} guidance, "
                        f"{family.latent_rank}-axis latents); profile this model first")
    if check_fingerprint:
        have = fingerprint_module(transformer)
        if have != profile.model_fingerprint:
            raise UserError(f"the profile was made for model weights {profile.model_fingerprint} "
                            f"({profile.model}), this pipeline's transformer is {have}; profile this model first")
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME)
    registry.register_hook(ERTACacheHook(profile), HOOK_NAME)
    scheduler = ProfileSigmaScheduler(shift=1.0)
    scheduler.profile_sigmas = [float(s) for s in profile.sigmas]
    pipe._ertacache_original_scheduler = pipe.scheduler
    pipe.scheduler = scheduler
    return pipe


def disable_ertacache(pipe):
    """Remove the hook and restore the scheduler ``enable_ertacache`` replaced."""
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).remove_hook(HOOK_NAME)
    original = getattr(pipe, "_ertacache_original_scheduler", None)
    if original is not None:
        pipe.scheduler = original
        del pipe._ertacache_original_scheduler
    return pipe

