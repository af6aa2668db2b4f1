"""The compiler pass: (model, profile) -> static full-step, cached-step and decode graphs.

:class:`BakeStepGraphs` is a pass with a contract (STYLE.md #2). Given a model
adapter, a profile and the shapes of one request, ``BakeStepGraphs(...)(adapter,
profile)`` returns :class:`StepGraphs`:

1. The profile's step tables (the adjusted sigma table (T+1,), the
   correction tables a, b (T, nb, C) and the predictor's weights (T, K, Dw)
   and bias (T, Db)) become buffers of
   :class:`~ertacache.sampling.steps.StepTables`, i.e. constants of the graphs.
   The reuse mask is *not* baked: it is data for the runtime's loop and goes
   to the manifest.
2. :class:`~ertacache.sampling.steps.FullStep` and
   :class:`~ertacache.sampling.steps.CachedStep` (the same modules the eager
   sampler runs) are exported with ``torch.export.export`` at static shapes.
   Tensors crossing the split, with their exact names (the runtime, the Triton
   repository and outside tools bind by them):

       full_step(latents, step, text_embeds, guidance_scale) -> latents_out, residual_out
       cached_step(latents, step, text_embeds, guidance_scale, residual[, residual_1, ...]) -> latents_out

       latents      (B, C, F', H', W')  float32   the state of the Euler loop
       step         ()                  int64     indexes the baked tables
       text_embeds  (nb*B, L, D_text)   model dtype  cond rows, then uncond rows (CFG)
       guidance_scale ()                float32
       residual     (nb*B, N, D)        model dtype  block-stack residual per CFG branch
                                                  (``residual_out`` of the last full step)
       residual_k   (nb*B, N, D)        model dtype  ``residual_out`` of the full step k full
                                                  steps before the last (k = 1 .. K-1)

   A family with several conditioning tensors (FLUX: ``prompt_embeds`` (B, L, D_t5),
   ``pooled_prompt_embeds`` (B, D_clip)) has one input per tensor in place of ``text_embeds``, in
   the family's order (:func:`ertacache.contract.step_inputs`); ``text_shape`` then maps each name
   to its shape without the batch axis. With an embedded guidance scale (FLUX.1-dev),
   ``guidance_scale`` feeds the model's guidance embedder instead of a CFG mix.

   K is the profile's predictor history (``Profile.history``; names from
   :func:`ertacache.contract.residual_slots`). K = 1 with the reuse predictor
   gives exactly the schema-1 cached step (one ``residual`` input, no
   prediction arithmetic in the graph).

   ``cached_step`` keeps its (unused) ``text_embeds`` input so both graphs bind
   the same feeds; exporters keep it (TensorRT's parser may drop it).
   A two-expert model (Wan2.2 A14B: ``profile.experts``) gets one pair per expert, baked from the
   same tables (they are indexed by the global step): expert 0's ``full_step`` / ``cached_step``
   and expert 1's ``full_step_2`` / ``cached_step_2`` (:func:`ertacache.contract.expert_graph`),
   with identical I/O, so the runtime binds one set of buffers to both and picks the pair by step.
3. With a decoder, a third graph ``vae_decode(latents) -> frames`` (uint8,
   (B, F, H, W, 3)) is exported the same way.
4. While exporting, the export-time rewrites the model's family declares are
   applied and undone afterwards (:func:`~ertacache.export.attention.family_rewrites`):
   for the Wan family, diffusers' attention processor is swapped for
   :class:`~ertacache.export.attention.StackRopeWanAttnProcessor` (identical
   numbers, no ScatterND in ONNX). Other families get only their own rewrites.

Preconditions, checked up front: the adapter's model is in eval mode and
already in ``dtype`` (load it so); the profile's latent shape is one sample's
latent in the family's layout ((C, F', H', W') for video, (C, H', W') for images)
with C the model's input channels; ``batch_size`` >= 1.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ertacache.contract import (CACHED_INPUTS, CACHED_OUTPUTS, CACHED_STEP, DECODE_INPUTS, DECODE_OUTPUTS,
                                 DTYPE_NAMES, FULL_OUTPUTS, FULL_STEP, STEP_GRAPHS, STEP_INPUTS, VAE_DECODE, GraphSpec,
                                 TensorSpec, cached_inputs, expert_graph, step_inputs)
from ertacache.errors import UserError
from ertacache.export.attention import WAN_STACK_ROPE, family_rewrites
from ertacache.export.errors import GraphExportError, failing_op
from ertacache.models.adapter import ModelAdapter, adapter_list
from ertacache.models.components import LatentDecoder
from ertacache.models.experts import Experts
from ertacache.profile.artifact import Profile
from ertacache.sampling.sampler import check_empty_slots, validate_mask
from ertacache.sampling.steps import CachedStep, DecodeGraph, FullStep, StepTables


@dataclass
class StepGraphs:
    """What the pass returns: per graph, the eager module, its export, example inputs and contract."""

    modules: dict[str, nn.Module]
    programs: dict[str, torch.export.ExportedProgram]
    example_inputs: dict[str, tuple[torch.Tensor, ...]]
    specs: dict[str, GraphSpec]
    tables: StepTables
    mask: list[bool]
    dtype: torch.dtype
    batch_size: int
    attention_swapped: bool = False  # the Wan rope rewrite was applied (recorded in the manifest)
    rewrites: tuple[str, ...] = ()  # every export-time rewrite of the model's family that was applied
    conditioning: tuple[str, ...] = ("text_embeds",)  # the family's conditioning inputs (graph-input names)
    export_s: dict[str, float] = field(default_factory=dict)
    #: a two-expert model's step -> expert table (None: one transformer, one graph pair)
    experts: Experts | None = None

    @property
    def names(self) -> list[str]:
        return list(self.programs)

    @property
    def adapters(self) -> list[ModelAdapter]:
        """One adapter per expert (the eager modules' own), for the reference sampler."""
        count = 1 if self.experts is None else self.experts.count
        return [self.modules[expert_graph(FULL_STEP, e)].adapter for e in range(count)]

    @property
    def history(self) -> int:
        """K: the residual slots of the cached step."""
        return self.tables.history


def example_step_inputs(
    latent_shape, batch_size: int, n_branches: int, text_shape, dtype: torch.dtype, seed: int = 0,
    device: torch.device | str = "cpu", conditioning=None,
) -> tuple[torch.Tensor, ...]:
    """Deterministic example feeds (latents, step, *conditioning, guidance_scale) at the export shapes.

    ``text_shape``: one prompt's (L, D_text) for a one-input family (Wan: ``text_embeds`` with rows
    per CFG branch); for a family with several conditioning inputs, a mapping from each input's name
    to its shape without the batch axis, and ``conditioning`` the family's
    :class:`~ertacache.models.family.ConditioningInput` list (their order and row rules).
    """
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn((batch_size, *latent_shape), generator=gen)  # (B, C, F', H', W') float32
    if conditioning is None or not isinstance(text_shape, dict):
        conds = [torch.randn((n_branches * batch_size, *text_shape), generator=gen).to(dtype)]  # (nb*B, L, D_text)
    else:
        missing = [c.name for c in conditioning if c.name not in text_shape]
        if missing:
            raise UserError(f"no export shape for the conditioning input(s) {missing}; give one per input "
                            f"({[c.name for c in conditioning]})")
        conds = []
        for c in conditioning:
            rows = c.expected_rows(batch_size, n_branches)  # None: no batch axis (shared)
            shape = tuple(text_shape[c.name]) if rows is None else (rows, *text_shape[c.name])
            conds.append(torch.randn(shape, generator=gen).to(dtype))
    step, g = torch.tensor(1, dtype=torch.int64), torch.tensor(4.0, dtype=torch.float32)
    return tuple(t.to(device) for t in (latents, step, *conds, g))


class BakeStepGraphs:
    """The pass. Settings in the constructor, work in the call (see the module docstring)."""

    def __init__(self, batch_size: int, dtype: torch.dtype, text_shape,
                 decoder: LatentDecoder | None = None, swap_attention: bool = True, strict: bool = False):
        # swap_attention: apply the export-time rewrites of the model's family (Wan: the rope rewrite); False
        # exports the model as it is
        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.dtype = dtype
        # one prompt's (L, D_text) embeddings; or, for a family with several conditioning inputs, a
        # mapping from each input's name to its shape without the batch axis
        self.text_shape = ({k: tuple(int(s) for s in v) for k, v in text_shape.items()}
                           if isinstance(text_shape, dict) else tuple(int(s) for s in text_shape))
        self.decoder = decoder
        self.swap_attention = swap_attention
        self.strict = strict

    def _check(self, adapters: list[ModelAdapter], profile: Profile) -> None:
        experts = len(profile.expert_starts)
        if len(adapters) != experts:
            raise UserError(f"the profile has {experts} expert(s) but {len(adapters)} transformer(s) were given; "
                            "load the model the profile was made for")
        adapter = adapters[0]
        if any(a.model.training for a in adapters):
            raise ValueError("export needs the model in eval mode (call .eval())")
        if len(profile.latent_shape) != adapter.family.latent_rank or profile.latent_shape[0] != adapter.in_channels:
            raise UserError(f"the profile's latent shape {profile.latent_shape} does not fit a model with "
                            f"{adapter.in_channels} input channels; re-profile this model")
        if profile.corr_a.shape[-1] != adapter.in_channels:
            raise UserError(f"the profile's correction tables have {profile.corr_a.shape[-1]} channels, the model "
                            f"{adapter.in_channels}; re-profile this model")
        if profile.predictor.get("history") != profile.history:
            raise UserError(f"the profile's predictor {profile.predictor} says history "
                            f"{profile.predictor.get('history')} but its weight table pred_w reads {profile.history} "
                            "residuals; re-profile (the profile is inconsistent)")
        own = adapter.own_sigmas(profile.steps)  # a table the checkpoint fixes (CogVideoX's scheduler), else None
        if own is not None and not np.allclose(own, profile.nominal_sigmas, rtol=0, atol=1e-9):
            raise UserError(f"the profile's nominal sigma table is not this model's ({adapter.family.name}: the "
                            "checkpoint's scheduler config decides it); re-profile this model")
        # each expert opens with a full step, and no cached step reads a slot that holds no residual yet
        validate_mask(profile.mask, profile.steps, profile.expert_starts)
        check_empty_slots(profile.pred_w, profile.mask, profile.expert_starts)

    def __call__(self, adapter: ModelAdapter | list[ModelAdapter], profile: Profile) -> StepGraphs:
        """``adapter``: the model's adapter, or one per expert for a two-expert profile (its order)."""
        adapters = adapter_list(adapter)
        self._check(adapters, profile)
        adapter = adapters[0]
        conditioning = adapter.family.input_names  # the graph-input names of the family's conditioning tensors
        if len(conditioning) > 1 and not isinstance(self.text_shape, dict):
            raise UserError(f"the {adapter.family.name} family has the conditioning inputs {list(conditioning)}; "
                            "give the export one shape per input (a mapping name -> shape without the batch axis)")
        tables = profile.tables()  # sigmas (T+1,), corr_a/b (T, nb, C), pred_w (T, K, Dw), pred_b (T, Db): buffers
        nb = tables.n_branches
        modules: dict[str, nn.Module] = {}
        for e, a in enumerate(adapters):  # one pair per expert over the same tables (indexed by the global step)
            modules[expert_graph(FULL_STEP, e)] = FullStep(a, tables).eval()
            modules[expert_graph(CACHED_STEP, e)] = CachedStep(a, tables).eval()
        device = next(adapter.model.parameters()).device
        tables.to(device)
        step_in = example_step_inputs(profile.latent_shape, self.batch_size, nb, self.text_shape, self.dtype,
                                      device=device, conditioning=adapter.family.conditioning)
        with torch.no_grad():
            latents_out, residual = modules[FULL_STEP](*step_in)  # residual (nb*B, N, D)
        for key, table in (("pred_w", tables.pred_w), ("pred_b", tables.pred_b)):
            if table.shape[-1] not in (1, residual.shape[-1]):
                raise UserError(f"the profile's predictor table {key} has {table.shape[-1]} channels, the model's "
                                f"residual {residual.shape[-1]} (or 1: shared); re-profile this model")
        # K residual slots, newest first: the full step's residual and scaled copies (distinct values, so no
        # exporter can mistake one slot for another; only shapes and dtypes are baked)
        slots = tuple(residual * (1.0 - 0.25 * k) for k in range(tables.history))
        full_spec = (tuple(map(TensorSpec.of, step_inputs(conditioning), step_in)),
                     tuple(map(TensorSpec.of, FULL_OUTPUTS, (latents_out, residual))))
        cached_spec = (tuple(map(TensorSpec.of, cached_inputs(tables.history, conditioning), (*step_in, *slots))),
                       (TensorSpec.of("latents_out", latents_out),))
        examples, specs = {}, {}
        for e in range(len(adapters)):  # every expert's pair has the same I/O (same class and shapes)
            full, cached = expert_graph(FULL_STEP, e), expert_graph(CACHED_STEP, e)
            examples[full], examples[cached] = step_in, (*step_in, *slots)
            specs[full], specs[cached] = GraphSpec(full, *full_spec), GraphSpec(cached, *cached_spec)
        if self.decoder is not None:
            modules[VAE_DECODE] = DecodeGraph(self.decoder).eval()
            examples[VAE_DECODE] = (step_in[0],)
            with torch.no_grad():
                frames = modules[VAE_DECODE](step_in[0])
            specs[VAE_DECODE] = GraphSpec(VAE_DECODE, (TensorSpec.of("latents", step_in[0]),),
                                          (TensorSpec.of("frames", frames),))

        programs, times = {}, {}
        with contextlib.ExitStack() as stack, torch.no_grad():
            applied = ()
            for a in adapters:  # each expert's model gets its family's rewrites (the same ones)
                applied = stack.enter_context(family_rewrites(a.model)) if self.swap_attention else ()
            for name, module in modules.items():
                start = time.perf_counter()
                try:
                    programs[name] = torch.export.export(module, examples[name], strict=self.strict)
                except Exception as e:  # any exporter failure: name the graph and the op
                    raise GraphExportError(name, "torch.export", e) from e
                times[name] = time.perf_counter() - start
        return StepGraphs(modules, programs, examples, specs, tables, list(profile.mask), self.dtype,
                          self.batch_size, attention_swapped=WAN_STACK_ROPE in applied, rewrites=tuple(applied),
                          conditioning=tuple(conditioning), export_s=times, experts=profile.experts)


#: the contract's names and specs live in ertacache.contract; re-exported here for the pass's callers
__all__ = ["BakeStepGraphs", "StepGraphs", "GraphSpec", "TensorSpec", "DecodeGraph", "example_step_inputs",
           "FULL_STEP", "CACHED_STEP", "VAE_DECODE", "STEP_GRAPHS", "STEP_INPUTS", "FULL_OUTPUTS", "CACHED_INPUTS",
           "cached_inputs", "CACHED_OUTPUTS", "DECODE_INPUTS", "DECODE_OUTPUTS", "DTYPE_NAMES", "failing_op"]
