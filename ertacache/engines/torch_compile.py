"""torch.compile backend: the step modules themselves, compiled with ``fullgraph=True``.

Unlike the file backends it needs the model: :class:`StepModulesFromManifest`
loads it through :func:`ertacache.models.loading.load_bundle` with the
manifest's model id and path, refuses weights whose fingerprint differs from
the manifest's, and rebuilds ``FullStep`` / ``CachedStep`` with the tables of
the folder's ``profile/`` (the same modules the export baked; the cached step's
forward takes the profile's K residual slots, in the contract's order). On CUDA each
bound call is captured into a CUDA graph (:class:`CudaGraphCall`); on the CPU a
call returns fresh outputs that are copied into the runtime's buffers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from ertacache.engines.base import BoundCall, Engine, copy_outputs_call
from ertacache.engines.cuda_graph import CudaGraphCall
from ertacache.engines.errors import EngineMismatchError
from ertacache.contract import (CACHED_STEP, DEFAULT_CONDITIONING, FULL_STEP, VAE_DECODE, ExportManifest,
                                 expert_graph, graph_role, io_names)
from ertacache.models.adapter import ModelAdapter, adapter_list
from ertacache.profile.artifact import Profile
from ertacache.sampling.steps import CachedStep, DecodeGraph, FullStep

def input_order(graph: str, history: int = 1,
                conditioning: tuple[str, ...] = DEFAULT_CONDITIONING) -> tuple[str, ...]:
    """The input names of ``graph``'s forward in call order; the cached step takes K residual slots.

    A second expert's graphs (``full_step_2``, ``cached_step_2``) take the same inputs as the first's.
    """
    return io_names(graph_role(graph)[0], history, conditioning)[0]


def module_conditioning(modules: Mapping[str, nn.Module]) -> tuple[str, ...]:
    """The conditioning inputs the step modules' forward takes: their model family's (a module without an
    adapter: the default, Wan's text_embeds)."""
    adapter = getattr(modules.get(FULL_STEP), "adapter", None)
    return DEFAULT_CONDITIONING if adapter is None else tuple(adapter.family.input_names)


def module_history(modules: Mapping[str, nn.Module]) -> int:
    """K of the cached-step module (the residual slots its forward takes)."""
    return int(modules[CACHED_STEP].tables.history)


def step_modules(adapter: ModelAdapter | list[ModelAdapter], profile: Profile, device: torch.device | str = "cpu",
                 decoder=None) -> dict[str, nn.Module]:
    """FullStep / CachedStep (and DecodeGraph with a decoder) with ``profile``'s tables on ``device``.

    ``adapter``: one per expert (a list, in order) for a two-expert profile: each gets its own pair,
    named as the export names them (``full_step_2``, ``cached_step_2`` for the second).
    """
    adapters = adapter_list(adapter)
    tables = profile.tables().to(device)
    modules: dict[str, nn.Module] = {}
    for e, a in enumerate(adapters):
        modules[expert_graph(FULL_STEP, e)] = FullStep(a, tables).eval()
        modules[expert_graph(CACHED_STEP, e)] = CachedStep(a, tables).eval()
    if decoder is not None:
        modules[VAE_DECODE] = DecodeGraph(decoder).eval()
    return modules


class StepModulesFromManifest:
    """Loader: the model named by an export folder's manifest, checked against its fingerprint."""

    def __init__(self, folder: str | Path, manifest: ExportManifest, device: torch.device | str = "cpu",
                 model_path: str | None = None):
        self.folder = Path(folder)
        self.manifest = manifest
        self.device = torch.device(device)
        self.model_path = model_path

    def __call__(self) -> dict[str, nn.Module]:
        from ertacache.models.loading import load_bundle
        from ertacache.profile.artifact import load_profile

        m = self.manifest.model
        bundle = load_bundle(m.id, self.model_path or m.path, self.device, self.manifest.dtype)
        if bundle.fingerprint != m.fingerprint:
            raise EngineMismatchError(
                f"the export folder {self.folder} was made from weights {m.fingerprint} but {m.id} loaded from "
                f"{bundle.path} has weights {bundle.fingerprint}; pass --model-path to the folder's weights or "
                "re-export with these")
        profile = load_profile(self.manifest.profile_dir)
        if profile.history != self.manifest.schedule.history:  # open_folder checks it too; a loader stands alone
            raise EngineMismatchError(f"the export folder {self.folder} records a predictor over "
                                      f"{self.manifest.schedule.history} residuals, its profile/ one over "
                                      f"{profile.history}; re-export the folder")
        return step_modules(bundle.adapters, profile, self.device, bundle.decoder)


class TorchCompileEngine(Engine):
    """``torch.compile(fullgraph=True)`` of the step modules (the decoder stays eager).

    modules: a dict graph -> module, or a loader returning one (called on activation).
    compile_backend: torch.compile's backend ("inductor"; "eager" traces with dynamo but skips code
        generation, for tests); None runs the modules uncompiled (the eager baseline of the bench).
    cuda_graphs: capture each bound call into a CUDA graph (CUDA devices only).
    """

    backend = "torch"

    def __init__(self, modules: Mapping[str, nn.Module] | Callable[[], Mapping[str, nn.Module]],
                 device: torch.device | str = "cpu", compile_backend: str = "inductor", mode: str | None = None,
                 cuda_graphs: bool = True):
        super().__init__(device)
        self._source = modules
        self.compile_backend = compile_backend
        self.mode = mode
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.modules: dict[str, nn.Module] = {}
        self.compiled: dict[str, Callable] = {}
        self._pool = None
        self.history: int | None = module_history(modules) if isinstance(modules, Mapping) else None
        self.conditioning = module_conditioning(modules) if isinstance(modules, Mapping) else DEFAULT_CONDITIONING

    def _activate(self) -> None:
        modules = self._source() if callable(self._source) else self._source
        self.modules = dict(modules)
        for name in (FULL_STEP, CACHED_STEP):
            if name not in self.modules:
                raise EngineMismatchError(f"the torch backend needs a {name!r} module")
        self.history = module_history(self.modules)  # the cached step's forward takes K residual slots
        self.conditioning = module_conditioning(self.modules)  # and the family's conditioning tensors
        self.compiled = {}
        for name, module in self.modules.items():
            module.to(self.device)
            if name == VAE_DECODE or self.compile_backend is None:  # decode runs once per video: not worth a compile
                self.compiled[name] = torch.no_grad()(module)
                continue
            # CUDA graphs are captured by CudaGraphCall around the bound call, not by mode="reduce-overhead":
            # that keeps the buffers the runtime owns as the graph's static inputs and outputs
            # Inductor bakes torch.get_num_threads() at compile time into its C++ kernels
            # (`omp parallel num_threads(N)`); cpp.dynamic_threads reads it at every call instead, so the
            # process's thread setting (--threads) holds after the compile as well
            # (torch.compile takes mode or options, not both: with a mode, threads stay baked)
            options = {"cpp.dynamic_threads": True} if self.compile_backend == "inductor" and not self.mode else None
            fn = torch.compile(module, fullgraph=True, dynamic=False, backend=self.compile_backend, mode=self.mode,
                               options=options)
            self.compiled[name] = torch.no_grad()(fn)
        if self.cuda_graphs:
            self._pool = torch.cuda.graph_pool_handle()

    def _deactivate(self) -> None:
        self.modules, self.compiled, self._pool = {}, {}, None
        torch._dynamo.reset()

    def graphs(self) -> tuple[str, ...]:
        return tuple(self.compiled or (self._source if isinstance(self._source, Mapping) else (FULL_STEP, CACHED_STEP)))

    def input_names(self, graph: str) -> tuple[str, ...]:
        """The forward's inputs in call order (K residual slots for the cached step once K is known)."""
        return input_order(graph, self.history or 1, self.conditioning)

    def bind(self, graph: str, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> BoundCall:
        self._require_active()
        order = self.input_names(graph)
        missing = [n for n in order if n not in inputs]
        if missing:
            raise EngineMismatchError(f"the torch backend's {graph} takes {list(order)}; the bind lacks {missing} "
                                      "(the export folder's K differs from the profile the modules were built from)")
        args = tuple(inputs[n] for n in order)
        call = copy_outputs_call(self.compiled[graph], args, tuple(outputs.values()))
        if self.cuda_graphs and graph != VAE_DECODE:
            return CudaGraphCall(call, self.device, pool=self._pool)
        return call
