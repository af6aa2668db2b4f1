"""The contract between an export folder and everything that reads it, in one place.

Export writes a folder; engines, the runtime, Triton serving and outside tools read it. What
they must agree on lives here, and only here:

    graph names        FULL_STEP, CACHED_STEP, VAE_DECODE; expert_graph(g, e) for a second expert's pair
    tensor names       STEP_INPUTS, FULL_OUTPUTS, cached_inputs(K), ... (the runtime binds by name)
    tensor specs       TensorSpec / GraphSpec (static shape + dtype name of each graph input/output)
    dtype tables       TENSOR_DTYPES (manifest names -> torch), MODEL_DTYPES (fp32/fp16/bf16 -> torch)
    the loop           LOOP: ``for i in range(steps): full_step if mask[i] else cached_step``
    the manifest       ExportManifest: manifest.json read into typed, validated fields

Why a top-level module: ``ertacache.export`` (which writes folders) validates its graphs with the
engines' loaders, and the engines, the runtime and serving read folders; when the contract lived
in ``export.graphs``, engines imported export and export imported engines (a cycle), and serving
imported export's private helpers. Now export, engines, runtime and serving all import this
module, and it imports nothing of theirs (only ``errors`` and ``io``).

Every read of a manifest goes through :meth:`ExportManifest.load` (or :func:`load_manifest`),
which checks, before anything uses a value:

1. the JSON is an object of the right format and schema version, with every field of the right
   type (a ``files`` that is a list, a graph spec without a shape, a mask of strings... are
   refused with a message naming the field, never a traceback later);
2. every path in it (``files``, the graph files of each target, the profile folder) is relative,
   normalised and inside the folder: no ``..``, no absolute path, no symlink anywhere in the folder;
3. every file in the folder is listed in ``files`` (so any file a backend reads is hashed),
   every graph file a target names is one of them, and (``verify_files``) each one's size and
   sha256 match;
4. the schedule is self-consistent (steps, mask, sigma table, phi, the predictor's history K with
   K full steps before the first cached one) and the step graphs have the contract's I/O for that
   K (every residual slot of cached_step has the spec of full_step's residual_out).

The cached step reads K residual slots (K = ``profile.history`` in the manifest, 1 for the
paper's reuse), the newest first:

    cached_step(latents, step, text_embeds, guidance_scale, residual, residual_1, ..., residual_{K-1})

``residual`` is ``residual_out`` of the last full step and ``residual_k`` the one k full steps
before it (:func:`residual_slots`). With K = 1 the names are exactly those of schema 1.

Schema history: 2 added the predictor (``profile.history``, ``profile.predictor``, the K slots).
A schema-1 folder cannot be migrated (its graphs are baked); it is refused with the fix: re-export.
3 is a two-expert folder (Wan2.2 A14B), and only such a folder is written as 3: ``profile.experts``
(each expert's first step, CFG scale, and the boundary) and a graph pair per expert
(:func:`expert_graph`: ``full_step_2``, ``cached_step_2`` for the second, I/O identical to the
first's). The reader re-derives the switch from the nominal sigmas and the boundary and refuses a
folder whose ``starts`` disagree (an edited start would run a step on the other transformer), and
the mask rule holds per expert (each opens with K full steps). One-transformer folders stay schema
2, readable by older ertacache; an older ertacache refuses schema 3 instead of running expert 0
for every step.

:func:`folder_digest` is the sha256 of ``manifest.json`` itself; since the manifest holds the
sha256 of every other file and every file must be listed, this one value pins the whole folder
(``--expect-digest`` on run / verify / build / ertacache-triton).

Trust model: the sha256 entries detect corruption and accidental edits, not malice (whoever can
replace a file can rehash the manifest). Export folders and Triton repositories are executable
artifacts (an AOTInductor ``.pt2`` holds a shared library that runs when loaded); take them only
from sources you trust, and pin the digest you built.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ertacache.errors import UserError
from ertacache.io import sha256_file
from ertacache.limits import MAX_HISTORY, MAX_STEPS
from ertacache.models.experts import Experts, segments
from ertacache.models.family import CFG, GUIDANCE_MODES, guidance_branches

FULL_STEP = "full_step"
CACHED_STEP = "cached_step"
VAE_DECODE = "vae_decode"
STEP_GRAPHS = (FULL_STEP, CACHED_STEP)
GRAPHS = (FULL_STEP, CACHED_STEP, VAE_DECODE)

TEXT_EMBEDS = "text_embeds"
#: the conditioning inputs of a folder that does not record them (every folder before the model family
#: did): Wan's one text tensor. A family's own list is ``ModelFamily.input_names`` (ertacache.models.family).
DEFAULT_CONDITIONING = (TEXT_EMBEDS,)
#: the step graphs' own inputs around the conditioning tensors
LATENTS, STEP, GUIDANCE_SCALE = "latents", "step", "guidance_scale"


def step_inputs(conditioning: Sequence[str] = DEFAULT_CONDITIONING) -> tuple[str, ...]:
    """full_step's input names in call order: latents, step, the family's conditioning tensors, guidance_scale."""
    return (LATENTS, STEP, *conditioning, GUIDANCE_SCALE)


STEP_INPUTS = step_inputs()
FULL_OUTPUTS = ("latents_out", "residual_out")
RESIDUAL = "residual"
CACHED_OUTPUTS = ("latents_out",)
DECODE_INPUTS = ("latents",)
DECODE_OUTPUTS = ("frames",)


def residual_slots(history: int = 1) -> tuple[str, ...]:
    """The cached step's K residual inputs, newest first: ``residual``, ``residual_1``, ..., ``residual_{K-1}``.

    ``residual_k`` is ``residual_out`` of the full step k full steps before the newest one.
    """
    if isinstance(history, bool) or not isinstance(history, int) or not 1 <= history <= MAX_HISTORY:
        raise ValueError(f"history (K) must be an integer in [1, {MAX_HISTORY}], got {history!r}")
    return (RESIDUAL,) + tuple(f"{RESIDUAL}_{k}" for k in range(1, history))


def cached_inputs(history: int = 1, conditioning: Sequence[str] = DEFAULT_CONDITIONING) -> tuple[str, ...]:
    """cached_step's input names in call order for a predictor over K residuals."""
    return step_inputs(conditioning) + residual_slots(history)


def io_names(graph: str, history: int = 1,
             conditioning: Sequence[str] = DEFAULT_CONDITIONING) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input names in call order, output names in return order) of ``graph`` for history K and the
    model family's conditioning inputs."""
    if graph == CACHED_STEP:
        return cached_inputs(history, conditioning), CACHED_OUTPUTS
    if graph == FULL_STEP:
        return step_inputs(conditioning), FULL_OUTPUTS
    return IO_NAMES[graph]


#: cached_step's inputs with the paper's reuse (K = 1): the schema-1 names, unchanged
CACHED_INPUTS = cached_inputs(1)
#: graph -> (input names in call order, output names in return order), for K = 1 (see :func:`io_names`)
IO_NAMES = {FULL_STEP: (STEP_INPUTS, FULL_OUTPUTS), CACHED_STEP: (CACHED_INPUTS, CACHED_OUTPUTS),
            VAE_DECODE: (DECODE_INPUTS, DECODE_OUTPUTS)}

LOOP = "for i in range(steps): full_step if mask[i] else cached_step"
#: the loop of a two-expert folder (Wan2.2 A14B): the graph pair of the step's expert
EXPERTS_LOOP = ("for i in range(steps): e = expert of step i (profile.experts.starts); "
                "full_step[_e] if mask[i] else cached_step[_e], with guidance_scales[e]")


def expert_graph(graph: str, expert: int) -> str:
    """The name of ``graph`` (full_step / cached_step) for expert ``expert`` (0-based).

    Expert 0 keeps the plain names, so a one-transformer folder is unchanged; expert 1 (Wan2.2
    A14B's low-noise ``transformer_2``) gets diffusers' suffix: ``full_step_2``, ``cached_step_2``.
    """
    if graph not in STEP_GRAPHS:
        raise ValueError(f"only the step graphs {list(STEP_GRAPHS)} exist per expert, not {graph!r}")
    return graph if expert == 0 else f"{graph}_{expert + 1}"


def graph_role(name: str) -> tuple[str, int]:
    """(base graph, expert) of a graph name: ``cached_step_2`` -> (``cached_step``, 1); unknown -> (name, 0)."""
    for base in STEP_GRAPHS:
        suffix = name[len(base) + 1:]
        if name.startswith(base + "_") and suffix.isdigit() and int(suffix) >= 2 and str(int(suffix)) == suffix:
            return base, int(suffix) - 1
    return name, 0


def step_graph_names(experts: int = 1) -> tuple[str, ...]:
    """Every step graph of a folder with ``experts`` experts: full_step, cached_step[, full_step_2, cached_step_2]."""
    return tuple(expert_graph(g, e) for e in range(experts) for g in STEP_GRAPHS)

#: tensor dtype names in manifests <-> torch
TENSOR_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int64": torch.int64, "uint8": torch.uint8}
DTYPE_NAMES = {v: k for k, v in TENSOR_DTYPES.items()}
#: model precision names (--dtype, manifest "dtype") -> torch
MODEL_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

MANIFEST = "manifest.json"
FORMAT = "ertacache-export"
SCHEMA_VERSION = 2
#: a two-expert folder (Wan2.2 A14B: a graph pair per expert, ``profile.experts``). Only such folders
#: carry it, so one-transformer folders stay readable by older ertacache and an older ertacache refuses
#: a two-expert folder by version instead of running expert 0 for every step.
EXPERTS_SCHEMA_VERSION = 3
#: what each older schema lacks, for the refusal (graphs are baked: no migration, a re-export)
_OLD_SCHEMAS = {1: "before the multi-residual predictor: its cached_step reads one residual slot and the manifest "
                   "records no predictor"}
#: the largest manifest.json read (a manifest is kilobytes; this refuses a substituted huge file early)
MAX_MANIFEST_BYTES = 64 << 20


@dataclass(frozen=True)
class TensorSpec:
    """One named graph input or output: static shape and dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "TensorSpec":
        return cls(name, tuple(int(s) for s in t.shape), DTYPE_NAMES[t.dtype])

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @property
    def torch_dtype(self) -> torch.dtype:
        return TENSOR_DTYPES[self.dtype]


@dataclass(frozen=True)
class GraphSpec:
    """The I/O contract of one graph."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for s in (*self.inputs, *self.outputs):
            if s.name == name:
                return s
        raise KeyError(f"graph {self.name!r} has no tensor {name!r}")

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [s.to_json() for s in self.inputs], "outputs": [s.to_json() for s in self.outputs]}


# ---- typed reading -------------------------------------------------------------------------------------------

class ManifestError(UserError):
    """A manifest.json that is malformed, inconsistent, or does not match its folder's files."""


class _Reader:
    """Type-checked access to one JSON object; every refusal names the field path and the fix."""

    def __init__(self, fail: Callable[[str], ManifestError]):
        self.fail = fail

    def obj(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(f"{where} must be a JSON object, got {_kind(value)}")
        return value

    def get(self, d: dict, key: str, where: str) -> Any:
        if key not in d:
            raise self.fail(f"{where} lacks the field {key!r}")
        return d[key]

    def int(self, value: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(f"{where} must be an integer, got {_kind(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.fail(f"{where} is {value}, outside [{lo}, {hi}]")
        return value

    def num(self, value: Any, where: str) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise self.fail(f"{where} must be a finite number, got {_short(value)}")
        return float(value)

    def str(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(f"{where} must be a string, got {_kind(value)}")
        return value

    def opt_str(self, value: Any, where: str) -> str | None:
        return None if value is None else self.str(value, where)

    def list(self, value: Any, where: str, item: Callable[[Any, str], Any]) -> list:
        if not isinstance(value, list):
            raise self.fail(f"{where} must be a JSON list, got {_kind(value)}")
        return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]

    def bool(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(f"{where} must be true or false, got {_kind(value)}")
        return value

    def shape(self, value: Any, where: str) -> tuple[int, ...]:
        return tuple(self.list(value, where, lambda v, w: self.int(v, w, 0, 1 << 40)))


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def safe_relpath(rel: Any, what: str = "path") -> str:
    """``rel`` as a normalised relative posix path inside its folder; raises ValueError otherwise."""
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{what} must be a non-empty string, got {_kind(rel)}")
    if "\\" in rel or "\x00" in rel:
        raise ValueError(f"{what} {_short(rel)} contains a backslash or NUL")
    if rel.startswith("/") or posixpath.isabs(rel) or (len(rel) > 1 and rel[1] == ":"):
        raise ValueError(f"{what} {_short(rel)} is absolute; paths in a manifest are relative to the folder")
    norm = posixpath.normpath(rel)
    if norm != rel or norm in (".", "..") or norm.startswith("../") or "/../" in f"/{norm}/":
        raise ValueError(f"{what} {_short(rel)} is not a normalised path inside the folder")
    return norm


@dataclass(frozen=True)
class ModelRef:
    id: str
    fingerprint: str
    cls: str
    path: str | None


@dataclass(frozen=True)
class Schedule:
    """The profile the graphs were baked from, as the manifest records it (checked against ``profile/``)."""

    folder: str
    steps: int
    shift: float
    lam: float
    guidance_scale: float
    n_branches: int
    mask: tuple[bool, ...]
    sigmas: tuple[float, ...]
    nominal_sigmas: tuple[float, ...]
    phi: tuple[float, ...]
    #: K: the full-step residuals the cached step reads (its residual slots), newest first
    history: int = 1
    #: the profile's predictor as recorded (e.g. {"kind": "lagrange", "order": 2, "history": 3})
    predictor: Mapping[str, Any] = field(default_factory=lambda: {"kind": "reuse", "history": 1})
    #: the model family's guidance mode (absent from folders exported before it was recorded: all CFG)
    guidance: str = CFG
    #: a two-expert folder's step -> expert table and per-expert CFG scales (schema 3); None: one transformer
    experts: Experts | None = None

    @property
    def expert_count(self) -> int:
        return 1 if self.experts is None else self.experts.count

    @property
    def expert_starts(self) -> tuple[int, ...]:
        """Each expert's first step ((0,) for one transformer): where the residual history restarts."""
        return (0,) if self.experts is None else self.experts.starts

    def expert(self, step: int) -> int:
        """The expert whose graph pair runs ``step`` (0 for a one-transformer folder)."""
        return 0 if self.experts is None else self.experts.expert(step)

    @property
    def guidance_scales(self) -> tuple[float, ...]:
        """One CFG scale per expert (the profile's; a request may override them)."""
        return (self.guidance_scale,) if self.experts is None else self.experts.guidance_scales

    @property
    def full_steps(self) -> int:
        return sum(self.mask)

    @property
    def residual_slots(self) -> tuple[str, ...]:
        return residual_slots(self.history)


@dataclass(frozen=True)
class Shapes:
    batch_size: int
    height: int
    width: int
    frames: int | None  # None for an image family
    latents: tuple[int, ...]
    text_embeds: tuple[int, ...] | None  # None for a family whose conditioning is not one text_embeds tensor
    residual: tuple[int, ...]


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ExportManifest:
    """manifest.json, read and validated (see the module docstring); ``data`` is the JSON as read.

    Indexing (``manifest["profile"]["steps"]``) reads ``data``, for tools that print or pass on
    the JSON; code that acts on a value uses the typed fields.
    """

    root: Path
    data: Mapping[str, Any] = field(repr=False)
    digest: str
    schema_version: int
    model: ModelRef
    text_encoder: Mapping[str, Any]
    negative_prompt: str
    schedule: Schedule
    shapes: Shapes
    dtype: str
    opset: int | None
    backends: tuple[str, ...]
    targets: Mapping[str, Any]
    graphs: Mapping[str, GraphSpec]
    files: Mapping[str, FileEntry]
    versions: Mapping[str, str | None]
    #: the model family's conditioning inputs, in graph-input order (absent from older folders: Wan's text_embeds)
    conditioning: tuple[str, ...] = DEFAULT_CONDITIONING

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def torch_dtype(self) -> torch.dtype:
        return MODEL_DTYPES[self.dtype]

    @property
    def has_decode(self) -> bool:
        return VAE_DECODE in self.graphs

    @property
    def profile_dir(self) -> Path:
        return self.root / self.schedule.folder

    def spec(self, graph: str, name: str) -> TensorSpec:
        return self.graphs[graph].tensor(name)

    def graph_files(self, target: str) -> dict[str, Path]:
        """graph -> absolute path of ``target``'s artifact (onnx, aoti, tensorrt), each checked on load."""
        return {g: self.root / rel for g, rel in _target_files(self.targets, target).items()}

    # ---- reading -------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, root: str | os.PathLike, verify_files: bool = True,
             expect_digest: str | None = None) -> "ExportManifest":
        """Read ``root/manifest.json`` and check it (module docstring, points 1-4)."""
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise UserError(f"{root} is not an export folder (not a folder); create one with ertacache-export")
        if not path.is_file():
            raise UserError(f"{root} is not an export folder (no {MANIFEST}); create one with ertacache-export")
        fail = _failer(root)
        if path.is_symlink():
            raise fail(f"{MANIFEST} is a symbolic link")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise fail(f"{MANIFEST} is {path.stat().st_size} bytes, not a manifest")
        raw = path.read_bytes()
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if expect_digest is not None:
            check_digest(expect_digest, digest, root)
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise fail(f"{MANIFEST} is corrupt ({_short(str(e), 120)})") from None
        manifest = cls.from_json(data, root, digest)
        check_folder_files(manifest, verify_files)
        return manifest

    @classmethod
    def from_json(cls, data: Any, root: Path, digest: str = "") -> "ExportManifest":
        fail = _failer(root)
        r = _Reader(fail)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise fail(f"{MANIFEST} is not an {FORMAT} manifest")
        version = data.get("schema_version")
        if type(version) is int and version in _OLD_SCHEMAS:
            raise fail(f"it was written by an older ertacache (manifest schema_version {version}, "
                       f"{_OLD_SCHEMAS[version]}; this version reads schema {SCHEMA_VERSION}). Its graphs are baked, "
                       "so it cannot be migrated: re-export it with this ertacache version (same flags as before)")
        if type(version) is not int or version not in (SCHEMA_VERSION, EXPERTS_SCHEMA_VERSION):
            raise fail(f"schema_version {_short(version)} is not {SCHEMA_VERSION} or {EXPERTS_SCHEMA_VERSION} "
                       "(written by another ertacache version)")
        m = r.obj(r.get(data, "model", "manifest"), "model")
        model = ModelRef(r.str(r.get(m, "id", "model"), "model.id"),
                         r.str(r.get(m, "fingerprint", "model"), "model.fingerprint"),
                         r.str(m.get("class", ""), "model.class"), r.opt_str(m.get("path"), "model.path"))
        enc = r.obj(r.get(data, "text_encoder", "manifest"), "text_encoder")
        negative = r.str(enc.get("negative_prompt", ""), "text_encoder.negative_prompt")
        schedule = _schedule(r, r.obj(r.get(data, "profile", "manifest"), "profile"), version)
        shapes = _shapes(r, r.obj(r.get(data, "shapes", "manifest"), "shapes"))
        dtype = r.str(r.get(data, "dtype", "manifest"), "dtype")
        if dtype not in MODEL_DTYPES:
            raise fail(f"dtype {_short(dtype)} is not one of {list(MODEL_DTYPES)}")
        opset = data.get("opset")
        if opset is not None:
            r.int(opset, "opset", 1, 1000)
        targets = r.obj(r.get(data, "targets", "manifest"), "targets")
        graphs = {name: _graph(r, name, spec) for name, spec in
                  r.obj(r.get(data, "graphs", "manifest"), "graphs").items()}
        files = _files(r, r.obj(r.get(data, "files", "manifest"), "files"))
        versions = r.obj(r.get(data, "versions", "manifest"), "versions")
        for k, v in versions.items():
            r.opt_str(v, f"versions.{k}")
        r.obj(r.get(data, "runtime", "manifest"), "runtime")
        backends = tuple(r.list(data.get("backends", []), "backends", r.str))
        out = cls(root, data, digest, version, model, enc, negative, schedule, shapes, dtype, opset, backends,
                  targets, graphs, files, versions, _conditioning(r, data))
        _check_contract(out, fail)
        return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (a non-finite number)")


def _failer(root: Path) -> Callable[[str], ManifestError]:
    def fail(problem: str) -> ManifestError:
        return ManifestError(f"export folder {root}: {problem}; re-export it with ertacache-export --out {root} "
                             "--force")
    return fail


def _experts(r: _Reader, p: dict, version: int, steps: int, nominal: Sequence[float],
             guidance_scale: float) -> Experts | None:
    """profile.experts of a schema-3 folder, re-derived from the nominal sigmas and the boundary (a moved start
    would run a step on the other transformer); refused in any other schema."""
    if version != EXPERTS_SCHEMA_VERSION:
        if "experts" in p:
            raise r.fail(f"profile.experts is only read in schema {EXPERTS_SCHEMA_VERSION} (two-expert) folders")
        return None
    e = r.obj(r.get(p, "experts", "profile"), "profile.experts")
    starts = tuple(r.list(r.get(e, "starts", "profile.experts"), "profile.experts.starts",
                          lambda v, w: r.int(v, w, 0, steps - 1)))
    scales = tuple(r.list(r.get(e, "guidance_scales", "profile.experts"), "profile.experts.guidance_scales", r.num))
    ratio = r.num(r.get(e, "boundary_ratio", "profile.experts"), "profile.experts.boundary_ratio")
    try:
        experts = Experts(starts, scales, ratio)
        derived = Experts.from_boundary(nominal, ratio, scales)
    except (ValueError, UserError) as err:
        raise r.fail(f"profile.experts: {err}") from None
    if experts.count != 2 or derived.starts != starts:
        raise r.fail(f"profile.experts.starts {list(starts)} disagrees with the switch the nominal sigmas and "
                     f"boundary_ratio {ratio:g} give ({list(derived.starts)})")
    if not math.isclose(scales[0], guidance_scale, rel_tol=1e-9):
        raise r.fail(f"profile.experts.guidance_scales[0] {scales[0]} differs from profile.guidance_scale "
                     f"{guidance_scale}")
    return experts


def _schedule(r: _Reader, p: dict, version: int = SCHEMA_VERSION) -> Schedule:
    steps = r.int(r.get(p, "steps", "profile"), "profile.steps", 1, MAX_STEPS)
    mask = tuple(r.list(r.get(p, "mask", "profile"), "profile.mask", r.bool))
    sigmas = tuple(r.list(r.get(p, "sigmas", "profile"), "profile.sigmas", r.num))
    nominal = tuple(r.list(p.get("nominal_sigmas", list(sigmas)), "profile.nominal_sigmas", r.num))
    phi = tuple(r.list(p.get("phi", [1.0] * steps), "profile.phi", r.num))
    nb = r.int(r.get(p, "n_branches", "profile"), "profile.n_branches", 1, 2)
    history = r.int(r.get(p, "history", "profile"), "profile.history", 1, MAX_HISTORY)
    predictor = r.obj(p.get("predictor", {"kind": "reuse", "history": history}), "profile.predictor")
    r.str(r.get(predictor, "kind", "profile.predictor"), "profile.predictor.kind")  # a string, whatever it names
    if predictor.get("history", history) != history:
        raise r.fail(f"profile.predictor.history {_short(predictor.get('history'))} differs from profile.history "
                     f"{history}")
    folder = p.get("folder", "profile")
    try:
        folder = safe_relpath(folder, "profile.folder")
    except ValueError as e:
        raise r.fail(str(e)) from None
    s = Schedule(folder, steps, r.num(r.get(p, "shift", "profile"), "profile.shift"),
                 r.num(p.get("lambda", 0.0), "profile.lambda"),
                 r.num(r.get(p, "guidance_scale", "profile"), "profile.guidance_scale"), nb, mask, sigmas, nominal,
                 phi, history, dict(predictor), r.str(p.get("guidance", CFG), "profile.guidance"))
    if len(nominal) == steps + 1:
        s = replace(s, experts=_experts(r, p, version, steps, nominal, s.guidance_scale))
    if s.guidance not in GUIDANCE_MODES:
        raise r.fail(f"profile.guidance {_short(s.guidance)} is not one of {list(GUIDANCE_MODES)}")
    if not (len(mask) == steps == len(sigmas) - 1 == len(nominal) - 1 == len(phi)) or not mask[0]:
        raise r.fail(f"the schedule is inconsistent ({len(mask)} mask entries, {steps} steps, {len(sigmas)} sigmas, "
                     f"{len(phi)} phi, first step {'full' if mask and mask[0] else 'cached'})")
    for e, (start, _) in enumerate(segments(s.expert_starts, steps)):
        if not mask[start]:  # each expert's history starts empty: a full step opens every segment
            raise r.fail(f"step {start}, the first step of expert {e}, is cached: no residual of that expert "
                         "exists yet")
    if nb != guidance_branches(s.guidance, s.guidance_scale):
        raise r.fail(f"profile.guidance_scale {s.guidance_scale} and n_branches {nb} disagree (CFG is on exactly "
                     f"when guidance > 1; guidance {s.guidance!r})")
    return s


def _conditioning(r: _Reader, data: dict) -> tuple[str, ...]:
    """The folder's conditioning input names (a list of graph-input names; absent: Wan's text_embeds)."""
    names = tuple(r.list(data.get("conditioning", list(DEFAULT_CONDITIONING)), "conditioning", r.str))
    own = (LATENTS, STEP, GUIDANCE_SCALE, RESIDUAL)
    bad = [n for n in names if not n.isidentifier() or n in own or n.startswith(RESIDUAL + "_")]
    if not names or bad or len(set(names)) != len(names):
        raise r.fail(f"conditioning must list distinct graph-input names other than {list(own)}, got "
                     f"{_short(list(names))}")
    return names


def _shapes(r: _Reader, s: dict) -> Shapes:
    return Shapes(r.int(r.get(s, "batch_size", "shapes"), "shapes.batch_size", 1, 1 << 16),
                  r.int(r.get(s, "height", "shapes"), "shapes.height", 1, 1 << 20),
                  r.int(r.get(s, "width", "shapes"), "shapes.width", 1, 1 << 20),
                  None if r.get(s, "frames", "shapes") is None  # null: an image family
                  else r.int(s["frames"], "shapes.frames", 1, 1 << 20),
                  r.shape(r.get(s, "latents", "shapes"), "shapes.latents"),
                  # absent or null for a family with other conditioning inputs (their shapes are the graphs')
                  None if s.get("text_embeds") is None else r.shape(s["text_embeds"], "shapes.text_embeds"),
                  r.shape(r.get(s, "residual", "shapes"), "shapes.residual"))


def _tensor(r: _Reader, value: Any, where: str) -> TensorSpec:
    t = r.obj(value, where)
    dtype = r.str(r.get(t, "dtype", where), f"{where}.dtype")
    if dtype not in TENSOR_DTYPES:
        raise r.fail(f"{where}.dtype {_short(dtype)} is not one of {list(TENSOR_DTYPES)}")
    return TensorSpec(r.str(r.get(t, "name", where), f"{where}.name"), r.shape(r.get(t, "shape", where),
                                                                              f"{where}.shape"), dtype)


def _graph(r: _Reader, name: str, value: Any) -> GraphSpec:
    g = r.obj(value, f"graphs.{name}")
    return GraphSpec(name, tuple(r.list(r.get(g, "inputs", f"graphs.{name}"), f"graphs.{name}.inputs",
                                        lambda v, w: _tensor(r, v, w))),
                     tuple(r.list(r.get(g, "outputs", f"graphs.{name}"), f"graphs.{name}.outputs",
                                  lambda v, w: _tensor(r, v, w))))


def _files(r: _Reader, files: dict) -> dict[str, FileEntry]:
    out = {}
    for rel, entry in files.items():
        try:
            safe_relpath(rel, "files entry")
        except ValueError as e:
            raise r.fail(str(e)) from None
        if rel == MANIFEST:
            raise r.fail(f"files lists {MANIFEST} itself")
        e = r.obj(entry, f"files[{rel!r}]")
        sha = r.str(r.get(e, "sha256", f"files[{rel!r}]"), f"files[{rel!r}].sha256")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise r.fail(f"files[{rel!r}].sha256 is not a sha256 hex digest")
        out[rel] = FileEntry(sha, r.int(r.get(e, "bytes", f"files[{rel!r}]"), f"files[{rel!r}].bytes", 0))
    return out


#: where each target names its per-graph artifact files: target -> (key of the per-graph table)
_TARGET_TABLES = {"onnx": "graphs", "aoti": "graphs", "tensorrt": "engines"}


def _target_files(targets: Mapping[str, Any], target: str) -> dict[str, str]:
    entry = targets.get(target)
    table = entry.get(_TARGET_TABLES[target]) if isinstance(entry, dict) else None
    if not isinstance(table, dict):
        return {}
    return {g: e["file"] for g, e in table.items() if isinstance(e, dict) and isinstance(e.get("file"), str)}


def _check_contract(m: ExportManifest, fail: Callable[[str], ManifestError]) -> None:
    """The step graphs have the contract's I/O, shapes agree, and every target's graph files are listed."""
    experts = m.schedule.expert_count
    step_graphs = step_graph_names(experts)
    for name in step_graphs:
        if name not in m.graphs:
            raise fail(f"there is no {name!r} graph" + (f" (a {experts}-expert folder has {list(step_graphs)})"
                                                         if experts > 1 else ""))
    for name, spec in m.graphs.items():
        base, expert = graph_role(name)
        if base not in IO_NAMES or expert >= experts:
            raise fail(f"unknown graph {_short(name)} (known: {[*step_graphs, VAE_DECODE]})")
        ins, outs = io_names(base, m.schedule.history, m.conditioning)
        if tuple(spec.input_names) != ins or tuple(spec.output_names) != outs:
            raise fail(f"graph {name!r} has I/O {spec.input_names} -> {spec.output_names}, this runtime expects "
                       f"{list(ins)} -> {list(outs)}"
                       + (f" (profile.history is {m.schedule.history})" if base == CACHED_STEP else ""))
        if expert and spec.to_json() != m.graphs[base].to_json():  # the runtime binds one set of buffers
            raise fail(f"graph {name!r} (expert {expert}) differs in shapes or dtypes from {base!r}")
    full = m.graphs[FULL_STEP]
    if m.shapes.latents[:1] != (m.shapes.batch_size,):
        raise fail(f"shapes.batch_size {m.shapes.batch_size} is not the latents' batch {list(m.shapes.latents)[:1]}")
    one_text = m.conditioning == DEFAULT_CONDITIONING  # Wan's one text_embeds tensor, rows per CFG branch
    if one_text != (m.shapes.text_embeds is not None):
        raise fail("shapes.text_embeds must be given exactly when the conditioning is the one text_embeds tensor "
                   f"(conditioning {list(m.conditioning)})")
    if one_text and m.shapes.text_embeds[:1] != (m.schedule.n_branches * m.shapes.batch_size,):
        raise fail(f"shapes.text_embeds {list(m.shapes.text_embeds)} does not have n_branches x batch = "
                   f"{m.schedule.n_branches * m.shapes.batch_size} rows")
    pairs = [("latents", "latents"), ("residual", "residual_out")]
    if one_text:
        pairs.append(("text_embeds", "text_embeds"))
    for key, name in pairs:
        if getattr(m.shapes, key) != full.tensor(name).shape:
            raise fail(f"shapes.{key} is {list(getattr(m.shapes, key))} but the full_step graph's {name} is "
                       f"{list(full.tensor(name).shape)}")
    for name in (STEP, GUIDANCE_SCALE):  # scalars
        if full.tensor(name).shape != ():
            raise fail(f"the full_step graph's {name} must be a scalar, got {list(full.tensor(name).shape)}")
    if full.tensor("step").dtype != "int64":
        raise fail("the full_step graph's step must be int64")
    cached = m.graphs[CACHED_STEP]
    for name in step_inputs(m.conditioning):
        if cached.tensor(name) != full.tensor(name):
            raise fail(f"{name} differs between full_step and cached_step")
    out = full.tensor("residual_out")
    for name in m.schedule.residual_slots:  # every slot holds some full step's residual_out
        slot = cached.tensor(name)
        if (slot.shape, slot.dtype) != (out.shape, out.dtype):
            raise fail(f"cached_step's {name} ({list(slot.shape)} {slot.dtype}) and full_step's residual_out "
                       f"({list(out.shape)} {out.dtype}) differ")
    for target in _TARGET_TABLES:
        if target not in m.targets:
            continue
        if not isinstance(m.targets[target], dict):
            raise fail(f"targets.{target} must be a JSON object")
        files = _target_files(m.targets, target)
        table = m.targets[target].get(_TARGET_TABLES[target])
        if not isinstance(table, dict) or len(files) != len(table):
            raise fail(f"targets.{target}.{_TARGET_TABLES[target]} must map each graph to {{\"file\": path}}")
        for graph, rel in files.items():
            if graph not in m.graphs:
                raise fail(f"targets.{target} names a file for unknown graph {_short(graph)}")
            try:
                safe_relpath(rel, f"targets.{target} file of {graph}")
            except ValueError as e:
                raise fail(str(e)) from None
            if rel not in m.files:
                raise fail(f"{rel} ({target} {graph}) is not listed in files, so it is not covered by a sha256")
        missing = [g for g in step_graphs if g not in files]
        if missing:
            raise fail(f"targets.{target} has no file for {missing}")


def iter_folder(root: Path):
    """(relative posix path, lstat) of every entry under ``root``, links not followed."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            yield full.relative_to(root).as_posix(), full.lstat()


def check_folder_files(m: ExportManifest, verify_files: bool = True) -> None:
    """Points 2-3 of the module docstring: no links, nothing unlisted, (``verify_files``) sizes and sha256."""
    fail = _failer(m.root)
    present = set()
    for rel, st in iter_folder(m.root):
        if stat.S_ISLNK(st.st_mode):
            raise fail(f"{rel} is a symbolic link (an export folder holds plain files only)")
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode):
            raise fail(f"{rel} is not a regular file")
        if rel != MANIFEST:
            present.add(rel)
    missing = sorted(set(m.files) - present)
    if missing:
        raise fail(f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(present - set(m.files))
    if extra:
        raise fail(f"{extra[0]} is not listed in {MANIFEST}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1
                                                                else "")
                   + ": every file in the folder must be hashed (remove it if you added it)")
    profile_json = f"{m.schedule.folder}/profile.json"
    if profile_json not in m.files:
        raise fail(f"{profile_json} is not listed in files")
    if not verify_files:
        return
    for rel, entry in m.files.items():
        file = m.root / rel
        if file.stat().st_size != entry.bytes or sha256_file(file) != entry.sha256:
            raise fail(f"{rel} does not match its sha256 in {MANIFEST} (modified or truncated)")


def folder_digest(root: str | os.PathLike) -> str:
    """``sha256:<hex>`` of the folder's manifest.json: it lists the sha256 of every other file."""
    return "sha256:" + sha256_file(Path(root) / MANIFEST)


def normalise_digest(value: str) -> str:
    """``sha256:<64 hex>`` from a pin given with or without the prefix; ValueError when malformed."""
    text = value.strip().lower()
    hexpart = text[7:] if text.startswith("sha256:") else text
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"--expect-digest {_short(value)} is not sha256:<64 hex digits> (ertacache-export prints it)")
    return "sha256:" + hexpart


def check_digest(expected: str, actual: str, root: Path) -> None:
    try:
        want = normalise_digest(expected)
    except ValueError as e:
        raise UserError(str(e)) from None
    if want != actual:
        raise UserError(f"export folder {root} has digest {actual}, not the pinned {want}: it is not the folder you "
                        "built (or it was modified or rebuilt); use the folder that ertacache-export/-build printed "
                        "that digest for")


def load_manifest(root: str | os.PathLike, verify_files: bool = True,
                  expect_digest: str | None = None) -> ExportManifest:
    """:meth:`ExportManifest.load` (the one way to read a manifest)."""
    return ExportManifest.load(root, verify_files, expect_digest)
