"""AOTInductor backend: the ``aoti/<graph>.pt2`` packages loaded with ``torch._inductor.aoti_load_package``.

An AOTInductor model allocates its outputs on every call (its Python and C++
run APIs take inputs only), so a bound call runs the package and copies its
outputs into the runtime's buffers. The bench reports those bytes per step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from ertacache.engines.base import BoundCall, Engine, copy_outputs_call
from ertacache.engines.errors import EngineMismatchError
from ertacache.errors import brief


class AotiModelFromPackage:
    """Loader: the compiled model of one ``.pt2`` package (callable with the graph's inputs in order)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __call__(self):
        # Loading runs the package's compiled code: only load folders from trusted sources (docs/engines.md)
        try:
            return torch._inductor.aoti_load_package(str(self.path))
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file fails in many ways (zip, dlopen, ...)
            raise EngineMismatchError(f"AOTInductor cannot load {self.path} ({type(e).__name__}: "
                                      f"{brief(str(e), 200)}); re-export the folder with ertacache-export on this "
                                      "machine") from None


class AotiEngine(Engine):
    """Graphs as AOTInductor packages. ``input_order`` per graph is the manifest's contract order."""

    backend = "aoti"

    def __init__(self, paths: Mapping[str, str | os.PathLike], input_order: Mapping[str, tuple[str, ...]],
                 device: torch.device | str = "cpu"):
        super().__init__(device)
        self.loaders = {name: AotiModelFromPackage(p) for name, p in paths.items()}
        self.input_order = {k: tuple(v) for k, v in input_order.items()}
        self.models: dict = {}
        self._checked: set[str] = set()

    def _activate(self) -> None:
        self.models = {name: load() for name, load in self.loaders.items()}

    def _deactivate(self) -> None:
        self.models = {}

    def graphs(self) -> tuple[str, ...]:
        return tuple(self.loaders)

    def input_names(self, graph: str) -> tuple[str, ...]:
        return self.input_order[graph]

    def bind(self, graph: str, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> BoundCall:
        self._require_active()
        model = self.models[graph]
        args = tuple(inputs[n] for n in self.input_order[graph])
        # the package's own call unflattens outputs through pytree each time; boxed_run on the flat
        # input list skips that (it consumes the list it is given, hence the fresh list per call)
        loader = model.loader

        def run(*a):
            return loader.boxed_run(list(a))

        if graph not in self._checked:  # one checked run per graph: the output count must match the contract
            n_out = len(run(*args))
            if n_out != len(outputs):
                raise EngineMismatchError(f"AOTInductor package {graph!r} returns {n_out} outputs, the manifest "
                                          f"lists {len(outputs)}; re-export the folder")
            self._checked.add(graph)
        return copy_outputs_call(run, args, tuple(outputs.values()))
