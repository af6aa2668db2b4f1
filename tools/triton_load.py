"""Load a Triton server on this machine with N concurrent tritonclient clients; check every output.

    # a running server (loopback only):
    python tools/triton_load.py --url 127.0.0.1:8001 --protocol grpc --model wan2_1-tiny \
        --engines engines/tiny --concurrency 64 --requests 64 --prompt "digit 3 moving left"
    # or start one on a repository (free loopback ports) and stop it afterwards:
    python tools/triton_load.py --repo engines/triton --model wan2_1-tiny --concurrency 64 --requests 64

Runs in .venv-triton (tritonclient and nvidia-pytriton need numpy<2: bash tools/triton_env.sh).
Every request i uses seed ``--seed + i % --distinct-seeds``; each output is compared byte for
byte with the direct runtime (ertacache.runtime.Runtime over the same export folder, same seed,
same text) computed in this process. Reports throughput, p50/p99 latency, errors, mismatches,
and the per-request overhead of the server path: ``--overhead K`` sequential requests to the
server vs K direct runs (text encoding + sampling + decode both ways; the direct runtime gets the
ONNX Runtime threads of one server instance), as a ratio of medians.
The run is bounded by ``--requests`` and ``--seconds``, whichever comes first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ertacache.cli.common import run_cli
from ertacache.errors import UserError
from ertacache.runtime import Runtime
from ertacache.runtime.inputs import encode_prompt, noise_for
from ertacache.serving.client import check_loopback, connect, make_inputs
from ertacache.serving.spec import FRAMES, LATENTS, PROMPT


@dataclass
class LoadReport:
    model: str
    protocol: str
    concurrency: int
    requests: int  # sent
    errors: int
    mismatches: int  # outputs that differ from the direct runtime (any byte)
    wall_s: float
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    direct_ms: float | None = None  # median of --overhead direct runs
    server_sequential_ms: float | None = None  # median of --overhead sequential server requests
    overhead_ratio: float | None = None  # server_sequential_ms / direct_ms
    error_messages: dict[str, int] = field(default_factory=dict)
    instances: int | None = None
    server: str | None = None

    def table(self) -> str:
        rows = [("requests / concurrency", f"{self.requests} / {self.concurrency}"),
                ("errors", str(self.errors)), ("byte mismatches vs direct runtime", str(self.mismatches)),
                ("throughput", f"{self.throughput_rps:.2f} req/s over {self.wall_s:.2f} s"),
                ("latency p50 / p99", f"{self.p50_ms:.1f} / {self.p99_ms:.1f} ms")]
        if self.overhead_ratio is not None:
            rows.append(("sequential: server / direct", f"{self.server_sequential_ms:.1f} / {self.direct_ms:.1f} ms "
                                                        f"= {self.overhead_ratio:.3f}"))
        width = max(len(k) for k, _ in rows)
        head = f"{self.model} over {self.protocol}" + (f", {self.instances} instance(s)" if self.instances else "")
        return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows]
                         + [f"  error: {n} x {m}" for m, n in self.error_messages.items()])


class Direct:
    """The reference: the direct runtime over the export folder, with the same text as the requests."""

    def __init__(self, engines: Path, prompt: str | None, text_seed: int, encoder_path: Path | None,
                 threads: int = 0):
        self.runtime = Runtime(engines, "onnxruntime", intra_op_threads=threads).__enter__()
        m = self.runtime.manifest
        self.prompt = prompt
        self.encoder = self._encoder(m, encoder_path) if prompt is not None else None
        gen = torch.Generator().manual_seed(text_seed)
        self.text_embeds = None if prompt is not None else torch.randn(m["shapes"]["text_embeds"], generator=gen)

    @staticmethod
    def _encoder(manifest, encoder_path: Path | None):
        from ertacache.models.loading import FAMILIES, TORCH_DTYPES, resolve_model_path
        from ertacache.models.recipes import load_recipe

        recipe = load_recipe(manifest["model"]["id"])
        path = encoder_path or resolve_model_path(recipe, manifest["model"].get("path"))
        return FAMILIES[recipe.family].prompt_encoder(Path(path), TORCH_DTYPES[manifest["dtype"]])

    def text(self) -> torch.Tensor:
        if self.prompt is None:
            return self.text_embeds
        return encode_prompt(self.encoder, self.prompt, self.runtime.manifest)

    def __call__(self, seed: int) -> dict[str, np.ndarray]:
        rt = self.runtime
        latents = rt.sample(noise_for(rt.manifest, seed), self.text()).cpu().numpy().copy()
        out = {LATENTS: latents}
        if rt.has_decode:
            out[FRAMES] = rt.decode().cpu().numpy().copy()
        return out


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_load(args, url: str, direct: Direct, model_config: dict) -> LoadReport:
    seeds = [args.seed + k for k in range(args.distinct_seeds)]
    refs = {s: direct(s) for s in seeds}
    outputs = [o["name"] for o in model_config.get("output", []) if o["name"] in (FRAMES, LATENTS)]
    batched = int(model_config.get("max_batch_size", 0)) > 0
    text = {"prompt": args.prompt} if direct.prompt is not None else {"text_embeds": direct.text_embeds.numpy()}

    def request(client, i: int):
        seed = seeds[i % len(seeds)]
        inputs = make_inputs(args.protocol, seed=seed, batched=batched, **text)
        start = time.perf_counter()
        result = client.infer(args.model, inputs)
        elapsed = time.perf_counter() - start
        same = all(np.array_equal(_row(result.as_numpy(n), batched), refs[seed][n])
                   and _row(result.as_numpy(n), batched).tobytes() == refs[seed][n].tobytes() for n in outputs)
        return elapsed, same

    lock, counter = threading.Lock(), iter(range(args.requests))
    latencies, errors, mismatches = [], {}, [0]
    deadline = time.monotonic() + args.seconds

    def worker():
        client = connect(args.protocol, url)
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                try:
                    elapsed, same = request(client, i)
                except Exception as e:  # an error response: count it by message
                    with lock:
                        errors[str(e)[:200]] = errors.get(str(e)[:200], 0) + 1
                    continue
                with lock:
                    latencies.append(elapsed)
                    mismatches[0] += not same
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    sent = len(latencies) + sum(errors.values())
    report = LoadReport(args.model, args.protocol, args.concurrency, sent, sum(errors.values()), mismatches[0], wall,
                        len(latencies) / wall if wall else 0.0, _percentile(latencies, 50) * 1e3,
                        _percentile(latencies, 99) * 1e3, error_messages=errors)
    if args.overhead:
        _overhead(args, url, direct, report, request)
    return report


def _row(arr: np.ndarray, batched: bool) -> np.ndarray:
    return arr[0][None] if batched else arr  # a batched model returns (rows, ...) of a batch-1 folder


def _overhead(args, url, direct: Direct, report: LoadReport, request) -> None:
    """Sequential server requests vs direct runs, interleaved so drift on a shared machine hits both alike."""
    client = connect(args.protocol, url)
    server_s, direct_s = [], []
    try:
        request(client, 0)  # warm
        for i in range(args.overhead):
            server_s.append(request(client, i)[0])
            start = time.perf_counter()
            direct(args.seed + i % args.distinct_seeds)
            direct_s.append(time.perf_counter() - start)
    finally:
        client.close()
    report.server_sequential_ms = statistics.median(server_s) * 1e3
    report.direct_ms = statistics.median(direct_s) * 1e3
    report.overhead_ratio = report.server_sequential_ms / report.direct_ms


def _instance_threads(config: dict) -> int:
    """The ONNX Runtime threads one server instance uses, so the direct runs compare like with like."""
    from ertacache.serving.instance import ModelParameters, available_cores, cpu_instances

    threads = ModelParameters.from_config(config.get("parameters", {})).intra_op_threads
    return threads or max(1, available_cores() // cpu_instances(config))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server on this machine, host:port (gRPC 8001 / HTTP 8000)")
    where.add_argument("--repo", help="start a server on this repository (free loopback ports), stop it after")
    p.add_argument("--model", required=True, help="model name in the repository")
    p.add_argument("--protocol", default="grpc", choices=["grpc", "http"])
    p.add_argument("--engines", default=None, help="export folder for the direct runtime (default with --repo: "
                                                   "the model's copy, REPO/MODEL/1/engines)")
    p.add_argument("--prompt", default=None, help="prompt (models with a text encoder); default: random text_embeds")
    p.add_argument("--text-seed", type=int, default=0, help="seed of the random text_embeds (no --prompt)")
    p.add_argument("--model-path", default=None, help="model folder with text_encoder/ for the direct runtime "
                                                      "(default with --repo: the model's bundled copy)")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent clients (threads, one client each)")
    p.add_argument("--requests", type=int, default=64, help="requests in all")
    p.add_argument("--seconds", type=float, default=120.0, help="stop sending after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distinct-seeds", type=int, default=8, help="request i uses seed + i %% this")
    p.add_argument("--overhead", type=int, default=0, help="K sequential requests vs K direct runs (0: skip)")
    p.add_argument("--json", default=None, help="write the report here")
    return p


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    if args.concurrency < 1 or args.requests < 1 or args.distinct_seeds < 1 or args.seconds <= 0:
        raise UserError("--concurrency, --requests and --distinct-seeds must be >= 1 and --seconds > 0")
    server = None
    if args.repo:
        from ertacache.serving.server import ServerConfig, TritonServer

        server = TritonServer(ServerConfig(repo=Path(args.repo))).start()
    try:
        url = check_loopback(args.url) if args.url else (server.grpc_url if args.protocol == "grpc" else server.http_url)
        client = connect(args.protocol, url)
        config = client.get_model_config(args.model, as_json=True) if args.protocol == "grpc" else \
            client.get_model_config(args.model)
        client.close()
        config = config.get("config", config)
        if (config.get("model_transaction_policy") or {}).get("decoupled"):
            raise UserError(f"model {args.model!r} is decoupled (streams progress); load a non-decoupled model")
        model_dir = Path(args.repo) / args.model / "1" if args.repo else None
        engines = Path(args.engines) if args.engines else (model_dir / "engines" if model_dir else None)
        if engines is None:
            raise UserError("--engines is required with --url (the export folder the model serves)")
        has_prompt = any(i["name"] == PROMPT for i in config.get("input", []))
        if args.prompt is not None and not has_prompt:
            raise UserError(f"model {args.model!r} has no prompt input (no text encoder); drop --prompt")
        encoder_path = Path(args.model_path) if args.model_path else (model_dir / "text_encoder" if model_dir else None)
        direct = Direct(engines, args.prompt, args.text_seed, encoder_path, _instance_threads(config))
        report = run_load(args, url, direct, config)
        report.instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or None
        report.server = "tritonserver (nvidia-pytriton)" if server else url
    finally:
        if server is not None:
            server.close()
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1))
    return 0 if report.errors == 0 and report.mismatches == 0 else 1


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
