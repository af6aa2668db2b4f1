"""The full step and the cached step: the two pure functions caching alternates between.

Everything a profile decides is a table indexed by the step number (DESIGN.md,
"the two step graphs"): the (adjusted) sigma table and the per-step, per-branch,
per-channel correction coefficients. So one module serves every step, the eager
sampler and the exported graphs share this code, and the loop carries no
decision logic beyond the reuse mask, which is data known before the loop.

Tensors crossing a step boundary:

    full_step(latents, step, text_embeds, guidance_scale) -> latents_out, residual_out
    cached_step(latents, step, text_embeds, guidance_scale, residual[, residual_1, ...]) -> latents_out

``text_embeds`` is (nb*B, L, D) with the cond rows first and, with CFG (nb = 2),
the uncond rows after them; ``residual`` is (nb*B, N, D): one residual per CFG
branch and sample, in the same row order.
For a family with several conditioning inputs or an embedded guidance scale (FLUX.1),
``text_embeds`` is a mapping from the family's input names to tensors (each with the rows its
:class:`~ertacache.models.family.ConditioningInput` says); the eager sampler takes it, the
exported graphs do not yet (one conditioning tensor per graph, docs/families.md).

The cached step predicts the block-stack residual from the K most recent
full-step residuals (``residual`` the newest, ``residual_k`` the one k full
steps before it) with the step's baked weights: K = 1 with weight 1 is the
paper's reuse, Lagrange weights are a Taylor-style extrapolation
(:mod:`ertacache.profile.predictor` fits or derives them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence, Union

import numpy as np
import torch
from torch import nn

from ertacache.models.adapter import ModelAdapter
from ertacache.models.family import EMBEDDED, ROWS_PER_BRANCH, ROWS_PER_SAMPLE

#: a step's conditioning: one tensor (Wan: the text states, (nb*B, L, D)) or, for a family with several
#: conditioning inputs or an embedded guidance scale (FLUX), a mapping from the family's input names
Conditioning = Union[torch.Tensor, Mapping[str, torch.Tensor]]

#: flow-matching timesteps are sigma scaled to the training range (diffusers' convention); the default
#: of :func:`model_timestep`. The step modules use their model family's ``timestep_scale`` instead.
NUM_TRAIN_TIMESTEPS = 1000


class StepTables(nn.Module):
    """The per-step constants a profile bakes into the step modules.

    sigmas: (T+1,) the sigma table the model sees and the Euler update uses.
    corr_a, corr_b: (T, nb, C) per reused step, CFG branch and latent channel,
        the least-squares fit eps ~ a * v_tilde + b of the cached-output error;
        zeros (identity correction) on full steps and when rectification is off.
    pred_w: (T, K, Dw) per step, the weight of each of the K most recent full-step residuals
        (slot 0 the newest) in the predicted residual, per residual channel (Dw = D) or shared
        (Dw = 1). Default (T, 1, 1) ones: reuse the last residual.
    pred_b: (T, Db) a bias added to the predicted residual (Db = D or 1); default zeros.
    """

    def __init__(self, sigmas, corr_a=None, corr_b=None, n_branches: int = 2, channels: int | None = None,
                 pred_w=None, pred_b=None):
        super().__init__()
        sigmas = torch.as_tensor(np.asarray(sigmas, dtype=np.float64), dtype=torch.float32)
        steps = sigmas.shape[0] - 1
        if corr_a is None:
            if channels is None:
                raise ValueError("channels is required when no correction tables are given")
            corr_a = torch.zeros(steps, n_branches, channels)
            corr_b = torch.zeros(steps, n_branches, channels)
        corr_a = torch.as_tensor(corr_a, dtype=torch.float32)
        corr_b = torch.as_tensor(corr_b, dtype=torch.float32)
        if corr_a.shape != corr_b.shape or corr_a.ndim != 3 or corr_a.shape[0] != steps:
            raise ValueError(
                f"correction tables must both be (steps={steps}, branches, channels), "
                f"got {tuple(corr_a.shape)} and {tuple(corr_b.shape)}"
            )
        pred_w = torch.ones(steps, 1, 1) if pred_w is None else torch.as_tensor(pred_w, dtype=torch.float32)
        pred_b = torch.zeros(steps, 1) if pred_b is None else torch.as_tensor(pred_b, dtype=torch.float32)
        if pred_w.ndim != 3 or pred_w.shape[0] != steps or pred_w.shape[1] < 1:
            raise ValueError(f"pred_w must be (steps={steps}, K >= 1, channels or 1), got {tuple(pred_w.shape)}")
        if pred_b.ndim != 2 or pred_b.shape[0] != steps:
            raise ValueError(f"pred_b must be (steps={steps}, channels or 1), got {tuple(pred_b.shape)}")
        self.register_buffer("sigmas", sigmas)
        self.register_buffer("corr_a", corr_a)
        self.register_buffer("corr_b", corr_b)
        self.register_buffer("pred_w", pred_w)
        self.register_buffer("pred_b", pred_b)

    @property
    def steps(self) -> int:
        return self.sigmas.shape[0] - 1

    @property
    def n_branches(self) -> int:
        return self.corr_a.shape[1]

    @property
    def history(self) -> int:
        """K: how many full-step residuals the cached step reads."""
        return self.pred_w.shape[1]

    def plain_reuse(self) -> bool:
        """True when the predictor is the paper's reuse (K = 1, weight 1, no bias): no arithmetic needed."""
        return self.history == 1 and bool((self.pred_w == 1).all()) and not bool(self.pred_b.any())


def at_step(table: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``table[step]`` for a 0-d int64 tensor ``step`` without a host sync.

    Plain ``table[step]`` converts the index to a Python int (``.item()``),
    which would stall the GPU every step; ``index_select`` stays on device
    and exports as a Gather.
    """
    return table.index_select(0, step.reshape(1)).squeeze(0)


def model_timestep(sigma: torch.Tensor, rows: int, scale: float = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Sigma (0-d) -> the float timestep vector (rows,) the transformer embeds: sigma * the family's scale."""
    return (sigma * scale).reshape(1).expand(rows)


def timestep_scale(adapter: ModelAdapter) -> float:
    """The model family's timestep scale (Wan: 1000, the scheduler's training range)."""
    scale = float(adapter.family.timestep_scale)
    return int(scale) if scale.is_integer() else scale  # an int constant, as before, in exported graphs


def expand_branches(latents: torch.Tensor, n_branches: int) -> torch.Tensor:
    """(B, C, *S) -> (nb*B, C, *S): the same latents for every CFG branch (S: (F, H, W) or (H, W))."""
    return latents.repeat(n_branches, *([1] * (latents.ndim - 1)))


def combine_cfg(v: torch.Tensor, guidance_scale: torch.Tensor, n_branches: int) -> torch.Tensor:
    """(nb*B, ...) branch velocities -> (B, ...) guided velocity: uncond + g * (cond - uncond)."""
    if n_branches == 1:
        return v
    cond, uncond = v.chunk(2, dim=0)  # (B, ...) each
    return uncond + guidance_scale * (cond - uncond)


def rectify(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """v^ = v~ - (a * v~ + b), per branch and channel. v: (nb*B, C, *S) (S: (F, H, W) or (H, W)); a, b: (nb, C)."""
    nb, c = a.shape
    v_nb = v.unflatten(0, (nb, -1))  # (nb, B, C, *S)
    ones = [1] * (v.ndim - 2)  # broadcast over the spatial (and time) axes
    a = a.reshape(nb, 1, c, *ones)
    b = b.reshape(nb, 1, c, *ones)
    return (v_nb - (a * v_nb + b)).flatten(0, 1)  # (nb*B, C, *S)


def euler(latents: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One flow-matching Euler step: x_next = x + (sigma_next - sigma) * v."""
    return latents + (sigma_next - sigma) * v


def full_velocity(adapter: ModelAdapter, x_in, timestep, text) -> tuple[torch.Tensor, torch.Tensor]:
    """Branch velocities (float32) and the block-stack residual, both for rows of ``x_in``."""
    pre = adapter.pre(x_in, timestep, text)
    hidden = adapter.blocks(pre)
    residual = hidden - pre.hidden  # (rows, N, D)
    return adapter.head(hidden, pre).float(), residual


def predict_residual(history: Sequence[torch.Tensor], w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """sum_k w[k] * history[k] + b, computed in float32, returned in the residuals' dtype.

    history: K tensors (rows, N, D), the newest first; w: (K, Dw); b: (Db,), with Dw, Db in {1, D},
    or None for no bias (the Taylor weights have none, and skipping it saves a pass over the tokens).
    float32 because extrapolation weights (e.g. 1.875, -1.25, 0.375) cancel large terms, which bf16
    would round badly; with K = 1, w = 1, b = 0 the result equals ``history[0]`` bit for bit.
    One multiply-add per slot (``addcmul``), not a multiply and an add: on a small model the cached
    step is short enough that each extra pass over the residual shows in its cost c.
    """
    h0 = history[0].float()
    out = w[0].float() * h0 if b is None else torch.addcmul(b.float(), w[0].float(), h0)  # (rows, N, D)
    for k in range(1, len(history)):
        out = torch.addcmul(out, w[k].float(), history[k].float())
    return out.to(history[0].dtype)


def cached_velocity(adapter: ModelAdapter, x_in, timestep, residual, cond=None) -> torch.Tensor:
    """Branch velocities (float32) from the stored residual: pre + residual + head, no block.

    cond: what a cached ``pre`` still reads (None for Wan; FLUX's pooled text and guidance).
    """
    pre = adapter.pre(x_in, timestep, cond)
    return adapter.head(pre.hidden + residual.to(pre.hidden.dtype), pre).float()


def conditioning_rows(family, text: Conditioning, sl: slice, n_branches: int, samples: int) -> Conditioning:
    """The conditioning rows of samples ``sl`` out of ``samples``, each input by its row rule.

    One tensor (Wan): (nb*B, ...) rows, cond then uncond, branch-major -> (nb*b, ...). A mapping:
    per input, ``"branch"`` rows as for one tensor, ``"sample"`` rows (B, ...) -> (b, ...), and
    ``"shared"`` inputs as they are. What calibration's micro-batches and the eval's chunks take.
    """
    def branch(value: torch.Tensor) -> torch.Tensor:
        return value.unflatten(0, (n_branches, samples))[:, sl].flatten(0, 1)  # (nb*B, ...) -> (nb, B, ...) -> (nb*b, ...)

    if not isinstance(text, Mapping):
        return branch(text)
    rules = {c.name: c.rows for c in family.conditioning}
    out = {}
    for name, value in text.items():
        rule = rules.get(name, ROWS_PER_BRANCH)
        out[name] = branch(value) if rule == ROWS_PER_BRANCH else value[sl] if rule == ROWS_PER_SAMPLE else value
    return out


def move_conditioning(text: Conditioning, *args, **kwargs) -> Conditioning:
    """``Tensor.to(*args, **kwargs)`` on one tensor or on every tensor of a mapping (same keys, same order)."""
    if isinstance(text, Mapping):
        return {name: value.to(*args, **kwargs) for name, value in text.items()}
    return text.to(*args, **kwargs)


def conditioning_dtype(text: Conditioning) -> torch.dtype:
    """The dtype the step runs the transformer in: the conditioning's (the first input's, for a mapping)."""
    if isinstance(text, Mapping):
        if not text:
            raise ValueError("the conditioning mapping is empty")
        return next(iter(text.values())).dtype
    return text.dtype


def step_conditioning(family, text: Conditioning, guidance_scale, rows: int, cached: bool):
    """What the adapter's ``pre`` reads on a full (``cached`` False) or a cached step.

    One tensor (Wan): itself on full steps and None on cached ones, since the text feeds only
    the skipped blocks. A mapping (FLUX): on cached steps only the inputs the family marks
    ``cached_step`` (the pooled text feeds the timestep embedding the head needs), and with an
    embedded guidance scale the scale itself as ``guidance`` (rows,), since then it is a model
    input instead of a CFG mix. ``guidance_scale``: a 0-d or one-element tensor (or a float).
    The step graphs, the calibration passes and the pipeline hook all take it from here.
    """
    if not isinstance(text, Mapping):
        return None if cached else text
    keep = {c.name for c in family.conditioning if c.cached_step or not cached}
    cond = {name: value for name, value in text.items() if name in keep}
    if family.guidance == EMBEDDED:
        g = guidance_scale if isinstance(guidance_scale, torch.Tensor) else torch.tensor(
            float(guidance_scale), device=next(iter(text.values())).device)  # a graph input stays as it is
        cond["guidance"] = g.reshape(1).expand(rows)  # (rows,)
    return cond


class _Step(nn.Module):
    def __init__(self, adapter: ModelAdapter, tables: StepTables):
        super().__init__()
        self.adapter = adapter
        self.transformer = adapter.model  # registered so .to() and torch.export see the weights
        self.tables = tables
        self.timestep_scale = timestep_scale(adapter)  # a Python constant of the family, baked into graphs
        self.family = adapter.family

    def _conditioning(self, text: Conditioning, guidance_scale: torch.Tensor, rows: int, cached: bool):
        return step_conditioning(self.family, text, guidance_scale, rows, cached)

    def _inputs(self, inputs: tuple) -> tuple[Conditioning, torch.Tensor, tuple]:
        """(conditioning, guidance_scale, the rest) of the inputs after ``latents, step``.

        Two call forms: the eager one, ``(text, guidance_scale, ...)`` with ``text`` one tensor or a
        mapping; and the graph one, the family's conditioning tensors flat in the contract's order
        (``ertacache.contract.step_inputs``), then ``guidance_scale``, so an exported graph has one
        named input per conditioning tensor. A one-input family's two forms are the same call.
        """
        names = self.family.input_names
        if len(names) == 1 or isinstance(inputs[0], Mapping):
            return inputs[0], inputs[1], inputs[2:]
        n = len(names)
        return dict(zip(names, inputs[:n])), inputs[n], inputs[n + 1:]

    def _setup(self, latents, step, text_embeds: Conditioning):
        n_branches = self.tables.n_branches
        dtype = conditioning_dtype(text_embeds)
        sigma = at_step(self.tables.sigmas, step)
        sigma_next = at_step(self.tables.sigmas, step + 1)
        x_in = expand_branches(latents, n_branches).to(dtype)  # (nb*B, C, F, H, W)
        timestep = model_timestep(sigma, x_in.shape[0], self.timestep_scale)
        return n_branches, sigma, sigma_next, x_in, timestep


class FullStep(_Step):
    """Computes the block stack, returns the next latents and the residual to cache."""

    def forward(self, latents, step, *inputs):
        """``(latents, step, text_embeds, guidance_scale)``; several conditioning tensors: see ``_inputs``."""
        text_embeds, guidance_scale, _ = self._inputs(inputs)
        n_branches, sigma, sigma_next, x_in, timestep = self._setup(latents, step, text_embeds)
        cond = self._conditioning(text_embeds, guidance_scale, x_in.shape[0], cached=False)
        v, residual = full_velocity(self.adapter, x_in, timestep, cond)
        v = combine_cfg(v, guidance_scale, n_branches)  # (B, C, F, H, W)
        return euler(latents, v, sigma, sigma_next), residual


class CachedStep(_Step):
    """Predicts the residual from the last K full steps' residuals, corrected by the step's a/b tables.

    ``forward(latents, step, text_embeds, guidance_scale, residual, *older)`` takes K residual
    slots, the newest first. With the paper's reuse (K = 1, weight 1) the prediction is skipped
    altogether, so that graph is exactly the reuse graph.
    """

    def __init__(self, adapter: ModelAdapter, tables: StepTables):
        super().__init__(adapter, tables)
        self.reuse = tables.plain_reuse()  # a static choice of graph, made once
        self.bias = bool(tables.pred_b.any())  # likewise: no bias pass for a bias-free predictor (Taylor)

    def forward(self, latents, step, *inputs):
        """``(latents, step, text_embeds, guidance_scale, residual, *older)``; several conditioning
        tensors: see ``_inputs``."""
        text_embeds, guidance_scale, slots = self._inputs(inputs)
        if len(slots) != self.tables.history:
            raise ValueError(f"the cached step takes {self.tables.history} residual slot(s), got {len(slots)}")
        residual, *older = slots
        n_branches, sigma, sigma_next, x_in, timestep = self._setup(latents, step, text_embeds)
        if not self.reuse:
            residual = predict_residual((residual, *older), at_step(self.tables.pred_w, step),
                                        at_step(self.tables.pred_b, step) if self.bias else None)
        cond = self._conditioning(text_embeds, guidance_scale, x_in.shape[0], cached=True)
        v = cached_velocity(self.adapter, x_in, timestep, residual, cond)
        v = rectify(v, at_step(self.tables.corr_a, step), at_step(self.tables.corr_b, step))
        v = combine_cfg(v, guidance_scale, n_branches)  # (B, C, F, H, W)
        return euler(latents, v, sigma, sigma_next)


class DecodeGraph(nn.Module):
    """latents (B, C, F', H', W') float32 -> frames (B, F, H, W, 3) uint8 through ``decoder.decode``.

    The third graph of an export folder (``vae_decode``); here, next to the step modules, so the
    exporter and the torch.compile engine build it from the same place.
    """

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder
        self.vae = decoder.vae  # registered so torch.export sees its weights

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(latents)
