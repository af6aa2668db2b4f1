"""AOTInductor target: ExportedProgram -> ``<name>.pt2`` package, loadable without the model's code.

``torch._inductor.aoti_compile_and_package`` compiles the graph to a shared
library (C++ on CPU) and packs it with the weights; ``aoti_load_package``
loads it back in any process with the same torch build (C++ deployments use
``torch::inductor::AOTIModelPackageLoader``). One package per graph, so a
runtime loads only what it needs.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ertacache.export.errors import GraphExportError


@dataclass
class AotiGraph:
    name: str
    path: Path
    compile_s: float


class AotiPackageFromExportedProgram:
    """Compile one graph into ``out_dir/<name>.pt2``."""

    def __init__(self, inductor_configs: dict | None = None):
        # threads are read at run time (torch.set_num_threads / --threads of the process that loads the
        # package), not baked in from the exporting machine's core count, which Inductor does by default
        self.inductor_configs = {"cpp.dynamic_threads": True, **(inductor_configs or {})}

    def __call__(self, name: str, program: torch.export.ExportedProgram, out_dir: Path) -> AotiGraph:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}.pt2"
        start = time.perf_counter()
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                     inductor_configs=self.inductor_configs)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise GraphExportError(name, "writing the AOTInductor package", f"disk full ({e})",
                                       hint=f"no output folder was written; free space on {out_dir} or choose "
                                            "another --out") from e
            raise GraphExportError(name, "AOTInductor compile", e) from e
        except Exception as e:
            raise GraphExportError(name, "AOTInductor compile", e) from e
        return AotiGraph(name, path, time.perf_counter() - start)


def load_aoti_package(path: str | Path):
    """The compiled model of a ``.pt2`` package: call it with the graph's inputs in order."""
    from ertacache.engines.aoti import AotiModelFromPackage

    return AotiModelFromPackage(path)()
