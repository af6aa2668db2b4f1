"""Write a Triton model repository entry over an export folder (``ertacache-triton``).

    repo/
      NAME/
        config.pbtxt          inputs/outputs (static shapes as exported), instance_group,
                              decoupled policy, parameters an operator tunes
        1/
          model.py            the Python-backend model (ertacache/serving/triton_model.py)
          engines/            a verified copy of the export folder (both step graphs, decode, profile)
          text_encoder/       the prompt encoder (tokenizer/, text_encoder/) when the model has one

One model owns both engines, the residual buffers (K, the predictor's history) and the shared
scratch memory: a residual (100-800 MB for Wan2.1) never crosses a model boundary between steps. The folder is copied
into the version folder so the repository is self-contained (what an object store or a
container mount needs); the entry is written in a temporary folder and renamed into place, so a
failed write leaves the repository as it was. Other models in ``repo`` are not touched.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ertacache.contract import ExportManifest, load_manifest
from ertacache.engines.base import BACKENDS
from ertacache.errors import UserError
from ertacache.io import atomic_directory, copy_tree_no_links
from ertacache.runtime.checks import check_against_profile
from ertacache.serving.instance import ModelParameters
from ertacache.serving.spec import ServedIO, TensorIO, conditioning_names, expected_io

MODEL_FILE = Path(__file__).with_name("triton_model.py")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def default_name(model_id: str) -> str:
    """A Triton model name from a model id: ``wan2.1-tiny`` -> ``wan2_1-tiny``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", model_id)


@dataclass(frozen=True)
class RepositoryConfig:
    """What ``ertacache-triton`` writes; validated on construction (each refusal says how to fix it).

    instances: model instances (Triton's instance_group count); each is a process with its own
        engines and buffers, so memory grows with it (docs/triton.md), and on a CPU each gets
        cores / instances ONNX Runtime threads unless ``intra_op_threads`` says otherwise.
    decoupled: stream one progress response per denoising step before the final response
        (gRPC streaming clients only: Triton's HTTP endpoint does not serve decoupled models).
    max_batch_size: 0 (one request = one generation of the folder's static batch) or > 0 (Triton
        batches requests into rows; needs a folder of batch size 1, rows run one after another).
    latents: also return the final latents (always returned when the folder has no decoder).
    text_encoder: bundle the model's text encoder so requests can send a prompt; None bundles it
        when it can be found, False never does (requests then send ``text_embeds``).
    """

    engines: Path
    repo: Path
    name: str | None = None  # default: from the manifest's model id
    backend: str = "onnxruntime"
    instances: int = 1
    decoupled: bool = False
    max_batch_size: int = 0
    latents: bool = False
    text_encoder: bool | None = None
    model_path: Path | None = None  # where the text encoder is (default: the manifest's model path)
    providers: tuple[str, ...] = ()
    intra_op_threads: int = 0
    verify_files: bool = True
    force: bool = False
    expect_digest: str | None = None  # refuse an export folder whose digest is not this one

    def __post_init__(self):
        object.__setattr__(self, "engines", Path(self.engines))
        object.__setattr__(self, "repo", Path(self.repo))
        if self.name is not None and not _NAME.match(self.name):
            raise UserError(f"--name {self.name!r} is not a valid Triton model name (the folder name): use letters, "
                            "digits, '_', '-' and '.', starting with a letter or digit")
        if self.backend not in BACKENDS:
            raise UserError(f"--backend {self.backend!r} is unknown; give one of {list(BACKENDS)}")
        if self.instances < 1:
            raise UserError(f"--instances {self.instances}: give at least 1")
        if self.max_batch_size < 0:
            raise UserError(f"--max-batch-size {self.max_batch_size}: give 0 (no Triton batching) or more")
        if self.intra_op_threads < 0:
            raise UserError(f"--intra-op-threads {self.intra_op_threads}: give 0 (cores / instances) or more")
        if self.text_encoder is True and self.model_path is not None and not Path(self.model_path).is_dir():
            raise UserError(f"--model-path {self.model_path} is not a folder")


@dataclass
class RepositoryReport:
    """What was written; the CLI prints it, tests read it."""

    model_dir: Path
    name: str
    io: ServedIO
    parameters: dict[str, str]
    text_encoder: Path | None  # where the bundled encoder came from
    model_config: dict[str, Any]  # config.pbtxt as Triton hands it to model.py (JSON form)
    files: dict[str, int] = field(default_factory=dict)  # relative path -> bytes


# ---- the text encoder -----------------------------------------------------------------------------------------

def find_text_encoder(manifest: ExportManifest, model_path: Path | None = None) -> tuple[Path, str] | None:
    """(model folder holding text_encoder/ and maybe tokenizer/, family) of the folder's model, or None."""
    from importlib import resources

    from ertacache.models.recipes import load_recipe

    try:
        recipe = load_recipe(manifest.model.id)
    except UserError:
        return None  # a model without a recipe (built in code): no loader for its encoder
    path = model_path or manifest.model.path
    if (path is None or not Path(path).is_dir()) and recipe.package_path is not None:
        path = Path(str(resources.files("ertacache") / recipe.package_path))
    if path is None or not (Path(path) / "text_encoder").is_dir():
        return None
    return Path(path), recipe.family


def _copy_text_encoder(source: Path, dest: Path, family: str) -> None:
    from ertacache.models.family import family_named

    dest.mkdir(parents=True)
    subs = ["tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"]  # FLUX has a second (T5) pair
    if family_named(family).takes_images:  # an image-to-video model's image path: CLIP vision, its processor, the VAE
        subs += ["image_encoder", "image_processor", "vae"]
    for sub in subs:
        if (source / sub).is_dir():
            copy_tree_no_links(source / sub, dest / sub)  # never copy what a link points at into the repository


# ---- config.pbtxt ---------------------------------------------------------------------------------------------

def _tensor(t: TensorIO) -> str:
    lines = [f'    name: "{t.name}"', f"    data_type: {t.data_type}", f"    dims: [ {', '.join(map(str, t.dims))} ]"]
    if t.optional:
        lines.append("    optional: true")
    return "  {\n" + "\n".join(lines) + "\n  }"


def _parameter(key: str, value: str) -> str:
    value = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'parameters: {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}'


def instance_kind(cfg: RepositoryConfig, manifest: ExportManifest) -> str:
    """KIND_GPU where the engines run on a GPU (TensorRT, CUDA providers, CUDA AOTInductor), else KIND_CPU."""
    aoti_device = manifest.targets.get("aoti", {}).get("device", "cpu")
    gpu = (cfg.backend == "tensorrt" or any(p in CUDA_PROVIDERS for p in cfg.providers)
           or (cfg.backend == "aoti" and str(aoti_device).startswith("cuda")))
    return "KIND_GPU" if gpu else "KIND_CPU"


def model_config(name: str, io: ServedIO, params: ModelParameters, cfg: RepositoryConfig,
                 manifest: ExportManifest) -> dict[str, Any]:
    """The configuration in the JSON form Triton passes to ``initialize`` (args["model_config"])."""
    def tensors(ts):
        return [{"name": t.name, "data_type": t.data_type, "dims": [str(d) for d in t.dims], "optional": t.optional}
                for t in ts]

    out = {"name": name, "backend": "python", "max_batch_size": cfg.max_batch_size, "input": tensors(io.inputs),
           "output": tensors(io.outputs),
           "instance_group": [{"count": cfg.instances, "kind": instance_kind(cfg, manifest)}],
           "parameters": {k: {"string_value": v} for k, v in params.to_strings().items()}}
    if cfg.decoupled:
        out["model_transaction_policy"] = {"decoupled": True}
    return out


def render_config(name: str, io: ServedIO, params: ModelParameters, cfg: RepositoryConfig,
                  manifest: ExportManifest) -> str:
    """config.pbtxt in Triton's protobuf text format (model_config.proto)."""
    from ertacache import __version__

    prof = manifest.schedule
    conds = conditioning_names(io)
    text_in = (f"exactly one of prompt / {' + '.join(conds)}" if any(t.name == "prompt" for t in io.inputs)
               else " and ".join(conds))
    head = [
        f"# Written by ertacache-triton {__version__} from an export folder of {manifest.model.id}:",
        f"# {prof.steps} steps ({prof.full_steps} full), batch {manifest.shapes.batch_size}, "
        f"{manifest.dtype}. Per request: {text_in}, seed, optional guidance_scale"
        f"{' and guidance_scale_2 (two experts)' if prof.expert_count > 1 else ''} (with CFG).",
        "# Operators tune the parameters below; inputs and outputs are the export folder's static shapes.",
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {cfg.max_batch_size}",
        "input [\n" + ",\n".join(_tensor(t) for t in io.inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor(t) for t in io.outputs) + "\n]",
        f"instance_group [\n  {{\n    count: {cfg.instances}\n    kind: {instance_kind(cfg, manifest)}\n  }}\n]",
    ]
    if cfg.max_batch_size > 0:
        head.append("dynamic_batching { }")
    if cfg.decoupled:
        head.append("model_transaction_policy {\n  decoupled: true\n}")
    info = {"steps": str(prof.steps), "full_steps": str(prof.full_steps),
            "default_guidance_scale": str(prof.guidance_scale), "ertacache_version": __version__}
    if prof.experts is not None:  # which steps each expert's graph pair runs, and its default scale
        info.update(expert_starts=",".join(map(str, prof.experts.starts)),
                    default_guidance_scale_2=str(prof.guidance_scales[1]))
    params_text = [_parameter(k, v) for k, v in {**params.to_strings(), **info}.items()]
    return "\n".join(head + params_text) + "\n"


# ---- the writer -----------------------------------------------------------------------------------------------

def is_model_folder(path: Path) -> bool:
    """What ``--force`` may replace in a repository: a model folder ertacache-triton wrote (config + model.py)."""
    return (path / "config.pbtxt").is_file() and (path / "1" / "model.py").is_file()


def check_model_file(model_dir: Path) -> None:
    """The repository's ``1/model.py`` is this installed package's (a stale copy may not fit the package it imports)."""
    file = Path(model_dir) / "1" / "model.py"
    if not file.is_file() or file.read_bytes() != MODEL_FILE.read_bytes():
        raise UserError(f"{file} differs from the model.py of the installed ertacache (or is missing): the model was "
                        "written by another ertacache version; regenerate it with ertacache-triton --engines "
                        f"EXPORT_FOLDER --repo {Path(model_dir).parent} --name {Path(model_dir).name} --force")


def _check_backend_target(manifest: ExportManifest, cfg: RepositoryConfig) -> None:
    """The folder holds the chosen backend's artifacts (their machine is checked when the server loads them)."""
    target = BACKENDS[cfg.backend].needs_target
    if target is not None and target not in manifest.targets:
        how = (f"build them on the serving GPU with ertacache-build --engines {cfg.engines} --targets tensorrt"
               if target == "tensorrt" else f"re-export with ertacache-export --targets {target}")
        raise UserError(f"export folder {cfg.engines} has no {target} artifacts for --backend {cfg.backend}; {how}, "
                        "or choose another --backend")


def write_repository(cfg: RepositoryConfig, log: Callable[[str], None] = lambda s: None) -> RepositoryReport:
    """Check the export folder, then write ``repo/NAME`` atomically (see the module docstring)."""
    if cfg.engines.exists() and not cfg.engines.is_dir():
        raise UserError(f"--engines {cfg.engines} is a file; give the export folder (ertacache-export --out)")
    if not cfg.engines.is_dir():
        raise UserError(f"--engines {cfg.engines} does not exist; create it with ertacache-export --out {cfg.engines}")
    if cfg.repo.exists() and not cfg.repo.is_dir():
        raise UserError(f"--repo {cfg.repo} is a file; give a folder (created if missing)")
    # never deploy a tampered folder: every file listed and hashed, paths confined, schedule = profile/
    manifest = load_manifest(cfg.engines, verify_files=True, expect_digest=cfg.expect_digest)
    check_against_profile(manifest)
    _check_backend_target(manifest, cfg)
    name = cfg.name or default_name(manifest.model.id)
    encoder = None if cfg.text_encoder is False else find_text_encoder(manifest, cfg.model_path)
    if cfg.text_encoder is True and encoder is None:
        raise UserError(f"the text encoder of {manifest.model.id!r} was not found (looked in "
                        f"{cfg.model_path or manifest.model.path}); pass --model-path with the model folder, "
                        "or --no-text-encoder to serve text_embeds")
    io = expected_io(manifest, encoder is not None, cfg.latents, cfg.max_batch_size, cfg.decoupled)
    params = ModelParameters(backend=cfg.backend, providers=tuple(cfg.providers),
                             intra_op_threads=cfg.intra_op_threads, verify_files=cfg.verify_files,
                             text_encoder="text_encoder" if encoder else "",
                             text_encoder_family=encoder[1] if encoder else "", digest=manifest.digest)
    target = cfg.repo / name
    with atomic_directory(target, force=cfg.force, what=f"Triton model folder {name!r} in the repository",
                          recognise=is_model_folder, log=log) as tmp:
        (tmp / "config.pbtxt").write_text(render_config(name, io, params, cfg, manifest))
        version = tmp / "1"
        version.mkdir()
        shutil.copyfile(MODEL_FILE, version / "model.py")
        log(f"copying the export folder {cfg.engines} into {target / '1' / params.engines}")
        copy_tree_no_links(cfg.engines, version / params.engines)  # load_manifest refused links and extra files
        if load_manifest(version / params.engines, verify_files=True).digest != manifest.digest:
            raise UserError(f"the export folder {cfg.engines} changed while it was copied; run ertacache-triton again")
        if encoder is not None:
            log(f"bundling the text encoder of {encoder[0]}")
            _copy_text_encoder(encoder[0], version / params.text_encoder, encoder[1])
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        # atomic_directory gives the folder the umask's permissions: a server running as another user reads it
    return RepositoryReport(target, name, io, params.to_strings(), encoder[0] if encoder else None,
                            model_config(name, io, params, cfg, manifest), files)
