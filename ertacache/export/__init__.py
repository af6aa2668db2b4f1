"""The compiler pass: bake a profile into static full-step / cached-step graphs and export them.

    BakeStepGraphs      the pass: (adapter, profile) -> StepGraphs (torch.export programs + I/O contract)
    ExportConfig        what to export (targets, dtype, batch size, output folder)
    ExportPackage       every stage: pass, targets, validation, timing, manifest, atomic folder
    load_manifest       read and verify an export folder

See docs/export.md.
"""

from ertacache.export.config import TARGETS, ExportConfig, parse_targets
from ertacache.export.errors import GraphExportError, TargetDtypeError, UnsupportedOpsError
from ertacache.export.graphs import CACHED_STEP, FULL_STEP, VAE_DECODE, BakeStepGraphs, GraphSpec, StepGraphs
from ertacache.contract import ExportManifest, load_manifest
from ertacache.export.package import ExportPackage, ExportReport, ModelIdentity, export_package

__all__ = [
    "TARGETS", "ExportConfig", "parse_targets", "GraphExportError", "TargetDtypeError", "UnsupportedOpsError",
    "CACHED_STEP", "FULL_STEP", "VAE_DECODE", "BakeStepGraphs", "GraphSpec", "StepGraphs", "load_manifest",
    "ExportManifest",
    "ExportPackage", "ExportReport", "ModelIdentity", "export_package",
]
