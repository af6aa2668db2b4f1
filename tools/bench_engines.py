"""Engine benchmark: step times per backend, c = cached/full, end-to-end speedup vs the ideal bound, bytes per step.

    python tools/bench_engines.py --json bench.json [--wan13b] [--no-torch-compile] [--repeats 5]

In one run, for each model case (the embedded testbed wan2.1-tiny when it loads;
a mid-size random Wan2.1-architecture model; with --wan13b the Wan2.1-T2V-1.3B
architecture with random weights at latents 1x16x3x16x16 and 512 text tokens):
export the step graphs (ONNX, AOTInductor) to a temporary folder, open each
backend through ertacache.runtime.Runtime and measure, as medians after warm-up:

    full_ms, cached_ms, c = cached/full         one bound call of each graph
    uncached_s, cached_s                        whole schedule, all-full mask vs the folder's mask
    speedup = uncached_s / cached_s, ideal = T / (N_full + N_cached * c), measured/ideal
    alloc: Python bytes/step, torch allocations/step, C-heap growth/step (ertacache.runtime.alloc)

Backends: eager (the step modules, uncompiled), torch (torch.compile, Inductor), onnxruntime (CPU), aoti.
Each case runs once per cached-step predictor (--predictors: the paper's reuse, K = 1, and the Taylor
order-2 prediction from K = 3 residual slots), so c and measured/ideal of the two come from one run.
Speed numbers from random weights are valid (cost does not depend on values); the mask is synthetic
(three warm-up full steps, then alternating) because calibrating random weights says nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ertacache.export import ExportConfig, ExportPackage, ModelIdentity  # noqa: E402
from ertacache.export.manifest import package_versions  # noqa: E402
from ertacache.models.adapter import adapter_for  # noqa: E402
from ertacache.models.loading import fingerprint_module  # noqa: E402
from ertacache.profile.artifact import Profile  # noqa: E402
from ertacache.runtime import Runtime, measure_allocations  # noqa: E402
from ertacache.sampling.sigmas import nominal_sigmas  # noqa: E402
from ertacache.timing import interleaved_medians  # noqa: E402

#: diffusers' config of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (as tools/export_real_size.py)
WAN21_1P3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
#: a mid-size model of the same class (FACTS.md: 4-8 layers, width 256-512 for CPU benchmarks)
WAN_MID = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
               text_dim=256, freq_dim=64, ffn_dim=1024, num_layers=6, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=256)


#: the cached step's predictors compared in one run: name -> Taylor order (0 = the paper's reuse, K = 1)
PREDICTORS = {"reuse": 0, "taylor2": 2}


def synthetic_mask(steps: int) -> list[bool]:
    """FFF then .F.F.: three warm-up steps (an order-2 predictor's K), then alternating; the same for every
    predictor so their ideal speedups are equal and c is the only difference."""
    return [i < 3 or i % 2 == 0 for i in range(steps)]


def synthetic_profile(model, model_id: str, latent_shape, steps: int, guidance: float = 5.0,
                      order: int = 0) -> Profile:
    c = latent_shape[0]
    mask = synthetic_mask(steps)
    sig = nominal_sigmas(steps, 3.0)
    prof = Profile(model_id, fingerprint_module(model), steps, 3.0, latent_shape[2] * 8, latent_shape[3] * 8,
                   (latent_shape[1] - 1) * 4 + 1, list(latent_shape), guidance, 2, 0.0, mask, list(sig), list(sig),
                   [1.0] * steps, torch.zeros(steps, 2, c), torch.zeros(steps, 2, c), {"synthetic": True}, {})
    if order:
        from ertacache.profile.predictor import taylor_weights

        prof.pred_w = torch.as_tensor(taylor_weights(mask, order + 1), dtype=torch.float32)  # (T, K, 1)
        prof.predictor = {"kind": "taylor", "order": order, "history": order + 1}
    return prof


def random_wan(config: dict, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**config).eval()


def model_cases(args):
    """(name, transformer, latent_shape, text_shape, steps, targets, note) per case."""
    cases = []
    try:
        from ertacache.models.loading import load_bundle

        bundle = load_bundle("wan2.1-tiny")
        d = bundle.recipe.defaults
        latent = bundle.latent_shape(d.frames, d.height, d.width)
        text = tuple(bundle.encode(["digit 1 moving up"], "", 2).shape[1:])
        cases.append(("testbed wan2.1-tiny", bundle.transformer, latent, text, args.steps, ("onnx", "aoti"),
                      "trained testbed weights"))
    except Exception as e:  # noqa: BLE001 - report and go on with the other cases
        print(f"[bench] testbed wan2.1-tiny skipped: {type(e).__name__}: {str(e)[:200]}")
        cases.append(("testbed wan2.1-tiny", None, None, None, 0, (), f"not loadable here: {type(e).__name__}"))
    cases.append(("wan-mid random (6 layers, width 256)", random_wan(WAN_MID), (16, 3, 16, 16), (64, 256),
                  args.steps, ("onnx", "aoti"), "random weights"))
    if args.wan13b:
        start = time.perf_counter()
        model = random_wan(WAN21_1P3B)
        print(f"[bench] Wan2.1-1.3B architecture instantiated in {time.perf_counter() - start:.0f} s")
        cases.append(("wan2.1-1.3b random", model, (16, 3, 16, 16), (512, 4096), args.wan13b_steps,
                      tuple(t for t in ("onnx",) if args.wan13b_onnx), "random weights, 192 tokens"))
    return cases


def time_e2e(rt: Runtime, noise, text, repeats: int) -> tuple[float, float]:
    """Median seconds of the whole schedule, all-full vs cached mask, interleaved (noise hits both alike)."""
    def uncached():  # every step full: timing only (the folder's tables are fitted for its own mask)
        rt.load_inputs(noise, text)
        rt.run_plan(rt.all_full_plan())

    med = interleaved_medians({"uncached": uncached, "cached": lambda: rt.sample(noise, text, check_finite=False)},
                              repeats, warmup=1, device=rt.device)
    return med["uncached"], med["cached"]


def bench_backend(rt: Runtime, noise, text, repeats: int, e2e_repeats: int) -> dict:
    mask = rt.mask
    step_s = rt.time_graphs(("full_step", "cached_step"), repeats)
    full_s, cached_s = step_s["full_step"], step_s["cached_step"]
    c = cached_s / full_s
    unc, cac = time_e2e(rt, noise, text, e2e_repeats)
    n_full = sum(mask)
    ideal = len(mask) / (n_full + (len(mask) - n_full) * c)
    rt.load_inputs(noise, text)
    plan = rt.plan()
    alloc = measure_allocations(lambda n: rt.run_plan(plan[:n]), rt.device, short=2, long=min(len(plan), 6))
    return {"full_ms": full_s * 1e3, "cached_ms": cached_s * 1e3, "c": c, "uncached_s": unc, "cached_s": cac,
            "speedup": unc / cac, "ideal": ideal, "measured_over_ideal": unc / cac / ideal, "alloc": alloc.to_json()}


def run_case(name, model, latent, text_shape, steps, targets, args, out: dict, order: int = 0) -> None:
    adapter = adapter_for(model)
    profile = synthetic_profile(model, "bench", latent, steps, order=order)
    identity = ModelIdentity("bench", profile.model_fingerprint, type(model).__name__,
                             text_encoder={"kind": "random", "embed_shape": list(text_shape)})
    rows = {}
    with tempfile.TemporaryDirectory(prefix="ertacache-bench-") as tmp:
        folder = Path(tmp) / "export"
        start = time.perf_counter()
        if targets:
            ExportPackage(ExportConfig(out=folder, targets=targets, decode_graph=False, timing_repeats=0,
                                       check_compile=False), log=lambda s: None)(adapter, profile, identity, text_shape)
        else:
            _manifest_only_folder(folder, adapter, profile, identity, text_shape)
        export_s = time.perf_counter() - start
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(1, *latent, generator=gen)
        text = torch.randn(2, *text_shape, generator=gen)
        from ertacache.engines.torch_compile import TorchCompileEngine, step_modules

        backends = [("eager", lambda: Runtime(folder, "torch", engine=TorchCompileEngine(
            step_modules(adapter, profile), compile_backend=None), verify_files=False))]
        if args.torch_compile and model is not None and "1.3b" not in name:
            backends.append(("torch.compile", lambda: Runtime(folder, "torch", engine=TorchCompileEngine(
                step_modules(adapter, profile)), verify_files=False)))
        if "onnx" in targets:
            backends.append(("onnxruntime", lambda: Runtime(folder, "onnxruntime", verify_files=False)))
        if "aoti" in targets:
            backends.append(("aoti", lambda: Runtime(folder, "aoti", verify_files=False)))
        for backend, make in backends:
            start = time.perf_counter()
            try:
                with make() as rt:
                    open_s = time.perf_counter() - start
                    row = bench_backend(rt, noise, text, args.repeats, args.e2e_repeats if "1.3b" not in name else 1)
                    row["open_s"] = open_s
            except Exception as e:  # noqa: BLE001 - one backend failing must not hide the others
                row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows[backend] = row
            print(f"[bench] {name} / {backend}: " + (row.get("error") or
                  f"full {row['full_ms']:.2f} ms cached {row['cached_ms']:.2f} ms c {row['c']:.3f} "
                  f"speedup {row['speedup']:.2f}x ideal {row['ideal']:.2f}x ({row['measured_over_ideal']:.2f})"))
    out[name] = {"latents": [1, *latent], "text_embeds": [2, *text_shape], "steps": steps,
                 "full_steps": sum(profile.mask), "export_s": export_s, "backends": rows}


def _manifest_only_folder(folder: Path, adapter, profile: Profile, identity, text_shape) -> None:
    """A folder with only a manifest and the profile (no graph files), enough for the eager and torch backends.

    Used for the 1.3B case without --wan13b-onnx: its ONNX export takes ~4 minutes and 12 GB here.
    It follows the contract (ertacache.contract): every file listed and hashed, schedule = profile/.
    """
    from ertacache.contract import FORMAT, FULL_OUTPUTS, LOOP, SCHEMA_VERSION, STEP_INPUTS, TensorSpec, residual_slots
    from ertacache.export.graphs import example_step_inputs
    from ertacache.export.manifest import file_entries, write_manifest
    from ertacache.sampling.steps import FullStep

    ins = example_step_inputs(profile.latent_shape, 1, 2, text_shape, torch.float32)
    with torch.no_grad():
        outs = FullStep(adapter, profile.tables())(*ins)
    full_in = [TensorSpec.of(n, t).to_json() for n, t in zip(STEP_INPUTS, ins)]
    full_out = [TensorSpec.of(n, t).to_json() for n, t in zip(FULL_OUTPUTS, outs)]
    folder.mkdir(parents=True)
    profile.save(folder / "profile", plot=False)
    write_manifest(folder, {
        "schema_version": SCHEMA_VERSION, "format": FORMAT,
        "model": {"id": identity.model_id, "fingerprint": identity.fingerprint, "path": None},
        "text_encoder": identity.text_encoder,
        "profile": {"folder": "profile", "steps": profile.steps, "shift": profile.shift, "lambda": profile.lam,
                    "mask": list(profile.mask), "sigmas": list(profile.sigmas),
                    "nominal_sigmas": list(profile.nominal_sigmas), "phi": list(profile.phi),
                    "guidance_scale": profile.guidance_scale, "n_branches": profile.n_branches,
                    "history": profile.history, "predictor": dict(profile.predictor)},
        "shapes": {"batch_size": 1, "height": profile.height, "width": profile.width, "frames": profile.frames,
                   "latents": full_in[0]["shape"], "text_embeds": full_in[2]["shape"],
                   "residual": full_out[1]["shape"]},
        "dtype": "fp32", "opset": None, "targets": {}, "files": file_entries(folder), "versions": package_versions(),
        "runtime": {"loop": LOOP},
        "graphs": {"full_step": {"inputs": full_in, "outputs": full_out},
                   "cached_step": {"inputs": full_in + [dict(full_out[1], name=n)
                                                        for n in residual_slots(profile.history)],
                                   "outputs": [full_out[0]]}},
    })


def machine() -> dict:
    load = os.getloadavg()
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_1m": load[0],
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def print_table(results: dict) -> None:
    print(f"\n{'case':38s} {'backend':14s} {'full ms':>9s} {'cached ms':>10s} {'c':>6s} {'unc s':>7s} {'cach s':>7s} "
          f"{'speedup':>8s} {'ideal':>6s} {'meas/ideal':>10s} {'py B/step':>9s} {'torch B/step':>12s}")
    for case, r in results.items():
        for backend, row in r.get("backends", {}).items():
            if "error" in row:
                print(f"{case:38s} {backend:14s} {row['error'][:80]}")
                continue
            a = row["alloc"]
            print(f"{case:38s} {backend:14s} {row['full_ms']:9.2f} {row['cached_ms']:10.2f} {row['c']:6.3f} "
                  f"{row['uncached_s']:7.3f} {row['cached_s']:7.3f} {row['speedup']:8.2f} {row['ideal']:6.2f} "
                  f"{row['measured_over_ideal']:10.2f} {a['python_bytes_per_step']:9.0f} "
                  f"{a['torch_bytes_per_step']:12.0f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="write the results here")
    p.add_argument("--steps", type=int, default=20, help="schedule length of the small cases")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per step graph (median)")
    p.add_argument("--e2e-repeats", type=int, default=3, help="timed whole-schedule runs (median)")
    p.add_argument("--no-torch-compile", dest="torch_compile", action="store_false",
                   help="skip torch.compile (Inductor compiles take ~1 min per case on 2 cores)")
    p.add_argument("--wan13b", action="store_true", help="also the Wan2.1-1.3B architecture (random, ~6 GB, minutes)")
    p.add_argument("--wan13b-steps", type=int, default=4, help="schedule length of the 1.3B case")
    p.add_argument("--wan13b-onnx", action="store_true", help="also ONNX Runtime for 1.3B (export: ~4 min, 12 GB)")
    p.add_argument("--predictors", default=",".join(PREDICTORS),
                   help=f"cached-step predictors to export and time per case, of {list(PREDICTORS)} (the ratios "
                        "of one run compare them)")
    args = p.parse_args(argv)
    predictors = [x.strip() for x in args.predictors.split(",") if x.strip()]
    unknown = [x for x in predictors if x not in PREDICTORS]
    if unknown or not predictors:
        print(f"error: --predictors takes a comma list of {list(PREDICTORS)}, got {args.predictors!r}",
              file=sys.stderr)
        return 2
    results: dict = {}
    start = time.perf_counter()
    for name, model, latent, text, steps, targets, note in model_cases(args):
        if model is None:
            results[name] = {"skipped": note}
            continue
        for pred in predictors:
            case = name if pred == "reuse" else f"{name} / {pred}"
            run_case(case, model, latent, text, steps, targets, args, results, order=PREDICTORS[pred])
            results[case]["note"] = note
            results[case]["predictor"] = pred
    report = {"machine": machine(), "versions": package_versions(), "bench_s": time.perf_counter() - start,
              "method": __doc__.split("\n\n")[2], "results": results}
    Path(args.json).write_text(json.dumps(report, indent=1))
    print_table(results)
    print(f"\nwritten to {args.json} ({report['bench_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
