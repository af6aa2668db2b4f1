"""Checks an export folder must pass before a runtime uses it; each refusal names both sides and the fix.

    open_folder(folder, backend)  the manifest (typed and validated, every path confined to the folder,
                                  every file listed and its sha256 checked, the contract's graph I/O:
                                  ertacache.contract.load_manifest), the schedule against the folder's
                                  profile/ (check_against_profile), the backend's artifacts and their
                                  machine (TensorRT version and GPU, AOTInductor's torch build and device)
    check_inputs(...)             latents / text_embeds of a request against the folder's shapes
"""

from __future__ import annotations

from collections.abc import Mapping

import math
from importlib import metadata
from pathlib import Path
from typing import Sequence

import torch

from ertacache.contract import FULL_STEP, ExportManifest, load_manifest
from ertacache.engines.base import backend_info, require_backend
from ertacache.engines.errors import EngineMismatchError
from ertacache.errors import ProfileError, UserError


def _fix(folder: Path) -> str:
    return f"re-export it with ertacache-export --out {folder} --force"


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a, b))


def check_against_profile(manifest: ExportManifest) -> None:
    """What the runtime uses from the manifest (mask, sigmas, phi, steps, CFG, guidance, shapes, K) equals ``profile/``.

    The manifest's schedule is what the loop runs; ``profile/`` is what the graphs' tables were
    fitted for (its correction file is hashed in its profile.json, and both are hashed in the
    manifest). An edited mask or guidance in the manifest alone is refused here.
    """
    from ertacache.profile.artifact import load_profile

    folder = manifest.root
    try:
        profile = load_profile(manifest.profile_dir)
    except ProfileError as e:
        raise EngineMismatchError(f"export folder {folder}: its profile is unusable ({e})") from None
    s, sh = manifest.schedule, manifest.shapes
    checks = [
        ("model fingerprint", manifest.model.fingerprint, profile.model_fingerprint),
        ("steps", s.steps, profile.steps),
        ("n_branches (CFG)", s.n_branches, profile.n_branches),
        ("guidance_scale", s.guidance_scale, profile.guidance_scale),
        ("guidance mode", s.guidance, profile.guidance),
        ("shift", s.shift, profile.shift),
        ("mask", list(s.mask), [bool(m) for m in profile.mask]),
        ("predictor history K", s.history, profile.history),
        ("predictor kind", s.predictor.get("kind"), profile.predictor.get("kind")),
        ("latent shape", list(sh.latents[1:]), list(profile.latent_shape)),
        ("experts", s.experts, profile.experts),
        ("height x width x frames", (sh.height, sh.width, sh.frames), (profile.height, profile.width, profile.frames)),
    ]
    for name, have, want in checks:
        if have != want and not (isinstance(have, float) and math.isclose(have, want, rel_tol=1e-9)):
            raise EngineMismatchError(f"export folder {folder}: the manifest's {name} ({_brief(have)}) differs from "
                                      f"its profile's ({_brief(want)}); {_fix(folder)}")
    for name, have, want in (("sigmas", s.sigmas, profile.sigmas), ("phi", s.phi, profile.phi),
                             ("nominal_sigmas", s.nominal_sigmas, profile.nominal_sigmas)):
        if not _close(have, want):
            raise EngineMismatchError(f"export folder {folder}: the manifest's {name} table differs from its "
                                      f"profile's; {_fix(folder)}")


def _brief(value) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:80] + "..."


def check_consistency(manifest: ExportManifest, folder: Path | None = None) -> None:
    """The manifest agrees with itself (checked when it is read) and with the profile it carries."""
    check_against_profile(manifest)


def check_backend_artifacts(manifest: ExportManifest, folder: Path, backend: str,
                            device: torch.device | None = None) -> None:
    """The folder holds this backend's artifacts, made for this machine."""
    info = backend_info(backend)
    target = info.needs_target
    targets = manifest.targets
    if target is not None and target not in targets:
        how = (f"build them with ertacache-build --engines {folder} --targets tensorrt" if target == "tensorrt"
               else f"re-export with ertacache-export --targets {target}")
        raise EngineMismatchError(f"export folder {folder} has no {target} artifacts (it has "
                                  f"{sorted(k for k in targets if k != 'torch_compile')}); {how}, or choose "
                                  f"another --backend")
    if backend == "aoti":
        built = manifest.versions.get("torch")
        here = metadata.version("torch")
        if built != here:
            raise EngineMismatchError(f"export folder {folder}: AOTInductor packages were compiled by torch {built}, "
                                      f"this machine has torch {here}; {_fix(folder)} on this machine")
        built_device = str(targets["aoti"].get("device", "cpu"))
        try:
            built_type = torch.device(built_device).type
        except (RuntimeError, ValueError):
            raise EngineMismatchError(f"export folder {folder}: targets.aoti.device {built_device[:40]!r} is not a "
                                      f"device; {_fix(folder)}") from None
        if device is not None and built_type != device.type:
            raise EngineMismatchError(f"export folder {folder}: AOTInductor packages were compiled for {built_device}, "
                                      f"the runtime runs on {device.type}; export on a {device.type} machine")
    if backend == "tensorrt":
        from ertacache.engines.tensorrt import check_engine_entry, gpu_identity, tensorrt_version

        gpu = gpu_identity(0) if torch.cuda.is_available() else None
        check_engine_entry(targets["tensorrt"], tensorrt_version(), gpu, where=str(folder))


def open_folder(folder: str | Path, backend: str, device: torch.device | None = None,
                verify_files: bool = True, expect_digest: str | None = None) -> ExportManifest:
    """Every check above, in order; returns the manifest."""
    folder = Path(folder)
    require_backend(backend)  # unknown or not installed: refuse before reading gigabytes
    manifest = load_manifest(folder, verify_files=verify_files, expect_digest=expect_digest)
    check_against_profile(manifest)
    check_backend_artifacts(manifest, folder, backend, device)
    return manifest


def check_inputs(manifest: ExportManifest, latents: torch.Tensor | None, text_embeds) -> None:
    """A request's tensors against the folder's static shapes (named with their meaning) and finiteness.

    ``text_embeds``: the one tensor of a Wan folder, or a mapping by the folder's conditioning names.
    """
    shapes = manifest.shapes
    nb = manifest.schedule.n_branches
    conds = conditioning_inputs(manifest, text_embeds)
    if shapes.text_embeds is not None and tuple(text_embeds.shape) != shapes.text_embeds:
        rows = "cond rows, then uncond rows" if nb == 2 else "cond rows only"
        raise UserError(f"text_embeds has shape {list(text_embeds.shape)} but this export folder takes "
                        f"{list(shapes.text_embeds)} ({nb} x batch {shapes.batch_size} rows: {rows}; L x D_text of "
                        f"the text encoder); encode with the folder's text encoder or re-export for this shape")
    for name, t in conds.items():
        want = manifest.spec(FULL_STEP, name).shape
        if tuple(t.shape) != want:
            raise UserError(f"{name} has shape {list(t.shape)} but this export folder takes {list(want)} "
                            f"(batch {shapes.batch_size}); encode with the folder's text encoders or re-export")
    if latents is not None and tuple(latents.shape) != shapes.latents:
        axes = "latent frames, latent height, latent width" if len(shapes.latents) == 5 else \
            "latent height, latent width"  # the family's layout: video or image latents
        raise UserError(f"latents have shape {list(latents.shape)} but this export folder takes "
                        f"{list(shapes.latents)} (batch, channels, {axes}); re-export for this shape")
    for name, t in (*conds.items(), ("latents", latents)):
        if t is not None and not torch.isfinite(t).all():
            raise UserError(f"{name} contain NaN or Inf; check the text encoder / the noise you pass")


def conditioning_inputs(manifest: ExportManifest, text_embeds) -> dict[str, torch.Tensor]:
    """A request's conditioning by the folder's input names: one tensor for a one-input folder, else a
    mapping holding exactly the folder's names (what is missing or unknown is named)."""
    names = manifest.conditioning
    if not isinstance(text_embeds, Mapping):
        if len(names) != 1:
            raise UserError(f"this export folder takes the conditioning inputs {list(names)}; pass a mapping "
                            "name -> tensor, not one tensor")
        return {names[0]: text_embeds}
    missing = [n for n in names if n not in text_embeds]
    unknown = [n for n in text_embeds if n not in names]
    if missing or unknown:
        raise UserError(f"conditioning: missing {missing}, unknown {unknown}; this export folder takes {list(names)}")
    return {n: text_embeds[n] for n in names}
