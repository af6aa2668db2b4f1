"""Checks an export folder must pass before a runtime uses it; each refusal names both sides and the fix.

    open_folder(folder, backend)  manifest (sha256 of every file, schema version: load_manifest), the
                                  folder's inner consistency (contract names, shapes, the profile's
                                  weights fingerprint), the backend's artifacts and their machine
                                  (TensorRT version and GPU, AOTInductor's torch build and device)
    check_inputs(...)             latents / text_embeds of a request against the folder's shapes
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import torch

from ertacache.engines.base import backend_info, require_backend
from ertacache.engines.errors import EngineMismatchError
from ertacache.errors import UserError
from ertacache.export.graphs import CACHED_INPUTS, CACHED_STEP, FULL_OUTPUTS, FULL_STEP, STEP_INPUTS
from ertacache.export.manifest import load_manifest


def _fix(folder: Path) -> str:
    return f"re-export it with ertacache-export --out {folder} --force"


def check_consistency(manifest: Mapping[str, Any], folder: Path) -> None:
    """The manifest agrees with itself and with the profile it carries."""
    graphs = manifest["graphs"]
    for name, ins, outs in ((FULL_STEP, STEP_INPUTS, FULL_OUTPUTS), (CACHED_STEP, CACHED_INPUTS, ("latents_out",))):
        if name not in graphs:
            raise EngineMismatchError(f"export folder {folder} has no {name!r} graph; {_fix(folder)}")
        have_in = [s["name"] for s in graphs[name]["inputs"]]
        have_out = [s["name"] for s in graphs[name]["outputs"]]
        if have_in != list(ins) or have_out != list(outs):
            raise EngineMismatchError(f"export folder {folder}: graph {name!r} has I/O {have_in} -> {have_out}, this "
                                      f"runtime expects {list(ins)} -> {list(outs)}; {_fix(folder)}")
    spec = {s["name"]: s["shape"] for s in graphs[FULL_STEP]["inputs"] + graphs[FULL_STEP]["outputs"]}
    shapes = manifest["shapes"]
    for key, name in (("latents", "latents"), ("text_embeds", "text_embeds"), ("residual", "residual_out")):
        if list(shapes[key]) != list(spec[name]):
            raise EngineMismatchError(f"export folder {folder}: shapes.{key} is {shapes[key]} but the full_step graph's "
                                      f"{name} is {spec[name]}; {_fix(folder)}")
    prof = manifest["profile"]
    if not (len(prof["mask"]) == prof["steps"] == len(prof["sigmas"]) - 1) or not prof["mask"][0]:
        raise EngineMismatchError(f"export folder {folder}: the schedule is inconsistent ({len(prof['mask'])} mask "
                                  f"entries, {prof['steps']} steps, {len(prof['sigmas'])} sigmas, first step "
                                  f"{'full' if prof['mask'][0] else 'cached'}); {_fix(folder)}")
    profile_json = folder / prof.get("folder", "profile") / "profile.json"
    if profile_json.is_file():
        fp = json.loads(profile_json.read_text()).get("model_fingerprint")
        if fp != manifest["model"]["fingerprint"]:
            raise EngineMismatchError(f"export folder {folder}: the graphs are for weights "
                                      f"{manifest['model']['fingerprint']} but its profile was made for weights {fp}; "
                                      f"{_fix(folder)}")


def check_backend_artifacts(manifest: Mapping[str, Any], folder: Path, backend: str,
                            device: torch.device | None = None) -> None:
    """The folder holds this backend's artifacts, made for this machine."""
    info = backend_info(backend)
    target = info.needs_target
    targets = manifest.get("targets", {})
    if target is not None and target not in targets:
        how = (f"build them with ertacache-build --engines {folder} --targets tensorrt" if target == "tensorrt"
               else f"re-export with ertacache-export --targets {target}")
        raise EngineMismatchError(f"export folder {folder} has no {target} artifacts (it has "
                                  f"{sorted(k for k in targets if k != 'torch_compile')}); {how}, or choose "
                                  f"another --backend")
    if backend == "aoti":
        built = manifest["versions"].get("torch")
        here = metadata.version("torch")
        if built != here:
            raise EngineMismatchError(f"export folder {folder}: AOTInductor packages were compiled by torch {built}, "
                                      f"this machine has torch {here}; {_fix(folder)} on this machine")
        built_device = targets["aoti"].get("device", "cpu")
        if device is not None and torch.device(built_device).type != device.type:
            raise EngineMismatchError(f"export folder {folder}: AOTInductor packages were compiled for {built_device}, "
                                      f"the runtime runs on {device.type}; export on a {device.type} machine")
    if backend == "tensorrt":
        from ertacache.engines.tensorrt import check_engine_entry, gpu_identity, tensorrt_version

        gpu = gpu_identity(0) if torch.cuda.is_available() else None
        check_engine_entry(targets["tensorrt"], tensorrt_version(), gpu, where=str(folder))


def open_folder(folder: str | Path, backend: str, device: torch.device | None = None,
                verify_files: bool = True) -> dict[str, Any]:
    """Every check above, in order; returns the manifest."""
    folder = Path(folder)
    require_backend(backend)  # unknown or not installed: refuse before reading gigabytes
    manifest = load_manifest(folder, verify_files=verify_files)  # schema version, sha256 and size of every file
    check_consistency(manifest, folder)
    check_backend_artifacts(manifest, folder, backend, device)
    return manifest


def check_inputs(manifest: Mapping[str, Any], latents: torch.Tensor | None, text_embeds: torch.Tensor) -> None:
    """A request's tensors against the folder's static shapes (named with their meaning) and finiteness."""
    shapes = manifest["shapes"]
    nb = manifest["profile"]["n_branches"]
    if list(text_embeds.shape) != list(shapes["text_embeds"]):
        rows = "cond rows, then uncond rows" if nb == 2 else "cond rows only"
        raise UserError(f"text_embeds has shape {list(text_embeds.shape)} but this export folder takes "
                        f"{shapes['text_embeds']} ({nb} x batch {shapes['batch_size']} rows: {rows}; L x D_text of "
                        f"the text encoder); encode with the folder's text encoder or re-export for this shape")
    if latents is not None and list(latents.shape) != list(shapes["latents"]):
        raise UserError(f"latents have shape {list(latents.shape)} but this export folder takes {shapes['latents']} "
                        "(batch, channels, latent frames, height/8, width/8); re-export for this shape")
    for name, t in (("text_embeds", text_embeds), ("latents", latents)):
        if t is not None and not torch.isfinite(t).all():
            raise UserError(f"{name} contain NaN or Inf; check the text encoder / the noise you pass")
