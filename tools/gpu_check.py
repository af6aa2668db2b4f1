"""The GPU check: every CUDA path of the toolchain, measured in one prepared command (about 5 minutes).

GPU time for this project comes in short windows on a bare machine (torch with CUDA, no diffusers,
no TensorRT), so this is one script that any piece of work that gets a GPU runs at once:

    bash tools/gpu_wheels.sh                 # here, once: the wheels the GPU machine lacks -> .gpu_wheels/
    bash tools/gpu_check.sh .gpu_wheels      # there: install them into a venv over the system torch, run this
    python tools/gpu_check.py --dry-run --out /tmp/gc   # anywhere: the same code on the CPU at a tiny shape

At the Wan2.1-1.3B architecture (diffusers ``WanTransformer3DModel``, random weights; speed does not
depend on the values) in bf16, at 480x832 and 9 frames (latents 16x3x60x104, **4,680 tokens**, 512
text tokens) with a 20-step schedule by default, it measures, each in its own section:

    env           device, capability, torch / CUDA versions, the command
    eager         the diffusers forward itself (both CFG branches in one batch of 2)
    calibration   a 2x open-loop profile on 1 and on 2 prompts: peak device memory of each (flat in
                  the prompts: per-prompt state lives in pinned host memory) and wall time
    export        the step graphs baked and AOTInductor-compiled for the device, validated over the
                  whole schedule against eager
    runtime       per backend (eager step modules, torch.compile + CUDA graphs, AOTInductor):
                  full and cached step time, c = cached/full, end-to-end cached vs all-full schedule,
                  measured vs the ideal bound T / (N_full + N_cached c), host syncs and allocations
                  per step inside the loop, peak device memory of the runtime
    precision     the whole bf16 schedule vs the same schedule in fp32 (relative L2, NaN check)
    families      HunyuanVideo, Wan2.1 I2V and FLUX step graphs (small random models at the real head
                  size) baked, AOTInductor-compiled for the device and validated over a schedule

Every section is timed, its failure is recorded (not fatal), and the JSON is rewritten after each
section, so a run cut short by the device's time limit still returns what it measured. Sections
still waiting when ``--budget-s`` is spent are skipped and say so. ``--dry-run`` runs the same code
on the CPU at a tiny shape and writes the same keys (CI runs it). Results: ``gpu_check.json`` and
``gpu_check.md`` in ``--out``; ``--fill-docs gpu_check.json`` puts the markdown into
``docs/engines.md`` ("Measured on GPU").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ertacache.export import ExportConfig, ExportPackage, ModelIdentity  # noqa: E402
from ertacache.export.manifest import package_versions  # noqa: E402
from ertacache.memory import PeakMemory  # noqa: E402
from ertacache.models.adapter import adapter_for  # noqa: E402
from ertacache.models.loading import fingerprint_module  # noqa: E402
from ertacache.profile.build import profile_from_outcome  # noqa: E402
from ertacache.profile.calibrate import CalibrationSet, calibrate  # noqa: E402
from ertacache.profile.config import CalibrationConfig  # noqa: E402
from ertacache.profile.predictor import PredictorConfig  # noqa: E402
from ertacache.runtime import Runtime, measure_allocations  # noqa: E402
from ertacache.sampling import CachedSampler, initial_latents, nominal_sigmas  # noqa: E402
from ertacache.sampling.settings import SampleSettings  # noqa: E402
from ertacache.timing import ideal_speedup, interleaved_medians, machine_info, median_seconds  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
from bench_engines import WAN21_1P3B  # noqa: E402  (diffusers' config of Wan-AI/Wan2.1-T2V-1.3B-Diffusers)

SCHEMA = "ertacache-gpu-check/1"
DOCS_BEGIN = "<!-- gpu-check:begin -->"
DOCS_END = "<!-- gpu-check:end -->"

#: the dry run's model: the same class and layout, tiny (CPU, seconds)
WAN_DRY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
               text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)


class Check:
    """Sections run in order into one report; each is timed and may fail without stopping the rest."""

    def __init__(self, out: Path, budget_s: float, argv: list[str]):
        self.out = out
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.report: dict[str, Any] = {"schema": SCHEMA, "command": " ".join(shlex.quote(a) for a in argv),
                                       "sections": {}}

    def section(self, name: str, fn: Callable[[], dict], needs: tuple[str, ...] = ()) -> dict | None:
        elapsed = time.perf_counter() - self.start
        missing = [n for n in needs if self.report["sections"].get(n, {}).get("status") != "ok"]
        if missing:
            row = {"status": "skipped", "reason": f"needs section(s) {missing}, which did not complete"}
        elif elapsed > self.budget_s:
            row = {"status": "skipped", "reason": f"time budget spent ({elapsed:.0f} s of {self.budget_s:.0f} s)"}
        else:
            print(f"[gpu_check] {name} ...", flush=True)
            t0 = time.perf_counter()
            try:
                row = {"status": "ok", **fn()}
            except Exception as e:  # noqa: BLE001 - one failing section must not hide the others
                row = {"status": "error", "error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}",
                       "traceback": traceback.format_exc(limit=6)[-2000:]}
            row["seconds"] = round(time.perf_counter() - t0, 2)
            print(f"[gpu_check] {name}: {row['status']} ({row['seconds']} s)"
                  + (f" {row['error']}" if row["status"] == "error" else ""), flush=True)
        self.report["sections"][name] = row
        self.save()
        return row if row["status"] == "ok" else None

    def save(self) -> None:
        self.report["wall_s"] = round(time.perf_counter() - self.start, 2)
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.out / "gpu_check.json", json.dumps(self.report, indent=1))
        _atomic_write(self.out / "gpu_check.md", render_markdown(self.report))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 4)


def count_host_syncs(run: Callable[[], None], device: torch.device) -> int | None:
    """Synchronising CUDA calls made through torch while ``run`` ran (None on the CPU: nothing to sync).

    ``torch.cuda.set_sync_debug_mode`` warns on every op that waits for the device (``.item()``,
    a device->host copy, ``nonzero``...). Work inside a replayed CUDA graph or a compiled library
    (AOTInductor's runner) is not seen by it; a graph capture that succeeded already proves that part
    sync-free, since a sync inside a capture is an error.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


class Setup:
    """Shapes, model and inputs of one check (the real size on a GPU, a tiny one in the dry run)."""

    def __init__(self, args):
        self.dry = args.dry_run
        self.device = torch.device("cpu" if args.dry_run else args.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device here; run with --dry-run to check the script on the CPU")
        self.dtype = torch.bfloat16
        self.config = WAN_DRY if self.dry else WAN21_1P3B
        if self.dry:
            # 12 steps: at 8 the 2x budget is exactly the predictor's forced steps (FFF....F), and quadratic
            # extrapolation 4 steps past its points (weights 15, -24, 10) amplifies bf16 rounding 50-fold
            args.height, args.width, args.frames, args.steps, args.text_tokens = 64, 64, 5, 12, 8
            args.repeats, args.e2e_repeats = min(args.repeats, 3), 1
        self.settings = SampleSettings(args.height, args.width, args.frames, args.steps, shift=3.0,
                                       guidance_scale=5.0)
        self.latent_shape = (16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
        _, f, h, w = self.latent_shape
        p = self.config["patch_size"]
        self.tokens = (f // p[0]) * (h // p[1]) * (w // p[2])
        self.text_shape = (args.text_tokens, self.config["text_dim"])
        self.steps = args.steps
        self.model_fp32 = None
        self.model = None
        self.finals: dict[str, torch.Tensor] = {}  # final latents per runtime backend, compared with eager

    def build_models(self) -> dict:
        torch.manual_seed(0)
        from diffusers import WanTransformer3DModel

        with torch.device(self.device):
            fp32 = WanTransformer3DModel(**self.config).eval()
        self.model_fp32 = fp32
        self.model = copy.deepcopy(fp32).to(self.dtype)
        self.adapter = adapter_for(self.model)
        self.adapter_fp32 = adapter_for(fp32)
        gen = torch.Generator().manual_seed(1)
        self.noise = torch.randn((1, *self.latent_shape), generator=gen).to(self.device)  # (1, C, F', H', W')
        self.text = (torch.randn((2, *self.text_shape), generator=gen) * 0.5).to(self.device, self.dtype)  # (2, L, D)
        params = sum(p.numel() for p in self.model.parameters())
        return {"class": type(self.model).__name__, "parameters": params, "layers": self.config["num_layers"],
                "width": self.config["num_attention_heads"] * self.config["attention_head_dim"],
                "dtype": "bfloat16", "weights": "random (speed does not depend on values)",
                "latents": [1, *self.latent_shape], "tokens": self.tokens, "text_embeds": [2, *self.text_shape],
                "steps": self.steps, "height": self.settings.height, "width_px": self.settings.width,
                "frames": self.settings.frames}


def section_eager(s: Setup, repeats: int) -> dict:
    """The diffusers forward itself, both CFG branches in one batch, no caching."""
    x = s.noise.expand(2, *s.noise.shape[1:]).to(s.dtype)  # (2, C, F', H', W')
    t = torch.full((2,), 500.0, device=s.device)
    with torch.no_grad():
        sec = median_seconds(lambda: s.model(hidden_states=x, timestep=t, encoder_hidden_states=s.text,
                                             return_dict=False), repeats, warmup=2, device=s.device)
    return {"forward_ms": round(sec * 1e3, 3), "batch": 2}


def section_calibration(s: Setup, prompts: list[int]) -> dict:
    """A 2x open-loop profile on each prompt count; peak device memory of each."""
    rows, outcome, cal, wall = {}, None, None, 0.0
    for n in prompts:
        gen = torch.Generator().manual_seed(10 + n)
        cal = CalibrationSet(s.adapter, initial_latents(s.latent_shape, range(n), "cpu"),
                             (torch.randn((2 * n, *s.text_shape), generator=gen) * 0.5).to(s.dtype),
                             s.settings.guidance_scale, nominal_sigmas(s.steps, s.settings.shift))
        # the product's predictor (Taylor order 2, K = 3 residual slots), open loop: 2 uncached passes
        config = CalibrationConfig(speedup=2.0, loop="open", predictor=PredictorConfig("taylor", 2), batch_size=1)
        # on the CPU the host store and the residual bank are the same memory as the "device": not counted
        held = (lambda c=cal: c.store.tensors() + (list(c.bank.residuals.values()) if c.bank else [])) \
            if s.device.type == "cpu" else None
        t0 = time.perf_counter()
        with PeakMemory(s.device, exclude=held) as mem:
            outcome = calibrate(cal, config, progress=False, log=lambda m: None)
        wall = time.perf_counter() - t0
        rows[str(n)] = {"peak_gib": _gib(mem.peak_bytes), "peak_bytes": mem.peak_bytes, "wall_s": round(wall, 2),
                        "full_steps": outcome.result.full_steps}
    fingerprint = fingerprint_module(s.model)
    s.profile = profile_from_outcome(outcome, cal, config, s.settings, "wan2.1-1.3b-random", fingerprint,
                                     [f"random text {k}" for k in range(prompts[-1])], 0, wall, s.dtype)
    peaks = [r["peak_bytes"] for r in rows.values()]
    return {"prompts": rows, "loop": "open", "speedup": 2.0, "predictor": "taylor order 2 (K = 3)",
            "mask": "".join("F" if m else "." for m in s.profile.mask),
            "peak_ratio_last_over_first": round(peaks[-1] / max(peaks[0], 1), 4),
            "note": "peak device memory above the model's weights; per-prompt state is in (pinned) host memory"}


def section_export(s: Setup, work: Path) -> dict:
    """Bake the profile into the step graphs and AOTInductor-compile them for the device; validate."""
    profile_dir = work / "profile"
    s.profile.save(profile_dir, plot=False)  # the plot needs matplotlib, absent on a bare GPU machine
    s.folder = work / "export"
    identity = ModelIdentity("wan2.1-1.3b-random", s.profile.model_fingerprint, type(s.model).__name__,
                             text_encoder={"kind": "random", "embed_shape": list(s.text_shape)})
    cfg = ExportConfig(out=s.folder, targets=("aoti",), dtype="bf16", decode_graph=False, check_compile=False,
                       timing_repeats=3)
    report = ExportPackage(cfg, log=lambda m: print(f"  {m}", flush=True))(
        s.adapter, s.profile, identity, s.text_shape, profile_dir=profile_dir)
    return {"stage_s": {k: round(v, 2) for k, v in report.stage_s.items()},
            "validation_vs_eager": report.validation.get("aoti"), "timing": report.timing,
            "aoti_bytes": sum(v for k, v in report.files.items() if k.startswith("aoti/"))}


def bench_runtime(rt: Runtime, s: Setup, repeats: int, e2e_repeats: int) -> dict:
    step_s = rt.time_graphs(repeats=repeats)
    full_s, cached_s = step_s["full_step"], step_s["cached_step"]
    c = cached_s / full_s
    def uncached():  # every step full: timing only (the folder's tables are fitted for its own mask)
        rt.load_inputs(s.noise, s.text)
        rt.run_plan(rt.all_full_plan())

    e2e = interleaved_medians({"uncached": uncached, "cached": lambda: rt.sample(s.noise, s.text, check_finite=False)},
                              e2e_repeats, warmup=1, device=rt.device)
    n_full = sum(rt.mask)
    ideal = ideal_speedup(rt.steps, n_full, c)
    measured = e2e["uncached"] / e2e["cached"]
    rt.load_inputs(s.noise, s.text)
    plan = rt.plan()
    short, long = 2, min(len(plan), 6)
    alloc = measure_allocations(lambda n: rt.run_plan(plan[:n]), rt.device, short=short, long=long)
    syncs_short = count_host_syncs(lambda: rt.run_plan(plan[:short]), rt.device)
    syncs_long = count_host_syncs(lambda: rt.run_plan(plan[:long]), rt.device)
    syncs = None if syncs_short is None else (syncs_long - syncs_short) / (long - short)
    final = rt.sample(s.noise, s.text, check_finite=False).clone()
    return {"full_ms": round(full_s * 1e3, 3), "cached_ms": round(cached_s * 1e3, 3), "c": round(c, 4),
            "uncached_s": round(e2e["uncached"], 4), "cached_s": round(e2e["cached"], 4),
            "speedup": round(measured, 3), "ideal": round(ideal, 3), "measured_over_ideal": round(measured / ideal, 3),
            "host_syncs_per_step": syncs, "torch_allocs_per_step": alloc.torch_allocs_per_step,
            "torch_bytes_per_step": alloc.torch_bytes_per_step, "python_bytes_per_step": alloc.python_bytes_per_step,
            "final_finite": bool(torch.isfinite(final).all()), "_final": final}


def section_runtime(s: Setup, backend: str, repeats: int, e2e_repeats: int) -> dict:
    from ertacache.engines.torch_compile import TorchCompileEngine, step_modules

    if backend == "eager":
        make = lambda: Runtime(s.folder, "torch", device=s.device, engine=TorchCompileEngine(  # noqa: E731
            step_modules(s.adapter, s.profile, s.device), s.device, compile_backend=None, cuda_graphs=False))
    elif backend == "torch.compile":
        make = lambda: Runtime(s.folder, "torch", device=s.device, engine=TorchCompileEngine(  # noqa: E731
            step_modules(s.adapter, s.profile, s.device), s.device, cuda_graphs=True))
    else:
        make = lambda: Runtime(s.folder, "aoti", device=s.device)  # noqa: E731
    # on the CPU the peak is not measured here: the CPU tracker is a dispatch mode, which torch.compile refuses
    mem = PeakMemory(s.device) if s.device.type == "cuda" else contextlib.nullcontext()
    with mem:
        t0 = time.perf_counter()
        with make() as rt:
            open_s = time.perf_counter() - t0
            row = bench_runtime(rt, s, repeats, e2e_repeats)
    final = row.pop("_final")
    s.finals[backend] = final
    row.update({"open_s": round(open_s, 2), "peak_gib": _gib(getattr(mem, "peak_bytes", None)),
                "cuda_graphs": backend == "torch.compile" and s.device.type == "cuda"})
    if "eager" in s.finals and backend != "eager":
        ref = s.finals["eager"].double()
        row["rel_l2_vs_eager"] = float((final.double() - ref).norm() / ref.norm().clamp_min(1e-30))
    return row


def section_precision(s: Setup) -> dict:
    """The whole cached schedule in bf16 vs in fp32 (same weights, noise, text and tables)."""
    tables = s.profile.tables().to(s.device)
    with torch.no_grad():
        bf16 = CachedSampler(s.adapter, tables, s.profile.mask)(s.noise, s.text, s.settings.guidance_scale).latents
        fp32 = CachedSampler(s.adapter_fp32, tables, s.profile.mask)(s.noise, s.text.float(),
                                                                      s.settings.guidance_scale).latents
    ref = fp32.double()
    return {"rel_l2_bf16_vs_fp32": float((bf16.double() - ref).norm() / ref.norm().clamp_min(1e-30)),
            "max_abs": float((bf16.double() - ref).abs().max()), "bf16_finite": bool(torch.isfinite(bf16).all()),
            "fp32_finite": bool(torch.isfinite(fp32).all()), "schedule": "cached (the calibration's 2x mask)"}


#: one small random model per family beyond Wan T2V, at the real checkpoints' head size (the step graphs'
#: structure, not their cost, is what this checks): (name, builder, latent shape, conditioning shapes)
def _family_models(dry: bool):
    from diffusers import (CogVideoXTransformer3DModel, FluxTransformer2DModel, HunyuanVideoTransformer3DModel,
                           WanTransformer3DModel)

    from ertacache.models.cogvideox import VPNoiseSchedule, attach_noise_schedule

    def cogvideox():
        """CogVideoX-5B-style (rotary), with 5B's DDIM schedule attached (the loader reads it from the folder)."""
        model = CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=head, in_channels=16, out_channels=16, time_embed_dim=32,
            text_embed_dim=text, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
            max_text_seq_length=32, use_rotary_positional_embeddings=True)
        attach_noise_schedule(model, VPNoiseSchedule(snr_shift_scale=1.0))
        return model

    head = 16 if dry else 128
    rope = (2, 6, 8) if dry else (16, 56, 56)
    text = 16 if dry else 4096
    return [
        ("hunyuanvideo", lambda: HunyuanVideoTransformer3DModel(
            num_attention_heads=2, attention_head_dim=head, num_layers=1, num_single_layers=1, num_refiner_layers=1,
            text_embed_dim=text, pooled_projection_dim=32 if dry else 768, rope_axes_dim=rope, in_channels=16,
            out_channels=16), (16, 3, 16, 16),
         {"prompt_embeds": (32, text), "prompt_attention_mask": (32,), "pooled_prompt_embeds": (32 if dry else 768,)}),
        ("wan-i2v", lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head, in_channels=36, out_channels=16,
            text_dim=text, freq_dim=32 if dry else 256, ffn_dim=4 * head, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=32 if dry else 1280, added_kv_proj_dim=2 * head,
            rope_max_seq_len=1024), (16, 3, 16, 16),
         {"text_embeds": (512, text), "image_embeds": (9 if dry else 257, 32 if dry else 1280),
          "image_latents": (20, 3, 16, 16)}),
        ("flux", lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=head,
            num_attention_heads=2, joint_attention_dim=text, pooled_projection_dim=32 if dry else 768,
            guidance_embeds=True, axes_dims_rope=rope), (16, 32, 32),
         {"prompt_embeds": (32, text), "pooled_prompt_embeds": (32 if dry else 768,)}),
        ("cogvideox", cogvideox, (16, 3, 16, 16), {"text_embeds": (32, text)}),
    ]


def section_families(s: Setup, work: Path) -> dict:
    """The other families' step graphs on the device: baked (three reused steps between full ones), run eagerly
    and, off the dry run, AOTInductor-compiled for the device; each validated over the schedule against the eager
    sampler in bf16. Random weights and a hand-written reuse profile: this checks that the graphs build and run
    on the device, not speed or fidelity."""
    from ertacache.export.aoti_target import AotiPackageFromExportedProgram
    from ertacache.export.graphs import BakeStepGraphs
    from ertacache.export.runners import AotiRunner, EagerRunner, relative_l2, run_schedule
    from ertacache.profile.artifact import Profile

    steps, out = 8, {}
    mask = [True, True, False, True, False, False, True, True]
    for name, build, latent, shapes in _family_models(s.dry):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(s.device):
            model = build().eval().to(s.dtype)
        adapter = adapter_for(model)
        family = adapter.family
        guided = family.guidance != "cfg"
        nb = 1 if guided else 2
        seq = latent[-1] * latent[-2] // 4
        own = adapter.own_sigmas(steps)  # a table the checkpoint fixes (CogVideoX's DDIM), else the family's
        nominal = own if own is not None else family.sigmas(steps, shift=3.0, seq_len=seq)
        c = latent[0]
        profile = Profile(f"{name}-random", fingerprint_module(model), steps, 3.0, 8 * latent[-2], 8 * latent[-1],
                          4 * (latent[1] - 1) + 1 if len(latent) == 4 else None, list(latent), 4.0, nb, 0.0,
                          mask, list(nominal), list(nominal), [1.0] * steps, torch.zeros(steps, nb, c),
                          torch.zeros(steps, nb, c), {}, {}, guidance="embedded" if guided else "cfg")
        graphs = BakeStepGraphs(batch_size=1, dtype=s.dtype, text_shape=shapes)(adapter, profile)
        gen = torch.Generator().manual_seed(3)
        noise = torch.randn((1, *latent), generator=gen).to(s.device)
        cond = {}
        for spec in family.conditioning:
            rows = spec.expected_rows(1, nb)
            shape = ((rows,) if rows is not None else ()) + tuple(shapes[spec.name])
            value = torch.randn(shape, generator=gen) * 0.5
            if spec.name == "prompt_attention_mask":
                value = (torch.arange(shape[-1]) < shape[-1] // 2).float().expand(shape)  # half the tokens real
            cond[spec.name] = value.to(s.device, s.dtype)
        flat = tuple(cond[n] for n in family.input_names)
        if len(flat) == 1:
            cond = flat[0]  # a one-input family (CogVideoX) takes its one tensor, not a mapping
        with torch.no_grad():
            ref = CachedSampler(adapter, profile.tables(), mask)(noise, cond, 4.0).latents
            row = {"class": type(model).__name__, "inputs": list(family.input_names),
                   "eager_graphs_rel_l2": relative_l2(run_schedule(EagerRunner(graphs.modules), mask, noise, flat,
                                                                   4.0), ref)}
            if not s.dry:
                folder = work / name
                target = AotiPackageFromExportedProgram()
                runner = AotiRunner({g: target(g, graphs.programs[g], folder).path for g in graphs.programs})
                row["aoti_rel_l2"] = relative_l2(run_schedule(runner, mask, noise, flat, 4.0), ref)
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        out[name] = row
        del model, adapter, graphs
    return out


def render_markdown(report: dict) -> str:
    secs = report["sections"]
    env = secs.get("env", {})
    model = secs.get("model", {})
    lines = [f"Device: **{env.get('gpu') or env.get('device', '?')}** "
             f"(capability {env.get('gpu_capability', '-')}), torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, "
             f"{'DRY RUN on the CPU, tiny model: not a GPU figure' if env.get('dry_run') else 'GPU run'}.",
             f"Command: `{report['command']}` ({report.get('wall_s', 0):.0f} s).", ""]
    if model.get("status") == "ok":
        lines += [f"Model: {model['class']} ({model['parameters'] / 1e6:,.1f} M parameters, {model['layers']} layers, "
                  f"width {model['width']}, {model['dtype']}, {model['weights']}); latents {model['latents']} = "
                  f"{model['tokens']} tokens, text {model['text_embeds']}, {model['steps']} steps.", ""]
    eager = secs.get("eager", {})
    lines += ["| backend | full step ms | cached step ms | c | end-to-end speedup | ideal | measured/ideal | "
              "host syncs/step | torch allocs/step | peak GiB | rel L2 vs eager |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    if eager.get("status") == "ok":
        lines.append(f"| diffusers forward (batch 2, no cache) | {eager['forward_ms']:.2f} | | | | | | | | | |")
    for backend in ("eager", "torch.compile", "aoti"):
        r = secs.get(f"runtime {backend}", {})
        if r.get("status") != "ok":
            lines.append(f"| {backend} | {r.get('status', 'not run')}: {r.get('error', r.get('reason', ''))[:80]} "
                         "| | | | | | | | | |")
            continue
        syncs = "n/a (cpu)" if r["host_syncs_per_step"] is None else f"{r['host_syncs_per_step']:.1f}"
        l2 = f"{r['rel_l2_vs_eager']:.2e}" if "rel_l2_vs_eager" in r else "reference"
        lines.append(f"| {backend}{' + CUDA graphs' if r['cuda_graphs'] else ''} | {r['full_ms']:.2f} | "
                     f"{r['cached_ms']:.2f} | {r['c']:.3f} | {r['speedup']:.2f}x | {r['ideal']:.2f}x | "
                     f"{r['measured_over_ideal']:.2f} | {syncs} | {r['torch_allocs_per_step']:.1f} | "
                     f"{'n/a (cpu)' if r['peak_gib'] is None else format(r['peak_gib'], '.3f')} | {l2} |")
    cal = secs.get("calibration", {})
    if cal.get("status") == "ok":
        per = ", ".join(f"{n} prompt(s): {r['peak_bytes'] / 2**20:,.1f} MiB in {r['wall_s']:.1f} s"
                        for n, r in cal["prompts"].items())
        lines += ["", f"Calibration (2x, open loop) peak device memory above the weights: {per} "
                      f"(ratio {cal['peak_ratio_last_over_first']:.3f}); mask `{cal['mask']}`."]
    exp = secs.get("export", {})
    if exp.get("status") == "ok":
        v = exp.get("validation_vs_eager") or {}
        lines += [f"Export (AOTInductor, bf16): stages {exp['stage_s']}; final latents vs eager over the schedule: "
                  f"relative L2 {v.get('rel_l2', float('nan')):.2e}."]
    prec = secs.get("precision", {})
    if prec.get("status") == "ok":
        lines += [f"Precision: whole cached schedule bf16 vs fp32: relative L2 {prec['rel_l2_bf16_vs_fp32']:.3e}, "
                  f"max |diff| {prec['max_abs']:.3e}, finite: bf16 {prec['bf16_finite']}, fp32 {prec['fp32_finite']}."]
    fam = secs.get("families", {})
    if fam.get("status") == "ok":
        rows = [f"{name} ({r['class']}, inputs {', '.join(r['inputs'])}): eager graphs {r['eager_graphs_rel_l2']:.1e}"
                + (f", AOTInductor {r['aoti_rel_l2']:.2e}" if "aoti_rel_l2" in r else "") + f" ({r['wall_s']:.0f} s)"
                for name, r in fam.items() if isinstance(r, dict)]
        lines += [f"Other families, bf16 step graphs vs the eager sampler over an 8-step reuse schedule (relative L2 "
                  f"of the final latents): {'; '.join(rows)}."]
    bad = [f"{k}: {v['status']} ({v.get('error') or v.get('reason')})" for k, v in secs.items()
           if v.get("status") != "ok"]
    if bad:
        lines += ["", "Not measured: " + "; ".join(bad)]
    return "\n".join(lines) + "\n"


def fill_docs(result: Path, docs: Path) -> None:
    """Replace the text between the gpu-check markers of ``docs`` with the markdown of ``result``."""
    report = json.loads(result.read_text())
    if report.get("sections", {}).get("env", {}).get("dry_run"):
        raise SystemExit(f"{result} is a dry run on the CPU; only a GPU run goes into {docs}")
    text = docs.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise SystemExit(f"{docs} has no {DOCS_BEGIN} ... {DOCS_END} section to fill")
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    _atomic_write(docs, f"{head}{DOCS_BEGIN}\n{render_markdown(report)}{DOCS_END}{tail}")
    print(f"filled {docs} from {result}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder for gpu_check.json / .md")
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU at a tiny shape (CI)")
    p.add_argument("--device", default="cuda", help="CUDA device (default: cuda)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=9, help="video frames (latent frames = (frames - 1) / 4 + 1)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per step graph (median)")
    p.add_argument("--e2e-repeats", type=int, default=3, help="timed whole-schedule runs (median)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the sections still waiting once this many seconds have passed (default: 330 on a "
                        "GPU, so the check fits a device window; no limit for --dry-run, which must run everything)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip, e.g. 'runtime aoti,precision'")
    p.add_argument("--fill-docs", type=Path, metavar="GPU_CHECK_JSON",
                   help="only put this result's markdown into --docs, then exit")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "engines.md", help="the page --fill-docs fills")
    args = p.parse_args(argv)
    if args.fill_docs:
        fill_docs(args.fill_docs, args.docs)
        return 0
    setup = Setup(args)
    budget = args.budget_s if args.budget_s is not None else (float("inf") if args.dry_run else 330.0)
    check = Check(args.out, budget, ["python", "tools/gpu_check.py", *argv])
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}

    def run(name, fn, needs=()):
        if name in skip:
            check.report["sections"][name] = {"status": "skipped", "reason": "--skip"}
            check.save()
            return None
        return check.section(name, fn, needs)

    run("env", lambda: {**machine_info(setup.device), "dry_run": setup.dry, "versions": package_versions()})
    run("model", setup.build_models)
    run("eager", lambda: section_eager(setup, args.repeats), needs=("model",))
    run("calibration", lambda: section_calibration(setup, [1, 2]), needs=("model",))
    with tempfile.TemporaryDirectory(prefix="ertacache-gpu-check-") as tmp:
        run("export", lambda: section_export(setup, Path(tmp)), needs=("calibration",))
        for backend in ("eager", "torch.compile", "aoti"):
            run(f"runtime {backend}", lambda b=backend: section_runtime(setup, b, args.repeats, args.e2e_repeats),
                needs=("export",))
    run("precision", lambda: section_precision(setup), needs=("calibration",))
    with tempfile.TemporaryDirectory(prefix="ertacache-gpu-check-families-") as tmp:
        run("families", lambda: section_families(setup, Path(tmp)))
    check.save()
    print(render_markdown(check.report))
    failed = [k for k, v in check.report["sections"].items() if v["status"] == "error"]
    print(f"[gpu_check] wrote {args.out / 'gpu_check.json'} and gpu_check.md"
          + (f"; failed sections: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
