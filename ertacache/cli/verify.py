"""ertacache-verify: the runtime of one backend against the eager cached sampler; exit 1 when over tolerance."""

from __future__ import annotations

import argparse
import json

from ertacache.cli.common import new_parser, run_cli
from ertacache.cli.run import add_runtime_args, open_runtime, request
from ertacache.cli.validate import check_out_json, loading_model

#: as ertacache.runtime.verify.TOLERANCES (tests/cli checks they agree), spelled here so --help needs no torch
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


def parser() -> argparse.ArgumentParser:
    p = new_parser(prog="ertacache-verify", description="Compare an export folder's runtime with eager "
                                "PyTorch on the same inputs (relative L2 of the final latents) and report fidelity "
                                "against uncached sampling (PSNR). Exit 1 when over tolerance.")
    add_runtime_args(p)
    p.add_argument("--tolerance", type=float, default=None,
                   help=f"relative L2 bound (default per dtype: {TOLERANCES})")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    return p


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    check_out_json(args.json)
    import torch

    from ertacache.engines.errors import EngineMismatchError
    from ertacache.io import atomic_write_bytes
    from ertacache.models.loading import load_bundle
    from ertacache.profile.artifact import load_profile
    from ertacache.runtime.verify import verify_runtime

    with open_runtime(args) as rt:
        m = rt.manifest
        device = rt.device if rt.device.type == "cuda" else torch.device("cpu")
        with loading_model(m.model.id, args.model_path or m.model.path):
            bundle = load_bundle(m.model.id, args.model_path or m.model.path, device, m.dtype)
        if bundle.fingerprint != m.model.fingerprint:
            raise EngineMismatchError(f"the export folder was made from weights {m.model.fingerprint}, the model "
                                      f"loaded from {bundle.path} is {bundle.fingerprint}; pass --model-path to the "
                                      "folder's weights")
        profile = load_profile(m.profile_dir)
        noise, text = request(args, m)
        report = verify_runtime(rt, bundle.adapters, profile, noise, text, bundle.decoder, args.tolerance)
    print(f"{report.backend} ({report.dtype}) vs eager cached sampler, {report.full_steps}/{report.steps} full steps, "
          f"predictor {report.predictor} (K = {report.history}):")
    print(f"  final latents rel L2 {report.rel_l2:.3e} (tolerance {report.tolerance:g})  max |diff| {report.max_abs:.3e}")
    if report.psnr_vs_uncached is not None:
        print(f"  fidelity vs uncached: PSNR {report.psnr_vs_uncached:.2f} dB (eager cached "
              f"{report.eager_psnr_vs_uncached:.2f} dB)")
    print("  OK" if report.ok else "  FAILED: over tolerance")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(report.to_json(), indent=1, allow_nan=False).encode())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
