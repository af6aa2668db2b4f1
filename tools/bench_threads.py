"""Thread study: step times with 1 vs all threads, on an idle and on a loaded machine, in one run.

    python tools/bench_threads.py --json threads.json [--rounds 3] [--repeats 15] [--no-torch-compile]

On the shipped testbed wan2.1-tiny (trained weights, a synthetic alternating mask), export the
step graphs (ONNX, AOTInductor) once to a temporary folder and time one bound call of
``full_step`` and ``cached_step`` (medians) for every backend the runtime has on the CPU:
eager PyTorch, torch.compile (Inductor), ONNX Runtime and AOTInductor, at 1 thread and at all
cores, with the machine idle and with a second process burning one core ("loaded": a plain
``while True: pass`` Python loop). The four conditions are interleaved in rounds so that the
machine's own drift hits them alike; the table reports each time and the ratio all/1.

Threads: torch's (torch.set_num_threads; eager, and the Inductor code of torch.compile and
AOTInductor, compiled with cpp.dynamic_threads so they follow it) and ONNX Runtime's
intra_op_num_threads (one session per thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ertacache.export import ExportConfig, ExportPackage, ModelIdentity  # noqa: E402
from ertacache.export.manifest import package_versions  # noqa: E402
from ertacache.models.loading import load_bundle  # noqa: E402
from ertacache.runtime import Runtime  # noqa: E402

from bench_engines import synthetic_profile  # noqa: E402  (tools/ is on sys.path when run as a script)


class Burner:
    """A second process spinning one core for as long as the context lasts (bounded by a timeout)."""

    def __init__(self, seconds: int = 600):
        self.seconds = seconds
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen(["timeout", str(self.seconds), sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)  # let it get scheduled
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the four conditions")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per graph per condition and round")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-torch-compile", dest="torch_compile", action="store_false")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    all_threads = cores
    start = time.perf_counter()
    bundle = load_bundle("wan2.1-tiny")
    d = bundle.recipe.defaults
    latent = bundle.latent_shape(d.frames, d.height, d.width)
    text_shape = tuple(bundle.encode(["digit 1 moving up"], "", 2).shape[1:])
    profile = synthetic_profile(bundle.transformer, "bench", latent, args.steps)
    identity = ModelIdentity("bench", profile.model_fingerprint, "WanTransformer3DModel",
                             text_encoder={"kind": "random", "embed_shape": list(text_shape)})
    from ertacache.engines.torch_compile import TorchCompileEngine, step_modules

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="ertacache-threads-") as tmp:
        folder = Path(tmp) / "export"
        ExportPackage(ExportConfig(out=folder, targets=("onnx", "aoti"), decode_graph=False, timing_repeats=0,
                                   check_compile=False), log=lambda s: None)(bundle.adapter, profile, identity,
                                                                             text_shape)
        print(f"[threads] exported in {time.perf_counter() - start:.0f} s", flush=True)
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(1, *latent, generator=gen)
        text = torch.randn(2, *text_shape, generator=gen)
        runtimes = {
            ("eager", None): Runtime(folder, "torch", engine=TorchCompileEngine(
                step_modules(bundle.adapter, profile), compile_backend=None), verify_files=False),
            ("aoti", None): Runtime(folder, "aoti", verify_files=False),
            ("onnxruntime", 1): Runtime(folder, "onnxruntime", verify_files=False, intra_op_threads=1),
            ("onnxruntime", all_threads): Runtime(folder, "onnxruntime", verify_files=False,
                                                  intra_op_threads=all_threads),
        }
        if args.torch_compile:
            runtimes[("torch.compile", None)] = Runtime(folder, "torch", engine=TorchCompileEngine(
                step_modules(bundle.adapter, profile)), verify_files=False)
        for rt in runtimes.values():
            rt.__enter__()
            rt.load_inputs(noise, text)
            rt.time_graph("full_step", 2)  # compile / warm
            rt.time_graph("cached_step", 2)
        print(f"[threads] runtimes open in {time.perf_counter() - start:.0f} s", flush=True)
        samples: dict = {}
        for r in range(args.rounds):
            for load in ("idle", "loaded"):
                ctx = Burner() if load == "loaded" else None
                if ctx:
                    ctx.__enter__()
                try:
                    for threads in (1, all_threads):
                        torch.set_num_threads(threads)
                        for (backend, ort_threads), rt in runtimes.items():
                            if ort_threads is not None and ort_threads != threads:
                                continue
                            for graph in ("full_step", "cached_step"):
                                t = rt.time_graph(graph, args.repeats)
                                samples.setdefault((backend, graph, load, threads), []).append(t)
                finally:
                    if ctx:
                        ctx.__exit__()
            print(f"[threads] round {r + 1}/{args.rounds} done at {time.perf_counter() - start:.0f} s", flush=True)
        for rt in runtimes.values():
            rt.__exit__(None, None, None)
    for (backend, graph, load, threads), ts in samples.items():
        results.setdefault(backend, {}).setdefault(graph, {}).setdefault(load, {})[threads] = \
            statistics.median(ts) * 1e3
    report = {"machine": {"cpu_count": cores, "loadavg": os.getloadavg()}, "versions": package_versions(),
              "rounds": args.rounds, "repeats": args.repeats, "ms": results, "bench_s": time.perf_counter() - start}
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"\n{'backend':14s} {'graph':12s} {'idle 1':>8s} {f'idle {all_threads}':>8s} {'ratio':>6s} "
          f"{'load 1':>8s} {f'load {all_threads}':>8s} {'ratio':>6s}   (ms; ratio = all threads / 1 thread)")
    for backend, graphs in results.items():
        for graph, by_load in graphs.items():
            i, lo = by_load["idle"], by_load["loaded"]
            print(f"{backend:14s} {graph:12s} {i[1]:8.2f} {i[all_threads]:8.2f} {i[all_threads] / i[1]:6.2f} "
                  f"{lo[1]:8.2f} {lo[all_threads]:8.2f} {lo[all_threads] / lo[1]:6.2f}")
    print(f"\nwritten to {args.json} ({report['bench_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
