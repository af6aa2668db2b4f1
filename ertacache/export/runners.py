"""Run exported step graphs: one small runner per backend, one schedule loop for all of them.

These are the export stage's validation runners: plain calls with fresh outputs.
Sessions and packages are loaded by the engine loaders of :mod:`ertacache.engines`
(``SessionFromOnnxPath``, ``AotiModelFromPackage``); the preallocated,
allocation-free loop is :class:`ertacache.runtime.Runtime`.

A runner exposes the two step functions with the graphs' contract:

    full(latents, step, text_embeds, guidance_scale) -> (latents_out, residual_out)
    cached(latents, step, text_embeds, guidance_scale, residual, *older) -> latents_out
    decode(latents) -> frames            (when the vae_decode graph exists)

    call(graph, *args) -> outputs        (any graph by name: full_step_2 of a second expert)

``cached`` takes the K residual slots newest first (``residual``, ``residual_1``, ...).
:func:`run_schedule` is the runtime's loop in its plainest form (``full if
mask[i] else cached``, keeping the last K full-step residuals like the eager
sampler; with two experts, the step's expert's pair and CFG scale, the history
emptied at the switch); validation and timing both use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from ertacache.export.errors import GraphExportError, TargetDtypeError
from ertacache.contract import expert_graph
from ertacache.export.graphs import CACHED_STEP, FULL_STEP, VAE_DECODE, GraphSpec
from ertacache.models.experts import Experts, segments
from ertacache.sampling.sampler import fill_slots
from ertacache.timing import ideal_speedup, interleaved_medians


class StepRunner(Protocol):
    def call(self, graph: str, *args): ...

    def full(self, latents, step, text_embeds, guidance_scale) -> tuple[torch.Tensor, torch.Tensor]: ...

    def cached(self, latents, step, text_embeds, guidance_scale, residual, *older) -> torch.Tensor: ...


class EagerRunner:
    """The un-exported modules (FullStep, CachedStep, DecodeGraph), for reference and timing."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules

    @torch.no_grad()
    def call(self, graph: str, *args):
        return self.modules[graph](*args)

    def full(self, *args):
        return self.call(FULL_STEP, *args)

    def cached(self, *args):
        return self.call(CACHED_STEP, *args)

    def decode(self, latents):
        return self.call(VAE_DECODE, latents)


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; ORT's CPU provider has no bf16 kernels anyway
        raise TypeError("bfloat16 tensors cannot be fed to ONNX Runtime through numpy")
    return t.detach().cpu().numpy()


class OnnxRuntimeRunner:
    """ONNX Runtime sessions of the exported graphs, fed by input name."""

    def __init__(self, paths: dict[str, Path], specs: dict[str, GraphSpec], providers: Sequence[str] | None = None,
                 dtype_name: str = "float32"):
        from ertacache.engines.onnxruntime import SessionFromOnnxPath

        self.specs = specs
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.sessions = {}
        for name, path in paths.items():
            try:
                self.sessions[name] = SessionFromOnnxPath(path, self.providers)()
            except Exception as e:  # e.g. bf16 Conv on the CPU provider: INVALID_GRAPH
                if dtype_name != "float32":
                    raise TargetDtypeError(
                        f"ONNX Runtime ({', '.join(self.providers)}) cannot load the {dtype_name} graph {name!r} on "
                        f"this machine ({' '.join(str(e).split())[:300]}); the export cannot be validated. Use "
                        f"--dtype fp32 (or fp16) for --targets onnx here, --targets aoti for {dtype_name}, or export "
                        "on a machine whose ONNX Runtime provider runs it (CUDA / TensorRT)"
                    ) from None
                raise GraphExportError(name, "ONNX Runtime session", e) from e

    def call(self, graph: str, *args):
        spec = self.specs[graph]
        feeds = {s.name: _np(a) for s, a in zip(spec.inputs, args)}
        out = [torch.from_numpy(o) for o in self.sessions[graph].run(spec.output_names, feeds)]
        return tuple(out) if len(out) > 1 else out[0]

    def full(self, *args):
        return self.call(FULL_STEP, *args)

    def cached(self, *args):
        return self.call(CACHED_STEP, *args)

    def decode(self, latents):
        return self.call(VAE_DECODE, latents)


class AotiRunner:
    """AOTInductor packages loaded back with ``torch._inductor.aoti_load_package``."""

    def __init__(self, paths: dict[str, Path]):
        from ertacache.engines.aoti import AotiModelFromPackage

        self.models = {name: AotiModelFromPackage(path)() for name, path in paths.items()}

    def call(self, graph: str, *args):
        out = self.models[graph](*args)
        return tuple(out) if isinstance(out, (list, tuple)) and len(out) > 1 else _single(out)

    def full(self, *args):
        return self.call(FULL_STEP, *args)

    def cached(self, *args):
        return self.call(CACHED_STEP, *args)

    def decode(self, latents):
        return self.call(VAE_DECODE, latents)


def _single(out):
    """A one-output graph returns its tensor as the module did (a bare tensor), some loaders a 1-list."""
    if isinstance(out, (list, tuple)):
        if len(out) != 1:
            raise ValueError(f"expected one output, got {len(out)}")
        return out[0]
    return out


def run_schedule(runner: StepRunner, mask: Sequence[bool], latents: torch.Tensor, text_embeds,
                 guidance_scale: float, history: int = 1, experts: Experts | None = None) -> torch.Tensor:
    """``for i in range(T): full if mask[i] else cached``; returns the final latents (B, C, F', H', W').

    text_embeds: the one conditioning tensor, or a tuple of a family's conditioning tensors in the
    graphs' input order (each becomes one graph input).
    history: K, the residual slots the cached step reads; the loop keeps the last K full-step
    residuals, newest first, exactly as :class:`ertacache.sampling.CachedSampler` does (before K
    full steps the empty slots, which the baked weights give 0, repeat the newest residual).
    experts: a two-expert folder's table: step i runs the pair of expert ``experts.expert(i)``
    (``runner.call``) with that expert's CFG scale (``guidance_scale`` is then unused), and the
    residual history starts empty at each expert's first step.
    """
    conds = tuple(text_embeds) if isinstance(text_embeds, (tuple, list)) else (text_embeds,)
    experts = experts or Experts((0,), (float(guidance_scale),))
    if not mask or not mask[0]:
        raise ValueError("the first step must be a full step")
    for e, (start, _) in enumerate(segments(experts.starts, len(mask))):
        if not mask[start]:
            raise ValueError(f"expert {e}'s first step (step {start}) must be a full step")
    device = latents.device
    scales = [torch.tensor(float(g), dtype=torch.float32, device=device) for g in experts.guidance_scales]
    steps = torch.arange(len(mask), dtype=torch.int64, device=device)  # made once: no host->device copy per step
    x, residuals = latents.float(), []  # the last K full-step residuals, newest first
    for i, full in enumerate(mask):
        e = experts.expert(i)
        if i == experts.starts[e]:
            residuals = []  # a new expert: the other one's residuals are never read
        step, g = steps[i], scales[e]
        if full:
            x, residual = runner.call(expert_graph(FULL_STEP, e), x, step, *conds, g)
            residuals = [residual, *residuals[: history - 1]]
        else:
            x = runner.call(expert_graph(CACHED_STEP, e), x, step, *conds, g, *fill_slots(residuals, history))
        if x.shape != latents.shape:  # a runner returning the wrong thing must not pass by broadcasting
            raise ValueError(f"step {i} returned latents {tuple(x.shape)}, expected {tuple(latents.shape)}")
    return x


def relative_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((got.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def time_steps(runner: StepRunner, full_inputs: tuple, cached_inputs: tuple, repeats: int = 5,
               warmup: int = 1) -> dict[str, float]:
    """Median seconds of one full and one cached step, interleaved so machine noise hits both alike.

    The clock is :mod:`ertacache.timing`: on a CUDA device it times the device work, not the launch.
    """
    med = interleaved_medians({"full": lambda: runner.full(*full_inputs),
                               "cached": lambda: runner.cached(*cached_inputs)},
                              repeats, warmup=warmup, device=full_inputs[0].device)
    return {"full_s": med["full"], "cached_s": med["cached"], "c": med["cached"] / med["full"]}


def speedup_bound(mask: Sequence[bool], c: float) -> float:
    """T / (N_full + N_cached * c): the best speedup of the schedule when a cached step costs c full steps."""
    return ideal_speedup(len(mask), sum(bool(m) for m in mask), c)
