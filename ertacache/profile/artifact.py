"""The profile folder: what calibration decided, in a form later stages can trust.

    profile.json             schedule, sigma tables, phi, predictor, provenance, per-step statistics
    correction.safetensors   per-step, per-branch, per-channel correction tables "a" and "b", and the
                             predictor's weights "pred_w" (T, K, Dw) and bias "pred_b" (T, Db)
    error_profile.png        per-step errors with the schedule marked

Schema 2 added the predictor (``profile.json["predictor"]`` and the two tables). A schema-1
profile (the paper's reuse only) still loads: it is read as the reuse predictor (K = 1, weight 1),
which is exactly what it meant. Older code refuses a schema-2 profile by its version number.
Schema 3 is a two-expert model's profile (Wan2.2 A14B): schema 2 plus ``profile.json["experts"]``
(each expert's first step, CFG scale and the switch). Only such profiles are written as 3, so
code that predates experts refuses them by their version instead of running one expert for all.

A profile is only valid for the model, step count, shift and latent shape it
was made for; :meth:`Profile.check_matches` refuses anything else with a
message naming both sides.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ertacache.errors import ProfileError, UserError, brief
from ertacache.io import atomic_directory, sha256_file
from ertacache.limits import MAX_HISTORY, MAX_STEPS
from ertacache.models.experts import Experts
from ertacache.models.family import CFG, GUIDANCE_MODES, guidance_branches
from ertacache.sampling.sampler import check_empty_slots, validate_mask
from ertacache.sampling.sigmas import validate_sigma_table
from ertacache.sampling.steps import StepTables

SCHEMA_VERSION = 2
#: the schema of a two-expert profile (only those: a one-expert profile stays readable by older code)
EXPERTS_SCHEMA_VERSION = 3
#: schema versions this code reads (1: before the predictor; read as reuse)
READABLE_SCHEMAS = (1, 2, 3)
PROFILE_JSON = "profile.json"
CORRECTION_FILE = "correction.safetensors"
PLOT_FILE = "error_profile.png"

#: profile.json fields and their JSON types; checked on load before anything is used
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "model": str,
    "model_fingerprint": str,
    "steps": int,
    "shift": (int, float),
    "height": int,
    "width": int,
    "frames": (int, type(None)),  # null for an image family
    "latent_shape": list,
    "guidance_scale": (int, float),
    "n_branches": int,
    "lambda": (int, float),
    "mask": list,
    "nominal_sigmas": list,
    "sigmas": list,
    "phi": list,
    "config": dict,
    "calibration": dict,
    "correction": dict,
}
#: one sample's latent axes, by whether the model makes video
AXES = {True: "C, F', H', W'", False: "C, H', W'"}
#: the largest profile.json read (a profile is kilobytes; this refuses a substituted huge file early)
MAX_PROFILE_JSON_BYTES = 64 << 20
#: correction coefficients a, b beyond this are not a fit of a bounded error (a corrupt or hostile table)
MAX_CORRECTION = 1e4


def is_profile_folder(path: Path) -> bool:
    """What ``--force`` may replace: a folder holding a profile.json (never another folder or a file)."""
    return (Path(path) / PROFILE_JSON).is_file()


@dataclass
class Profile:
    """An ERTACache profile (see the module docstring for the folder layout)."""

    model: str
    model_fingerprint: str
    steps: int
    shift: float
    height: int
    width: int
    frames: int | None  # None for an image family
    latent_shape: list[int]  # one sample's latents in the family's layout: (C, F', H', W') video, (C, H', W') image
    guidance_scale: float
    n_branches: int
    lam: float
    mask: list[bool]
    nominal_sigmas: list[float]
    sigmas: list[float]
    phi: list[float]
    corr_a: torch.Tensor  # (T, nb, C)
    corr_b: torch.Tensor  # (T, nb, C)
    config: dict[str, Any]
    calibration: dict[str, Any]
    stats: dict[str, list[float]] = field(default_factory=dict)
    speedup_target: float | None = None
    pred_w: torch.Tensor | None = None  # (T, K, Dw); None: reuse (T, 1, 1) ones
    pred_b: torch.Tensor | None = None  # (T, Db); None: zeros
    predictor: dict[str, Any] = field(default_factory=lambda: {"kind": "reuse", "order": 0, "history": 1})
    #: the model family's guidance mode (ertacache.models.family): "cfg" (profiles before it was recorded), ...
    guidance: str = CFG
    #: a two-expert model's step -> expert table and CFG scales (None: one transformer)
    experts: Experts | None = None

    def __post_init__(self):
        if self.pred_w is None:
            self.pred_w = torch.ones(self.steps, 1, 1)
        if self.pred_b is None:
            self.pred_b = torch.zeros(self.steps, 1)

    @property
    def schema_version(self) -> int:
        return EXPERTS_SCHEMA_VERSION if self.experts is not None else SCHEMA_VERSION

    @property
    def expert_starts(self) -> tuple[int, ...]:
        """Each expert's first step ((0,) for one transformer): where the residual history restarts."""
        return (0,) if self.experts is None else self.experts.starts

    @property
    def history(self) -> int:
        """K: the full-step residuals the cached step reads."""
        return int(self.pred_w.shape[1])

    @property
    def full_steps(self) -> int:
        return int(sum(self.mask))

    @property
    def speedup_steps(self) -> float:
        """T / N_full: the speedup if a cached step cost nothing."""
        return self.steps / self.full_steps

    def tables(self) -> StepTables:
        return StepTables(self.sigmas, self.corr_a, self.corr_b, pred_w=self.pred_w, pred_b=self.pred_b)

    def shape_key(self) -> dict[str, int]:
        return {"height": self.height, "width": self.width, "frames": self.frames}

    def check_matches(
        self,
        model: str | None = None,
        fingerprint: str | None = None,
        steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        frames: int | None = None,
        where: str = "this profile",
    ) -> None:
        """Refuse use with another model, weights, step count or shape; None skips a check."""
        checks = [
            ("model", model, self.model),
            ("model fingerprint (weights)", fingerprint, self.model_fingerprint),
            ("steps", steps, self.steps),
            ("height", height, self.height),
            ("width", width, self.width),
            ("frames", frames, self.frames),
        ]
        for name, wanted, have in checks:
            if name.startswith("model fingerprint") and wanted is not None and wanted != have:
                # no flag sets the weights: name both ids and what to do, not "the conflicting flag"
                raise ProfileError(
                    f"{where} was made for other weights: profile fingerprint {have}, loaded model {wanted} "
                    f"(the fingerprint hashes weight names, shapes and values, not the folder); load the weights "
                    f"the profile was made from, or re-run ertacache-profile on these"
                )
            if wanted is not None and wanted != have:
                raise ProfileError(
                    f"{where} was made for {name} = {have!r}, but {wanted!r} was requested; "
                    f"re-run ertacache-profile for the new setting or drop the conflicting flag"
                )

    # ---- serialisation -------------------------------------------------------------------------

    def to_json(self, correction_sha256: str) -> dict[str, Any]:
        d = {
            "schema_version": self.schema_version,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "steps": self.steps,
            "shift": self.shift,
            "height": self.height,
            "width": self.width,
            "frames": self.frames,
            "latent_shape": list(self.latent_shape),
            "guidance_scale": self.guidance_scale,
            "n_branches": self.n_branches,
            "lambda": self.lam,
            "speedup_target": self.speedup_target,
            "full_steps": self.full_steps,
            "mask": [bool(m) for m in self.mask],
            "nominal_sigmas": [float(s) for s in self.nominal_sigmas],
            "sigmas": [float(s) for s in self.sigmas],
            "phi": [float(p) for p in self.phi],
            "config": self.config,
            "calibration": self.calibration,
            "stats": {k: [float(x) for x in v] for k, v in self.stats.items()},
            "correction": {"file": CORRECTION_FILE, "sha256": correction_sha256,
                           "shape": list(self.corr_a.shape), "keys": ["a", "b", "pred_w", "pred_b"],
                           "pred_w_shape": list(self.pred_w.shape), "pred_b_shape": list(self.pred_b.shape)},
            "predictor": self.predictor,
            "guidance": self.guidance,
        }
        if self.experts is not None:
            d["experts"] = self.experts.to_json()
        return d

    def save(self, out_dir: str | os.PathLike, force: bool = False, plot: bool = True) -> Path:
        """Write the folder atomically: a killed run leaves no half profile."""
        with atomic_directory(out_dir, force=force, what="profile folder", recognise=is_profile_folder) as tmp:
            tables = {"a": self.corr_a.contiguous(), "b": self.corr_b.contiguous(),
                      "pred_w": self.pred_w.float().contiguous(), "pred_b": self.pred_b.float().contiguous()}
            save_file(tables, str(tmp / CORRECTION_FILE),
                      metadata={"format": "ertacache-correction", "schema_version": str(self.schema_version)})
            meta = self.to_json(sha256_file(tmp / CORRECTION_FILE))
            (tmp / PROFILE_JSON).write_text(json.dumps(meta, indent=1, allow_nan=False))  # NaN is not JSON
            if plot:
                from ertacache.profile.plot import plot_profile

                plot_profile(self, tmp / PLOT_FILE)
        return Path(out_dir)


def _fail(path: Path, problem: str) -> ProfileError:
    return ProfileError(f"profile {path}: {problem}; re-create it with ertacache-profile --out {path} --force")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise ProfileError(f"profile folder {path} does not exist; create it with ertacache-profile --out {path}")
    file = path / PROFILE_JSON
    if not file.is_file():
        raise _fail(path, f"no {PROFILE_JSON} in the folder")
    if file.is_symlink():
        raise _fail(path, f"{PROFILE_JSON} is a symbolic link")
    if file.stat().st_size > MAX_PROFILE_JSON_BYTES:
        raise _fail(path, f"{PROFILE_JSON} is {file.stat().st_size} bytes, not a profile")
    try:
        meta = json.loads(file.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _fail(path, f"{PROFILE_JSON} is corrupt or truncated ({brief(str(e), 120)})") from None
    if not isinstance(meta, dict):
        raise _fail(path, f"{PROFILE_JSON} is not a JSON object")
    if meta.get("schema_version") not in READABLE_SCHEMAS:
        raise _fail(path, f"schema_version {brief(meta.get('schema_version'), 40)} is not one this ertacache reads "
                          f"{READABLE_SCHEMAS} (made by another ertacache version)")
    if meta["schema_version"] == 1:  # before the predictor: the paper's reuse, which is what it meant
        meta.setdefault("predictor", {"kind": "reuse", "order": 0, "history": 1, "migrated_from_schema": 1})
    for key, typ in _REQUIRED.items():
        if key not in meta:
            raise _fail(path, f"{PROFILE_JSON} lacks the field {key!r}")
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool) and typ in (int, (int, float)):
            raise _fail(path, f"field {key!r} has the wrong type ({type(meta[key]).__name__})")
    return meta


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (a non-finite number)")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_fields(path: Path, meta: dict[str, Any]) -> None:
    """Values in range, lists of the right element type, optional fields of the right type."""
    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise _fail(path, problem)

    need(1 <= meta["steps"] <= MAX_STEPS, f"steps must be in [1, {MAX_STEPS}], got {meta['steps']}")
    for key in ("height", "width"):
        need(meta[key] >= 1, f"{key} must be >= 1, got {meta[key]}")
    video = meta["frames"] is not None  # frames is null for an image family
    need(not video or (not isinstance(meta["frames"], bool) and meta["frames"] >= 1),
         f"frames must be >= 1 (or null for an image model), got {meta['frames']}")
    shape, rank = meta["latent_shape"], (4 if video else 3)
    need(len(shape) == rank and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape),
         f"latent_shape must be {rank} positive integers ({AXES[video]}), got {brief(shape, 60)}")
    need(_finite(meta["shift"]) and meta["shift"] > 0, f"shift must be a finite number > 0, got {meta['shift']}")
    need(_finite(meta["lambda"]) and meta["lambda"] >= 0, f"lambda must be a finite number >= 0, got {meta['lambda']}")
    g = meta["guidance_scale"]
    need(_finite(g) and g >= 0, f"guidance_scale must be a finite number >= 0, got {g}")
    need(meta["n_branches"] in (1, 2), f"n_branches must be 1 or 2, got {meta['n_branches']}")
    mode = meta.get("guidance", CFG)  # absent before the family recorded it: those profiles are all CFG
    need(mode in GUIDANCE_MODES, f"guidance must be one of {GUIDANCE_MODES}, got {brief(mode, 40)}")
    need(meta["n_branches"] == guidance_branches(mode, g),
         f"n_branches {meta['n_branches']} disagrees with guidance_scale {g} and guidance {mode!r} "
         "(two branches exactly with CFG above guidance 1)")
    for key in ("phi",):
        need(all(_finite(p) and 0.0 <= p <= 1.5 for p in meta[key]), f"{key!r} must be numbers in [0, 1.5]")
    for key in ("nominal_sigmas", "sigmas"):
        need(all(_finite(x) for x in meta[key]), f"{key!r} must be finite numbers")
    target = meta.get("speedup_target")
    need(target is None or (_finite(target) and target >= 1.0), f"speedup_target must be null or >= 1, got "
                                                                 f"{brief(target, 40)}")
    stats = meta.get("stats", {})
    need(isinstance(stats, dict) and all(isinstance(v, list) and all(_finite(x) for x in v) for v in stats.values()),
         "'stats' must map names to lists of finite numbers")
    calibration = meta["calibration"]
    negative = calibration.get("negative_prompt", "")
    need(isinstance(negative, str), f"calibration.negative_prompt must be a string, got {type(negative).__name__}")
    prompts = calibration.get("prompts", [])
    need(isinstance(prompts, list) and all(isinstance(p, str) for p in prompts),
         "calibration.prompts must be a list of strings")
    need(isinstance(meta["correction"].get("sha256"), str), "correction.sha256 must be a string")
    predictor = meta.get("predictor")
    need(isinstance(predictor, dict) and isinstance(predictor.get("kind"), str)
         and isinstance(predictor.get("history"), int) and not isinstance(predictor.get("history"), bool)
         and 1 <= predictor["history"] <= MAX_HISTORY,
         f"'predictor' must be an object with a 'kind' and a 'history' in [1, {MAX_HISTORY}], got "
         f"{brief(predictor, 80)}")


def _validate_tables(path: Path, meta: dict[str, Any]) -> None:
    steps = meta["steps"]
    if steps < 1:
        raise _fail(path, f"steps must be >= 1, got {steps}")
    for key in ("mask", "phi"):
        if len(meta[key]) != steps:
            raise _fail(path, f"{key!r} has {len(meta[key])} entries for {steps} steps")
    if not all(isinstance(m, bool) for m in meta["mask"]) or not meta["mask"][0]:
        raise _fail(path, "'mask' must be booleans with the first step true (full compute)")
    for key in ("nominal_sigmas", "sigmas"):
        try:
            validate_sigma_table(meta[key], steps, what=f"{key!r}")
        except Exception as e:  # UserError with the precise reason
            raise _fail(path, str(e)) from None
    if meta["schema_version"] == EXPERTS_SCHEMA_VERSION:
        _validate_experts(path, meta)


def _validate_experts(path: Path, meta: dict[str, Any]) -> Experts:
    """A schema-3 profile's experts: well-formed, the switch where the nominal sigmas put it, the mask rule per expert.

    The starts are re-derived from the nominal table and the boundary, so an edited start (which would run a
    step on the other transformer than the pipeline does) is refused, not trusted.
    """
    raw = meta.get("experts")
    try:
        experts = Experts.from_json(raw)
        ok = (experts.count == 2 and experts.boundary_ratio is not None
              and all(_finite(g) and g >= 0 for g in experts.guidance_scales))
    except (TypeError, KeyError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise _fail(path, f"'experts' must hold two experts' 'starts', 'guidance_scales' and a 'boundary_ratio' in "
                          f"(0, 1), got {brief(raw, 80)}")
    try:
        derived = Experts.from_boundary(meta["nominal_sigmas"], experts.boundary_ratio, experts.guidance_scales)
    except Exception as e:  # UserError: the switch leaves one expert without a step
        raise _fail(path, str(e)) from None
    if derived.starts != experts.starts:
        raise _fail(path, f"'experts.starts' {list(experts.starts)} disagrees with the switch the nominal sigmas and "
                          f"boundary {experts.boundary_ratio:g} give ({list(derived.starts)})")
    try:
        validate_mask(meta["mask"], meta["steps"], experts.starts)
    except Exception as e:  # UserError naming the rule
        raise _fail(path, str(e)) from None
    return experts


def _load_correction(path: Path, meta: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    file = path / CORRECTION_FILE
    if not file.is_file():
        raise _fail(path, f"{CORRECTION_FILE} is missing")
    expected = meta["correction"].get("sha256")
    if expected != sha256_file(file):
        raise _fail(path, f"{CORRECTION_FILE} does not match the sha256 in {PROFILE_JSON} (modified or truncated)")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise _fail(path, f"{CORRECTION_FILE} is unreadable ({e})") from None
    shape = (meta["steps"], meta["n_branches"], meta["latent_shape"][0])
    for key in ("a", "b"):
        if key not in tensors or tuple(tensors[key].shape) != shape:
            got = tuple(tensors[key].shape) if key in tensors else "missing"
            raise _fail(path, f"correction table {key!r} should be {shape}, got {got}")
        if not tensors[key].is_floating_point():
            raise _fail(path, f"correction table {key!r} is {tensors[key].dtype}, not floating point")
        table = tensors[key].float()
        if not torch.isfinite(table).all():
            bad = int((~torch.isfinite(table)).any(dim=(1, 2)).nonzero()[0])
            raise _fail(path, f"correction table {key!r} holds NaN or Inf (first at step {bad})")
        if table.abs().max() > MAX_CORRECTION:
            raise _fail(path, f"correction table {key!r} holds values beyond +-{MAX_CORRECTION:g}")
    pred = _load_predictor(path, meta, tensors)
    return tensors["a"].float(), tensors["b"].float(), *pred


def _load_predictor(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """(pred_w, pred_b) from the correction file; a schema-1 file has none: the reuse predictor."""
    steps, history = meta["steps"], meta["predictor"]["history"]
    if meta["schema_version"] == 1:
        return torch.ones(steps, 1, 1), torch.zeros(steps, 1)
    out = []
    for key, ndim in (("pred_w", 3), ("pred_b", 2)):
        if key not in tensors:
            raise _fail(path, f"{CORRECTION_FILE} lacks the predictor table {key!r}")
        t = tensors[key]
        ok = (t.ndim == ndim and t.shape[0] == steps and t.is_floating_point()
              and (key != "pred_w" or t.shape[1] == history))
        if not ok:
            raise _fail(path, f"predictor table {key!r} is {tuple(t.shape)} {t.dtype}; expected ({steps}, "
                              f"{history if key == 'pred_w' else 'channels'}, ...) floating point")
        t = t.float()
        if not torch.isfinite(t).all() or t.abs().max() > MAX_CORRECTION:
            raise _fail(path, f"predictor table {key!r} holds NaN, Inf or values beyond +-{MAX_CORRECTION:g}")
        out.append(t)
    return tuple(out)


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile folder; every defect raises ProfileError naming it."""
    path = Path(path)
    meta = _read_json(path)
    _validate_fields(path, meta)
    _validate_tables(path, meta)
    corr_a, corr_b, pred_w, pred_b = _load_correction(path, meta)
    starts = Experts.from_json(meta["experts"]).starts if meta["schema_version"] == EXPERTS_SCHEMA_VERSION else (0,)
    try:
        check_empty_slots(pred_w, meta["mask"], starts)
    except UserError as e:
        raise _fail(path, str(e)) from None
    return Profile(
        model=meta["model"],
        model_fingerprint=meta["model_fingerprint"],
        steps=meta["steps"],
        shift=float(meta["shift"]),
        height=meta["height"],
        width=meta["width"],
        frames=meta["frames"],
        latent_shape=list(meta["latent_shape"]),
        guidance_scale=float(meta["guidance_scale"]),
        n_branches=meta["n_branches"],
        lam=float(meta["lambda"]),
        mask=list(meta["mask"]),
        nominal_sigmas=[float(s) for s in meta["nominal_sigmas"]],
        sigmas=[float(s) for s in meta["sigmas"]],
        phi=[float(p) for p in meta["phi"]],
        corr_a=corr_a,
        corr_b=corr_b,
        config=meta["config"],
        calibration=meta["calibration"],
        stats={k: list(v) for k, v in meta.get("stats", {}).items()},
        speedup_target=meta.get("speedup_target"),
        pred_w=pred_w,
        pred_b=pred_b,
        predictor=dict(meta["predictor"]),
        guidance=meta.get("guidance", CFG),
        experts=Experts.from_json(meta["experts"]) if meta["schema_version"] == EXPERTS_SCHEMA_VERSION else None,
    )

