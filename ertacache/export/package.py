"""From (model, profile, settings) to a complete, validated export folder.

    out/
      manifest.json         what everything is (ertacache.export.manifest)
      onnx/<graph>.onnx     full_step, cached_step, vae_decode (+ <graph>.onnx.data past 2 GB); a
                            two-expert model (Wan2.2 A14B) also full_step_2, cached_step_2
      aoti/<graph>.pt2      the same graphs as AOTInductor packages
      profile/              a copy of the profile folder the graphs were baked from

Stages, each reported through ``log``: bake (the pass, torch.export), the
torch.compile check, one export per target, validation of every target over
the whole schedule against the eager cached sampler, timing (cached-step cost
ratio c), manifest. Everything is written in a temporary sibling folder and
renamed into place only when all of it succeeded: a failure (exporter, op
check, validation, disk full) leaves no folder behind.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from ertacache.contract import (CACHED_STEP, EXPERTS_LOOP, EXPERTS_SCHEMA_VERSION, FORMAT, FULL_STEP, LOOP, MANIFEST,
                                SCHEMA_VERSION, VAE_DECODE, folder_digest, step_graph_names)
from ertacache.errors import UserError
from ertacache.export.config import ExportConfig
from ertacache.export.errors import GraphExportError
from ertacache.export.graphs import BakeStepGraphs, StepGraphs
from ertacache.export.manifest import file_entries, package_versions, write_manifest
from ertacache.export.quiet import known_exporter_messages_filtered
from ertacache.export.runners import (
    AotiRunner,
    EagerRunner,
    OnnxRuntimeRunner,
    relative_l2,
    run_schedule,
    speedup_bound,
    time_steps,
)
from ertacache.io import atomic_directory, check_replaceable, copy_tree_no_links
from ertacache.models.adapter import ModelAdapter
from ertacache.models.components import LatentDecoder
from ertacache.profile.artifact import Profile
from ertacache.sampling.sampler import CachedSampler


def embed_shape(text_shape) -> list | dict:
    """One prompt's text shape as the manifest records it: [L, D], or {input: shape} for several inputs (FLUX)."""
    return {k: list(v) for k, v in text_shape.items()} if isinstance(text_shape, dict) else list(text_shape)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model the graphs come from and how a runtime gets text embeddings for it."""

    model_id: str
    fingerprint: str
    model_class: str
    path: str | None = None
    #: e.g. {"kind": "UMT5PromptEncoder", "path": ".../text_encoder", "embed_shape": [512, 4096]}
    text_encoder: dict[str, Any] = field(default_factory=dict)
    negative_prompt: str = ""

    @classmethod
    def from_bundle(cls, bundle, text_shape, negative_prompt: str = "") -> "ModelIdentity":
        enc = bundle.prompt_encoder
        return cls(
            model_id=bundle.model_id,
            fingerprint=bundle.fingerprint,
            model_class=type(bundle.transformer).__name__,
            path=str(bundle.path),
            text_encoder={"kind": type(enc).__name__, "path": str(bundle.path / "text_encoder"),
                          "hub_id": bundle.recipe.hub_id, "embed_shape": embed_shape(text_shape),
                          "dtype": str(bundle.dtype).replace("torch.", "")},
            negative_prompt=negative_prompt,
        )


@dataclass
class ExportReport:
    """What was written and measured; the CLI prints it, tests read it."""

    out: Path
    manifest: dict[str, Any]
    files: dict[str, int]  # relative path -> bytes
    validation: dict[str, dict[str, float]]
    timing: dict[str, Any]
    stage_s: dict[str, float]
    #: sha256 of manifest.json, which lists every file's sha256: pins the whole folder (--expect-digest)
    digest: str = ""


def is_export_folder(path: Path) -> bool:
    """What ``--force`` may replace: a folder holding an export manifest (never another folder or a file)."""
    return (path / MANIFEST).is_file()


def _validation_inputs(graphs: StepGraphs, seed: int):
    """Noise and conditioning for the validation run: the text tensor, or a mapping by conditioning name."""
    latents, _, *rest = graphs.example_inputs[FULL_STEP]
    examples = rest[: len(graphs.conditioning)]  # the conditioning tensors, in graph-input order
    gen = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(latents.shape, generator=gen).to(latents.device)  # (B, C, F', H', W') float32
    conds = [torch.randn(t.shape, generator=gen).to(t.device, t.dtype) for t in examples]  # e.g. (nb*B, L, D_text)
    if len(conds) == 1:
        return noise, conds[0]
    return noise, dict(zip(graphs.conditioning, conds))


class ExportPackage:
    """Run every stage and write the folder; see the module docstring."""

    def __init__(self, config: ExportConfig, log: Callable[[str], None] = print):
        self.config = config
        self.log = log
        self._stages_total: int | None = None
        self._stages_done = 0
        self._start = time.perf_counter()

    def _count_stages(self, n_graphs: int) -> int:
        """How many _stage calls this export makes (for the "[k/N name]" progress lines)."""
        cfg = self.config
        return (1 + cfg.check_compile + n_graphs * (("onnx" in cfg.targets) + ("aoti" in cfg.targets))
                + ("tensorrt" in cfg.targets) + 2 * cfg.validate + 1)

    def _stage(self, name: str, stage_s: dict[str, float], fn, *args, **kwargs):
        self._stages_done += 1
        tag = f"{self._stages_done}/{self._stages_total} {name}" if self._stages_total else name
        self.log(f"[{tag}] ...")
        start = time.perf_counter()
        with known_exporter_messages_filtered():  # the exporters' known messages (export/quiet.py)
            out = fn(*args, **kwargs)
        stage_s[name] = time.perf_counter() - start
        self.log(f"[{tag}] done in {stage_s[name]:.1f} s ({time.perf_counter() - self._start:.0f} s so far)")
        return out

    def __call__(self, adapter: ModelAdapter | list[ModelAdapter], profile: Profile, identity: ModelIdentity,
                 text_shape, decoder: LatentDecoder | None = None,
                 profile_dir: Path | None = None) -> ExportReport:
        """``adapter``: the model's adapter, or one per expert (in order) for a two-expert profile."""
        cfg = self.config
        cfg.check_machine()
        check_replaceable(cfg.out.absolute(), cfg.force, "export folder", is_export_folder)  # before minutes of work
        if identity.fingerprint != profile.model_fingerprint:
            raise UserError(f"the profile was made for weights {profile.model_fingerprint}, this model is "
                            f"{identity.fingerprint}; re-profile this model (or drop --profile to calibrate now)")
        stage_s: dict[str, float] = {}
        self._start, self._stages_done = time.perf_counter(), 0
        experts = len(profile.expert_starts)
        self._stages_total = self._count_stages(2 * experts + (decoder is not None and cfg.decode_graph))
        bake = BakeStepGraphs(cfg.batch_size, cfg.torch_dtype, text_shape,
                              decoder=decoder if cfg.decode_graph else None)
        graphs = self._stage("bake", stage_s, bake, adapter, profile)
        compile_check = self._stage("torch.compile check", stage_s, self._compile_check, graphs) \
            if cfg.check_compile else None

        try:
            with atomic_directory(cfg.out, force=cfg.force, what="export folder", recognise=is_export_folder,
                                  log=self.log) as tmp:
                report = self._write(tmp, graphs, profile, identity, text_shape, profile_dir, compile_check, stage_s)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(f"disk full while writing the export folder ({e}); no partial folder was left. "
                                f"Free space on {cfg.out.absolute().parent} or choose another --out") from e
            raise
        report.out = cfg.out
        report.digest = folder_digest(cfg.out)
        return report

    # ---- stages ---------------------------------------------------------------------------------

    def _compile_check(self, graphs: StepGraphs) -> dict[str, int]:
        """Graph breaks of torch.compile(fullgraph=True) on every step module (must be 0)."""
        breaks = {}
        for name in step_graph_names(1 if graphs.experts is None else graphs.experts.count):
            torch._dynamo.reset()
            with torch.no_grad():
                explanation = torch._dynamo.explain(graphs.modules[name])(*graphs.example_inputs[name])
            breaks[name] = int(explanation.graph_break_count)
            if breaks[name]:
                reasons = "; ".join(str(b.reason) for b in explanation.break_reasons[:3])
                raise GraphExportError(name, "torch.compile(fullgraph=True)",
                                       f"{breaks[name]} graph break(s): {reasons}")
        torch._dynamo.reset()
        return breaks

    def _export_targets(self, tmp: Path, graphs: StepGraphs, stage_s) -> tuple[dict, dict]:
        cfg = self.config
        paths: dict[str, dict[str, Path]] = {}
        details: dict[str, Any] = {}
        if "onnx" in cfg.targets:
            from ertacache.export.onnx_target import TENSORRT_OPS_SOURCE, OnnxFromExportedProgram

            exporter = OnnxFromExportedProgram(cfg.opset, cfg.check_tensorrt_ops)
            onnx_graphs = {}
            for name in graphs.names:
                onnx_graphs[name] = self._stage(f"onnx {name}", stage_s, exporter, name, graphs.programs[name],
                                                graphs.example_inputs[name], graphs.specs[name], tmp / "onnx")
            paths["onnx"] = {n: g.path for n, g in onnx_graphs.items()}
            details["onnx"] = {
                "opset": cfg.opset,
                "graphs": {n: {"file": g.path.relative_to(tmp).as_posix(), "external_data": g.external_data,
                               "ops": g.ops, "nodes_before_folding": g.nodes_before_folding,
                               "nodes_after_folding": g.nodes_after_folding, "export_s": round(g.export_s, 2)}
                           for n, g in onnx_graphs.items()},
                "tensorrt_op_check": {"checked": cfg.check_tensorrt_ops, "source": TENSORRT_OPS_SOURCE},
                "constant_folding": "onnxscript optimizer (ONNXProgram.optimize)",
            }
        if "aoti" in cfg.targets:
            from ertacache.export.aoti_target import AotiPackageFromExportedProgram

            packer = AotiPackageFromExportedProgram()
            aoti = {name: self._stage(f"aoti {name}", stage_s, packer, name, graphs.programs[name], tmp / "aoti")
                    for name in graphs.names}
            paths["aoti"] = {n: g.path for n, g in aoti.items()}
            details["aoti"] = {"graphs": {n: {"file": g.path.relative_to(tmp).as_posix(),
                                              "compile_s": round(g.compile_s, 2)} for n, g in aoti.items()},
                               "device": graphs.example_inputs[FULL_STEP][0].device.type,
                               "loader": "torch._inductor.aoti_load_package"}
        if "tensorrt" in cfg.targets:
            from ertacache.engines.tensorrt import build_engines

            details["tensorrt"] = self._stage("tensorrt engines", stage_s, build_engines, paths["onnx"],
                                              tmp / "tensorrt", log=self.log)
        return paths, details

    def _runner(self, target: str, paths: dict[str, Path], graphs: StepGraphs):
        if target == "onnx":
            name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[graphs.dtype]
            return OnnxRuntimeRunner(paths, graphs.specs, self.config.onnx_providers, name)
        return AotiRunner(paths)

    def _validate(self, graphs: StepGraphs, paths: dict[str, dict[str, Path]], guidance_scale: float):
        """Final-latent error of every target over the whole schedule vs the eager cached sampler."""
        cfg = self.config
        latents, text = _validation_inputs(graphs, cfg.seed)
        eager = CachedSampler(graphs.adapters, graphs.tables, graphs.mask, graphs.experts)
        ref = eager(latents, text, guidance_scale).latents  # (B, C, F', H', W'); two experts: their own scales
        results, runners = {}, {}
        flat = tuple(text.values()) if isinstance(text, dict) else text  # graph-input order
        for target, target_paths in paths.items():
            runner = runners[target] = self._runner(target, target_paths, graphs)
            with torch.no_grad():
                got = run_schedule(runner, graphs.mask, latents, flat, guidance_scale, graphs.history, graphs.experts)
            row = {"rel_l2": relative_l2(got, ref), "max_abs": float((got - ref).abs().max())}
            if VAE_DECODE in target_paths:
                frames = runner.decode(ref)
                eager_frames = graphs.modules[VAE_DECODE](ref)
                row["decode_max_abs_uint8"] = int((frames.int() - eager_frames.int()).abs().max())
            results[target] = row
            if not torch.isfinite(got).all():
                raise GraphExportError(FULL_STEP, f"validation of {target}", "NaN or Inf in the final latents")
            if graphs.dtype == torch.float32 and row["rel_l2"] > cfg.tolerance:
                raise GraphExportError(
                    f"{FULL_STEP}+{CACHED_STEP}", f"validation of {target}",
                    f"final latents differ from eager by relative L2 {row['rel_l2']:.3g} > {cfg.tolerance:g}",
                    hint="no output folder was written; this is a bug in the exported graph or the exporter, "
                         "please report it with the failing op list from docs/export.md's debugging section")
        return results, runners, ref

    def _timing(self, graphs: StepGraphs, runners: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        if not cfg.timing_repeats:
            return {}
        full_in = graphs.example_inputs[FULL_STEP]
        out: dict[str, Any] = {"repeats": cfg.timing_repeats}
        timed = dict(runners)
        timed["eager"] = EagerRunner(graphs.modules)
        for target, runner in timed.items():
            with torch.no_grad():
                _, residual = runner.full(*full_in)
                slots = (residual,) * graphs.history  # K residual slots (values do not change the cost)
                t = time_steps(runner, full_in, (*full_in, *slots), repeats=cfg.timing_repeats)
            t["speedup_bound"] = speedup_bound(graphs.mask, t["c"])
            out[{"onnx": "onnxruntime"}.get(target, target)] = {k: round(v, 6) for k, v in t.items()}
        return out

    def _write(self, tmp: Path, graphs: StepGraphs, profile: Profile, identity: ModelIdentity, text_shape,
               profile_dir: Path | None, compile_check, stage_s) -> ExportReport:
        cfg = self.config
        paths, details = self._export_targets(tmp, graphs, stage_s)
        validation, runners, timing = {}, {}, {}
        if cfg.validate:
            validation, runners, _ = self._stage("validate", stage_s, self._validate, graphs, paths,
                                                 profile.guidance_scale)
            for target, row in validation.items():
                self.log(f"  {target:5s} rel L2 {row['rel_l2']:.3e}  max |diff| {row['max_abs']:.3e}"
                         + (f"  decode max |diff| {row['decode_max_abs_uint8']}" if "decode_max_abs_uint8" in row
                            else ""))
            timing = self._stage("timing", stage_s, self._timing, graphs, runners)
        self._stage("profile copy", stage_s, self._copy_profile, tmp / "profile", profile, profile_dir)
        manifest = self._manifest(tmp, graphs, profile, identity, text_shape, details, compile_check,
                                  validation, timing)
        write_manifest(tmp, manifest)
        files = {rel: e["bytes"] for rel, e in manifest["files"].items()}
        files["manifest.json"] = (tmp / "manifest.json").stat().st_size
        return ExportReport(cfg.out, manifest, files, validation, timing, stage_s)

    @staticmethod
    def _copy_profile(dest: Path, profile: Profile, profile_dir: Path | None) -> None:
        if profile_dir is not None:
            copy_tree_no_links(profile_dir, dest, ignore_hidden=True)  # a link would put any file under the hash
        else:
            profile.save(dest, plot=True)

    def _manifest(self, tmp: Path, graphs: StepGraphs, profile: Profile, identity: ModelIdentity, text_shape,
                  details, compile_check, validation, timing) -> dict[str, Any]:
        cfg = self.config
        specs = graphs.specs
        experts = {} if profile.experts is None else {"experts": profile.experts.to_json()}
        return {
            "schema_version": SCHEMA_VERSION if profile.experts is None else EXPERTS_SCHEMA_VERSION,
            "format": FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {"id": identity.model_id, "fingerprint": identity.fingerprint, "class": identity.model_class,
                      "path": identity.path},
            "text_encoder": {**identity.text_encoder,
                             "embed_shape": embed_shape(text_shape),
                             "negative_prompt": identity.negative_prompt,
                             "rows": "cond rows first, then uncond rows (CFG)" if profile.n_branches == 2
                             else "cond rows only (no CFG)",
                             "input": "text_embeds (precomputed) when no encoder is available"},
            "profile": {"folder": "profile", "steps": profile.steps, "shift": profile.shift,
                        "lambda": profile.lam, "full_steps": profile.full_steps,
                        "guidance_scale": profile.guidance_scale, "n_branches": profile.n_branches,
                        "mask": [bool(m) for m in profile.mask], "sigmas": [float(s) for s in profile.sigmas],
                        "nominal_sigmas": [float(s) for s in profile.nominal_sigmas],
                        "phi": [float(p) for p in profile.phi],
                        "history": graphs.history, "predictor": dict(profile.predictor),
                        "guidance": profile.guidance, **experts},
            "conditioning": list(graphs.conditioning),
            "shapes": {"batch_size": cfg.batch_size, "height": profile.height, "width": profile.width,
                       "frames": profile.frames, "latents": list(specs[FULL_STEP].inputs[0].shape),
                       # one text_embeds tensor (Wan); other families' conditioning shapes are the graphs'
                       "text_embeds": (list(specs[FULL_STEP].tensor("text_embeds").shape)
                                       if graphs.conditioning == ("text_embeds",) else None),
                       "residual": list(specs[FULL_STEP].outputs[1].shape)},
            "dtype": cfg.dtype,
            "opset": cfg.opset if "onnx" in cfg.targets else None,
            "backends": list(cfg.targets),
            "targets": {**details, "torch_compile": {"fullgraph": True, "graph_breaks": compile_check,
                                                     "note": "checked at export; compile at load time"}},
            "graphs": {name: spec.to_json() for name, spec in specs.items()},
            "validation": {"reference": "eager CachedSampler, same dtype, same schedule",
                           "metric": "relative L2 of the final latents",
                           "fp32_tolerance": cfg.tolerance, "results": validation},
            "timing": timing,
            "export": {"torch_export_s": {k: round(v, 2) for k, v in graphs.export_s.items()},
                       "attention_processor": "StackRopeWanAttnProcessor" if graphs.attention_swapped else None},
            "files": file_entries(tmp),
            "versions": package_versions(),
            "runtime": {"loop": LOOP if profile.experts is None else EXPERTS_LOOP,
                        "state": "latents (float32) and K = profile.history residual slots: a full step writes "
                                 "residual_out into the oldest slot, which becomes the newest; cached_step reads "
                                 "them newest first (residual, residual_1, ...)",
                        "bind": "by name; conditioning a cached step does not read (Wan's text_embeds) may be "
                                "dropped by TensorRT",
                        "decode": "vae_decode(latents_out of the last step) -> frames uint8 (B, F, H, W, 3)"},
        }


def export_package(adapter, profile, identity, text_shape, config: ExportConfig, decoder=None, profile_dir=None,
                   log: Callable[[str], None] = print) -> ExportReport:
    """Functional form of :class:`ExportPackage`."""
    return ExportPackage(config, log)(adapter, profile, identity, text_shape, decoder, profile_dir)
