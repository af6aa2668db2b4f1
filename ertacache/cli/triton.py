"""ertacache-triton: write a Triton model repository over an export folder, or serve one.

    ertacache-triton --engines engines/tiny --repo engines/triton [--name NAME] [--backend onnxruntime]
                     [--instances N] [--decoupled] [--max-batch-size B] [--latents] [--no-text-encoder]
    ertacache-triton serve --repo engines/triton [--http-port 8000 --grpc-port 8001 --metrics-port 8002]

``serve`` starts the Triton server found in this environment (the nvidia-pytriton wheel's build,
or tritonserver on PATH) on loopback by default and runs until Ctrl-C; in the official
container, run ``tritonserver --model-repository DIR`` instead (docs/triton.md).
"""

from __future__ import annotations

import argparse
import signal
import sys

from ertacache.cli.common import BACKEND_NAMES, add_engines_arg, new_parser, run_cli
from ertacache.cli.validate import add_digest_arg, check_args, check_digest_arg

USAGE = """
  ertacache-triton --engines DIR --repo DIR [options]   write a model repository entry for an export folder
  ertacache-triton serve --repo DIR [options]           start Triton Inference Server on a repository
  (ertacache-triton serve --help lists the server's options)"""


def parser() -> argparse.ArgumentParser:
    p = new_parser(prog="ertacache-triton", threads=False, usage=USAGE, description="Write a Triton Inference "
                   "Server model repository entry (config.pbtxt + Python-backend model.py + the export folder) that "
                   "serves an export folder. `ertacache-triton serve --repo DIR` starts a server on it.")
    add_engines_arg(p)
    p.add_argument("--repo", required=True, help="model repository folder (created; other models in it are kept)")
    p.add_argument("--name", default=None, help="model name (default: from the model id, e.g. wan2_1-tiny)")
    p.add_argument("--backend", default="onnxruntime", choices=list(BACKEND_NAMES),
                   help="which engines of the folder the model runs (default: onnxruntime)")
    p.add_argument("--instances", type=int, default=1,
                   help="model instances (instance_group count); each has its own engines and buffers (default 1)")
    p.add_argument("--decoupled", action="store_true",
                   help="stream one progress response per denoising step, then the result (gRPC streaming)")
    p.add_argument("--max-batch-size", type=int, default=0,
                   help="0: one request = one generation (default); B > 0: Triton batches up to B requests "
                        "(needs a folder exported with batch size 1)")
    p.add_argument("--latents", action="store_true", help="also return the final latents (FP32)")
    enc = p.add_mutually_exclusive_group()
    enc.add_argument("--no-text-encoder", action="store_true",
                     help="do not bundle the text encoder: requests send text_embeds instead of a prompt")
    enc.add_argument("--model-path", default=None,
                     help="model folder holding text_encoder/ (default: the export manifest's model path)")
    p.add_argument("--providers", default=None, help="ONNX Runtime providers, comma-separated (default: CPU)")
    p.add_argument("--threads", "--intra-op-threads", dest="intra_op_threads", type=int, default=0,
                   help="ONNX Runtime threads per model instance (default 0: cores / instances, chosen at load; "
                        "--intra-op-threads is the old spelling)")
    p.add_argument("--no-verify-files", action="store_true",
                   help="skip the sha256 check of every file when an instance loads (faster loads of big folders)")
    p.add_argument("--force", action="store_true", help="replace a model of the same name in the repository")
    add_digest_arg(p)
    return p


def serve_parser() -> argparse.ArgumentParser:
    p = new_parser(prog="ertacache-triton serve", threads=False, description="Start Triton Inference Server on a "
                   "model repository and run until Ctrl-C.")
    p.add_argument("--repo", required=True, help="model repository (ertacache-triton --repo)")
    p.add_argument("--address", default="127.0.0.1", help="listen address (default: loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--python", default=None,
                   help="interpreter of the environment model.py runs in (default: this one; it needs ertacache)")
    p.add_argument("--tritonserver", default=None, help="tritonserver binary (default: nvidia-pytriton's)")
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--log-dir", default=None,
                   help="keep the server's log as DIR/server.log (default: a temporary folder removed on stop)")
    return p


def _write(argv: list[str] | None) -> int:
    args = check_args(parser().parse_args(argv))
    check_digest_arg(args.expect_digest)
    from ertacache.serving.repository import RepositoryConfig, write_repository

    cfg = RepositoryConfig(
        engines=args.engines, repo=args.repo, name=args.name, backend=args.backend, instances=args.instances,
        decoupled=args.decoupled, max_batch_size=args.max_batch_size, latents=args.latents,
        text_encoder=False if args.no_text_encoder else None, model_path=args.model_path,
        providers=tuple(p for p in (args.providers or "").split(",") if p), intra_op_threads=args.intra_op_threads,
        verify_files=not args.no_verify_files, force=args.force, expect_digest=args.expect_digest)
    report = write_repository(cfg, log=print)
    total = sum(report.files.values())
    print(f"model {report.name!r} written to {report.model_dir} ({len(report.files)} files, {total / 1e6:.1f} MB)")
    print("  inputs:  " + ", ".join(f"{t.name}{'?' if t.optional else ''} {t.data_type} {list(t.dims)}"
                                    for t in report.io.inputs))
    print("  outputs: " + ", ".join(f"{t.name} {t.data_type} {list(t.dims)}" for t in report.io.outputs))
    print(f"serve it: ertacache-triton serve --repo {cfg.repo}   (or tritonserver --model-repository {cfg.repo})")
    return 0


def _serve(argv: list[str]) -> int:
    args = check_args(serve_parser().parse_args(argv))
    from ertacache.serving.server import ServerConfig, TritonServer

    cfg = ServerConfig(repo=args.repo, address=args.address, http_port=args.http_port, grpc_port=args.grpc_port,
                       metrics_port=args.metrics_port, python=args.python, tritonserver=args.tritonserver,
                       log_verbose=args.log_verbose)
    server = TritonServer(cfg, log_dir=args.log_dir)
    print(f"starting {server.dist.binary} on {cfg.repo} (log: {server.log_path})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SIGTERM -> the finally below stops the server
    try:
        server.start()
        print(f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}", flush=True)
        print("Ctrl-C stops it", flush=True)
        code = server.process.wait()
        print(f"tritonserver exited with code {code}; log tail:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.close()


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        return _serve(argv[1:])
    return _write(argv)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
