"""The alternating runtime: ``for i in range(T): full if mask[i] else cached`` over preallocated buffers.

    with Runtime("engines/wan2.1-tiny", backend="onnxruntime") as rt:
        latents = rt.sample(noise, text_embeds)   # (B, C, F', H', W') float32
        frames = rt.decode()                      # (B, F, H, W, 3) uint8, from the vae_decode graph

On entry the folder is checked (:func:`ertacache.runtime.checks.open_folder`),
the engine activated, every buffer allocated once (:class:`RuntimeState`) and
every call bound, and the decoder. The cached step reads K residual slots
(K = the manifest's ``profile.history``, 1 for the paper's reuse); the K
residual buffers form a ring: the f-th full step (counting from 0) writes its
``residual_out`` into buffer ``f % K`` (the oldest, which becomes the newest),
and a cached step after it binds buffers ``f % K, (f-1) % K, ...`` to
``residual, residual_1, ...``. So each step is one of 2K full-step calls and
2K cached-step calls (latent parity x ring rotation), all bound once here;
:meth:`Runtime.plan` picks, from the mask known before the loop, which bound
call runs at step i. The loop then does, per step, one in-place copy of the
step index into the bound ``step`` buffer and one bound call: no copy of a
residual, no allocation, no host synchronisation (the step indices are on the
device before the loop). Non-finite values are looked for once after
the loop; when there are some, the schedule is replayed step by step from the
saved noise to name the first step and graph that produced them.

A two-expert folder (Wan2.2 A14B) has a graph pair per expert (``full_step``,
``cached_step``, ``full_step_2``, ``cached_step_2``) with identical I/O: both pairs
are bound to the same buffers, each with its own guidance-scale buffer, and the plan
takes the pair of the step's expert from the manifest's table (fixed by step index,
so still no host synchronisation). The ring needs no reset at the switch: every
expert opens with a full step, and a cached step before its expert's K-th full step
gives the slots not yet filled weight 0 (checked when the profile is exported), so
only residuals of its own expert count. The slots are zeroed once per request.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ertacache.contract import (CACHED_STEP, FULL_STEP, VAE_DECODE, ExportManifest, TensorSpec, expert_graph,
                                residual_slots)
from ertacache.engines.base import BoundCall, Engine, backend_info
from ertacache.engines.errors import EngineMismatchError
from ertacache.errors import NumericalError, UserError
from ertacache.runtime.checks import check_inputs, conditioning_inputs, open_folder
from ertacache.sampling.sampler import validate_mask
from ertacache.timing import StepClock, interleaved_medians


def _empty(spec: TensorSpec, device) -> torch.Tensor:
    return torch.zeros(spec.shape, dtype=spec.torch_dtype, device=device)


def check_guidance(value: float, n_branches: int, mode: str = "cfg") -> float:
    """A request's guidance scale: finite and >= 0 (0 and 1 are plain cond sampling; CFG needs > 1 to matter).

    Only a CFG folder takes one per request: a guidance-distilled one (``mode`` "embedded", FLUX.1-dev)
    embeds the profile's scale, which the calibration was made at, and a guidance-free one has none.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"guidance_scale {str(value)[:40]} is not a finite number >= 0; give e.g. 5.0 (or leave it "
                        "out for the profile's)")
    if n_branches != 2:
        why = {"embedded": "its model embeds the profile's guidance scale (profile again at another scale)",
               "none": "its model takes no guidance"}.get(mode, "it was profiled with guidance <= 1, so it has no "
                                                               "CFG branch (export a profile made with CFG)")
        raise UserError(f"this export folder takes no per-request guidance scale: {why}; leave it out")
    return float(value)


class RuntimeState:
    """Every buffer the loop touches, allocated once; :meth:`reset` zeroes them.

    latents: two (B, C, F', H', W') float32 buffers; step i reads ``latents[i % 2]`` and writes
        ``latents[(i + 1) % 2]``, so the final latents are in ``latents[T % 2]``.
    residuals: K (nb*B, N, D) buffers, a ring: the f-th full step writes ``residual_out`` into
        ``residuals[f % K]``; cached steps read them newest first (see the module docstring).
        ``residual`` is ``residuals[0]`` (the only one with K = 1).
    conditioning: one buffer per conditioning input of the folder, by name (Wan: ``text_embeds``
        (nb*B, L, D_text); FLUX: ``prompt_embeds``, ``pooled_prompt_embeds``); ``text_embeds`` is
        the one of a one-input folder. guidance_scale (), step () int64: the other step inputs;
        ``guidance_scales``: one () buffer per expert (``guidance_scale`` is expert 0's).
    steps: (T,) int64 step indices on the device; ``step_views[i]`` is ``steps[i]``, made once.
    noise: a copy of the initial latents, for the NaN diagnosis replay.
    frames: (B, F, H, W, 3) uint8 output of vae_decode, when the folder has that graph.
    """

    def __init__(self, manifest: ExportManifest, device: torch.device, with_decode: bool):
        steps = manifest.schedule.steps
        lat = manifest.spec(FULL_STEP, "latents")
        self.latents = (_empty(lat, device), _empty(lat, device))
        self.noise = _empty(lat, device)
        res = manifest.spec(FULL_STEP, "residual_out")
        self.residuals = tuple(_empty(res, device) for _ in range(manifest.schedule.history))
        self.conditioning = {name: _empty(manifest.spec(FULL_STEP, name), device) for name in manifest.conditioning}
        self.guidance_scales = tuple(_empty(manifest.spec(FULL_STEP, "guidance_scale"), device)
                                     for _ in range(manifest.schedule.expert_count))
        self.guidance_scale = self.guidance_scales[0]
        self.step = _empty(manifest.spec(FULL_STEP, "step"), device)
        self.steps = torch.arange(steps, dtype=torch.int64, device=device)
        self.step_views = [self.steps[i] for i in range(steps)]
        self.frames = _empty(manifest.spec(VAE_DECODE, "frames"), device) if with_decode else None
        self.final = self.latents[steps % 2]

    @property
    def residual(self) -> torch.Tensor:
        return self.residuals[0]

    @property
    def text_embeds(self) -> torch.Tensor:
        """The conditioning buffer of a one-input folder (Wan's ``text_embeds``)."""
        if len(self.conditioning) != 1:
            raise AttributeError(f"this folder has the conditioning inputs {list(self.conditioning)}; use "
                                 "state.conditioning[name]")
        return next(iter(self.conditioning.values()))

    @property
    def history(self) -> int:
        return len(self.residuals)

    def buffers(self) -> dict[str, torch.Tensor]:
        out = {"latents_0": self.latents[0], "latents_1": self.latents[1], "noise": self.noise,
               **{f"residual_slot_{j}": r for j, r in enumerate(self.residuals)},
               **self.conditioning, **{f"guidance_scale_{e}": g for e, g in enumerate(self.guidance_scales)},
               "step": self.step}
        if self.frames is not None:
            out["frames"] = self.frames
        return out

    def reset(self) -> None:
        for t in self.buffers().values():
            t.zero_()

    def clear_ring(self) -> None:
        """Zero the residual slots (a memset each, no allocation or sync), once per request.

        A cached step before K full steps reads the empty slots with weight 0; zeros there keep a
        NaN left by an earlier request (0 * NaN = NaN) out of this one.
        """
        for r in self.residuals:
            r.zero_()


@dataclass
class StepTimes:
    """Wall time per step of one timed run, split by kind."""

    full_s: list[float] = field(default_factory=list)
    cached_s: list[float] = field(default_factory=list)

    @property
    def full_median_s(self) -> float:
        return statistics.median(self.full_s) if self.full_s else float("nan")

    @property
    def cached_median_s(self) -> float:
        return statistics.median(self.cached_s) if self.cached_s else float("nan")




def ring_rotations(mask: Sequence[bool], history: int) -> list[int]:
    """Per step, the ring rotation r of its bound call (see the module docstring).

    A full step writes ``residual_out`` into buffer r (the f-th full step: r = f % K); a cached
    step reads buffers r, r-1, ... (mod K) as ``residual``, ``residual_1``, ... with r the buffer
    the last full step wrote. Plain Python over the mask, computed before the loop.
    """
    out, written = [], -1  # written: index of the last full step (in full steps), -1 before the first
    for full in mask:
        if full:
            written += 1
        out.append(written % history)
    return out


def make_engine(folder: Path, manifest: ExportManifest, backend: str, device: torch.device | None = None,
                providers: Sequence[str] | None = None, model_path: str | None = None,
                compile_backend: str = "inductor", cuda_graphs: bool = True, intra_op_threads: int = 0) -> Engine:
    """The engine of ``backend`` over the folder's artifacts (not yet active).

    ``intra_op_threads``: ONNX Runtime's threads per session (0: all cores); a server running N
    instances on one CPU gives each cores / N, or they fight over the same cores.
    """
    graphs = list(manifest.graphs)  # every step graph (of each expert) and vae_decode
    targets = manifest.targets
    if backend == "onnxruntime":
        from ertacache.engines.onnxruntime import OnnxRuntimeEngine

        files = manifest.graph_files("onnx")  # every one listed and hashed (checked on load)
        return OnnxRuntimeEngine({g: files[g] for g in graphs if g in files},
                                 providers or ("CPUExecutionProvider",), intra_op_threads)
    if backend == "aoti":
        from ertacache.engines.aoti import AotiEngine

        files = manifest.graph_files("aoti")
        order = {g: tuple(manifest.graphs[g].input_names) for g in graphs}
        return AotiEngine({g: files[g] for g in graphs if g in files}, order, device or "cpu")
    if backend == "torch":
        from ertacache.engines.torch_compile import StepModulesFromManifest, TorchCompileEngine

        dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return TorchCompileEngine(StepModulesFromManifest(folder, manifest, dev, model_path), dev, compile_backend,
                                  cuda_graphs=cuda_graphs)
    if backend == "tensorrt":
        from ertacache.engines.tensorrt import TensorRTEngine

        entry = targets["tensorrt"]
        return TensorRTEngine(manifest.graph_files("tensorrt"), device or "cuda",
                              version_compatible=bool(entry.get("version_compatible")), cuda_graphs=cuda_graphs)
    backend_info(backend)  # raises UnknownBackendError
    raise AssertionError(backend)


class Runtime:
    """One export folder, one backend; a context manager (see the module docstring).

    engine: an engine to use instead of the one ``backend`` builds from the folder (tests, and the
        torch backend with a model already in memory).
    verify_files: check every file's sha256 on open (seconds per GB; keep it on in production).
    intra_op_threads: ONNX Runtime threads per session (0: all cores), see :func:`make_engine`.
    expect_digest: refuse the folder unless its digest (``sha256:...`` of manifest.json, printed by
        ertacache-export) is this one.

    The schedule is the folder's: there is no mask override (the baked sigma and correction tables
    were fitted for that mask). :meth:`all_full_plan` exists for timing the uncached cost only.
    """

    def __init__(self, folder: str | Path, backend: str = "onnxruntime", *, device: torch.device | str | None = None,
                 providers: Sequence[str] | None = None, model_path: str | None = None, engine: Engine | None = None,
                 compile_backend: str = "inductor", cuda_graphs: bool = True, verify_files: bool = True,
                 intra_op_threads: int = 0, expect_digest: str | None = None):
        self.folder = Path(folder)
        self.backend = backend
        dev = torch.device(device) if device is not None else None
        self.manifest = open_folder(self.folder, backend, dev, verify_files=verify_files, expect_digest=expect_digest)
        self.engine = engine or make_engine(self.folder, self.manifest, backend, dev, providers, model_path,
                                            compile_backend, cuda_graphs, intra_op_threads)
        self.device = self.engine.device
        schedule = self.manifest.schedule
        self.history = schedule.history
        self.mask = validate_mask(schedule.mask, schedule.steps, schedule.expert_starts)
        #: per step, the expert whose graph pair runs it (all 0 for a one-transformer folder)
        self.experts = [schedule.expert(i) for i in range(schedule.steps)]
        self.state: RuntimeState | None = None
        #: (graph, latent parity, ring rotation) -> bound call: 2K full-step and 2K cached-step calls
        self._calls: dict[tuple[str, int, int], BoundCall] = {}
        self._decode: BoundCall | None = None

    # ---- lifetime --------------------------------------------------------------------------------

    def __enter__(self) -> "Runtime":
        self.engine.activate()
        try:
            self._allocate_and_bind()
        except BaseException:
            self.engine.deactivate()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._calls, self._decode, self.state = {}, None, None
        self.engine.deactivate()

    @property
    def steps(self) -> int:
        return len(self.mask)

    @property
    def has_decode(self) -> bool:
        return VAE_DECODE in self.engine.graphs() and self.manifest.has_decode

    def _check_engine_inputs(self) -> None:
        """The engine's cached step reads exactly the folder's K residual slots and nothing the contract lacks.

        (An engine may drop an unused input such as text_embeds, never a residual slot: a torch engine
        built from a profile of another K would otherwise run silently with the wrong history.)
        """
        for e in range(self.manifest.schedule.expert_count):
            graph = expert_graph(CACHED_STEP, e)
            want = self.manifest.graphs[graph].input_names
            have = self.engine.input_names(graph)
            extra = [n for n in have if n not in want]
            missing = [n for n in residual_slots(self.history) if n not in have]
            if extra or missing:
                raise EngineMismatchError(f"the {self.backend} engine's {graph} reads {list(have)}, export folder "
                                          f"{self.folder}'s reads {list(want)} (K = {self.history} residual slots); "
                                          "build the engine from this folder's profile")

    def _allocate_and_bind(self) -> None:
        self._check_engine_inputs()
        st = self.state = RuntimeState(self.manifest, self.device, self.has_decode)
        self._fill_guidance(None)
        k, slots = self.history, residual_slots(self.history)
        for e, g in enumerate(st.guidance_scales):  # one graph pair per expert, the same buffers
            full, cached = expert_graph(FULL_STEP, e), expert_graph(CACHED_STEP, e)
            for parity in (0, 1):
                x_in, x_out = st.latents[parity], st.latents[1 - parity]
                common = {"latents": x_in, "step": st.step, **st.conditioning, "guidance_scale": g}
                for r in range(k):  # ring rotation: buffer r is the newest residual
                    self._calls[full, parity, r] = self.engine.bind(
                        full, common, {"latents_out": x_out, "residual_out": st.residuals[r]})
                    ring = {name: st.residuals[(r - j) % k] for j, name in enumerate(slots)}  # newest first
                    self._calls[cached, parity, r] = self.engine.bind(
                        cached, {**common, **ring}, {"latents_out": x_out})
        if st.frames is not None:
            self._decode = self.engine.bind(VAE_DECODE, {"latents": st.final}, {"frames": st.frames})
        st.reset()  # binding may have run the graphs once (checks, CUDA graph warm-up)
        self._fill_guidance(None)

    def _fill_guidance(self, scales: Sequence[float] | None) -> None:
        """Each expert's guidance buffer: ``scales`` (one per expert) or the profile's."""
        st = self._require()
        for buf, value in zip(st.guidance_scales, scales or self.manifest.schedule.guidance_scales):
            buf.fill_(value)

    def _require(self) -> RuntimeState:
        if self.state is None:
            raise RuntimeError("the runtime is not open; use it inside `with Runtime(...) as rt:`")
        return self.state

    # ---- the loop --------------------------------------------------------------------------------

    def plan(self) -> list[tuple[torch.Tensor, BoundCall]]:
        """(step index view, bound call) per step of the folder's schedule; made before the loop."""
        return self._plan(self.mask)

    def all_full_plan(self) -> list[tuple[torch.Tensor, BoundCall]]:
        """Every step a full step: for timing the uncached cost only (benchmarks).

        Its result is not a valid sample (the folder's sigma table was adjusted for its own mask),
        which is why :meth:`sample` takes no mask.
        """
        return self._plan((True,) * self.steps)

    def _plan(self, mask: Sequence[bool]) -> list[tuple[torch.Tensor, BoundCall]]:
        st = self._require()
        rotations = ring_rotations(mask, self.history)
        return [(st.step_views[i], self._calls[self.graph_at(i, full), i % 2, rotations[i]])
                for i, full in enumerate(mask)]

    def graph_at(self, step: int, full: bool) -> str:
        """The graph that runs ``step``: its expert's full or cached step."""
        return expert_graph(FULL_STEP if full else CACHED_STEP, self.experts[step])

    def request_guidance(self, guidance_scale: float | None = None,
                         guidance_scale_2: float | None = None) -> tuple[float, ...]:
        """One CFG scale per expert for a request (checked), the profile's where none is given.

        A two-expert folder reads ``guidance_scale`` for expert 0 and ``guidance_scale_2`` for
        expert 1; as in diffusers' ``WanPipeline``, a ``guidance_scale`` given alone is used by
        both. A one-transformer folder refuses ``guidance_scale_2``.
        """
        schedule = self.manifest.schedule
        if schedule.experts is None:
            if guidance_scale_2 is not None:
                raise UserError("this export folder has one transformer, so it takes no guidance_scale_2 (only "
                                "Wan2.2 A14B's two-expert folders do); leave it out")
            if guidance_scale is None:
                return schedule.guidance_scales
            return (check_guidance(guidance_scale, schedule.n_branches, schedule.guidance),)
        if guidance_scale is None and guidance_scale_2 is None:
            return schedule.guidance_scales
        first = schedule.guidance_scales[0] if guidance_scale is None else guidance_scale
        second = guidance_scale_2 if guidance_scale_2 is not None else first
        return tuple(check_guidance(g, schedule.n_branches, schedule.guidance) for g in (first, second))

    def load_inputs(self, latents: torch.Tensor, text_embeds,
                    guidance_scale: float | None = None, guidance_scale_2: float | None = None) -> None:
        """Copy a request into the buffers (checked against the folder's shapes first).

        ``text_embeds``: the one conditioning tensor, or a mapping by the folder's conditioning names.
        ``guidance_scale_2``: a two-expert folder's second CFG scale (:meth:`request_guidance`).
        """
        st = self._require()
        check_inputs(self.manifest, latents, text_embeds)
        scales = self.request_guidance(guidance_scale, guidance_scale_2)
        st.latents[0].copy_(latents)
        st.noise.copy_(latents)
        st.clear_ring()
        for name, t in conditioning_inputs(self.manifest, text_embeds).items():
            st.conditioning[name].copy_(t)
        self._fill_guidance(scales)

    def run_plan(self, plan: list[tuple[torch.Tensor, BoundCall]],
                 on_step: Callable[[int], bool] | None = None) -> int:
        """The loop itself: per step an in-place index copy and one bound call. Nothing else.

        ``on_step(i)`` is called after step i (a server streams progress and checks for a cancelled
        request there); when it returns False the loop stops after that step. Returns the steps run.
        """
        step = self._require().step
        if on_step is None:
            for index, call in plan:
                step.copy_(index)
                call()
            return len(plan)
        for i, (index, call) in enumerate(plan):
            step.copy_(index)
            call()
            if not on_step(i):
                return i + 1
        return len(plan)

    def sample(self, latents: torch.Tensor, text_embeds, guidance_scale: float | None = None,
               times: StepTimes | None = None, check_finite: bool = True,
               guidance_scale_2: float | None = None) -> torch.Tensor:
        """Run the whole schedule; returns the final latents (a view of the runtime's buffer).

        ``times``: record each step's wall time into it (CUDA events on a GPU, read after the loop).
        With ``check_finite`` a NaN/Inf in the result raises :class:`NumericalError` naming the first
        step and graph that produced it.
        """
        st = self._require()
        self.load_inputs(latents, text_embeds, guidance_scale, guidance_scale_2)
        plan = self.plan()
        if times is None:
            self.run_plan(plan)
        else:
            self._run_timed(plan, self.mask, times)
        if check_finite:
            self.check_result()
        return st.final

    def check_result(self) -> None:
        """One isfinite check (one sync) of the final latents; on NaN/Inf replay to name the first bad step."""
        st = self._require()
        if not torch.isfinite(st.final).all():
            self._diagnose_nan(self.plan(), self.mask)

    def _run_timed(self, plan, mask, times: StepTimes) -> None:
        """The loop with a :class:`~ertacache.timing.StepClock` mark after each step (events on CUDA, no sync)."""
        step = self._require().step
        clock = StepClock(self.device, len(plan))
        clock.start()
        for i, (index, call) in enumerate(plan):
            step.copy_(index)
            call()
            clock.mark(i)
        for full, s in zip(mask, clock.read()):
            (times.full_s if full else times.cached_s).append(s)

    def _diagnose_nan(self, plan, mask) -> None:
        """Replay from the saved noise, checking after every step; raise naming the first bad step."""
        st = self._require()
        st.latents[0].copy_(st.noise)
        st.clear_ring()  # as the request found it: the failed run may have left NaN in a slot
        rotations = ring_rotations(mask, self.history)
        for i, ((index, call), full) in enumerate(zip(plan, mask)):
            st.step.copy_(index)
            call()
            graph = self.graph_at(i, full)
            out = st.latents[(i + 1) % 2]
            written = st.residuals[rotations[i]] if full else None  # the ring buffer this full step wrote
            bad = [name for name, t in (("latents_out", out), ("residual_out", written))
                   if t is not None and not torch.isfinite(t).all()]
            if bad:
                raise NumericalError(
                    f"NaN/Inf in {' and '.join(bad)} of graph {graph!r} at step {i} of {len(plan)} "
                    f"({self.backend}, export folder {self.folder}); the step's inputs were finite. Check the "
                    f"baked tables of that step (profile/, sigmas and correction a/b) and the model's precision")
        raise NumericalError(f"the final latents contain NaN/Inf but a step-by-step replay did not reproduce it "
                             f"({self.backend}); the backend is non-deterministic here")

    def decode(self) -> torch.Tensor:
        """vae_decode of the final latents into the frames buffer: (B, F, H, W, 3) uint8."""
        st = self._require()
        if self._decode is None:
            raise UserError(f"export folder {self.folder} has no vae_decode graph for backend {self.backend!r}; "
                            "re-export without --no-decode-graph")
        self._decode()
        return st.frames

    # ---- timing helpers for the bench and the CLIs ----------------------------------------------------

    def time_graph(self, graph: str, repeats: int = 5, warmup: int = 1) -> float:
        """Median seconds of one bound call of ``graph`` (the loop's own call, even-parity buffers)."""
        return self.time_graphs((graph,), repeats, warmup)[graph]

    def time_graphs(self, graphs: Sequence[str] = (FULL_STEP, CACHED_STEP), repeats: int = 5,
                    warmup: int = 1) -> dict[str, float]:
        """Median seconds of one bound call of each graph, interleaved (c is a ratio of one run)."""
        st = self._require()
        st.step.fill_(1)
        return interleaved_medians({g: self._calls[g, 0, 0] for g in graphs}, repeats, warmup, self.device)
