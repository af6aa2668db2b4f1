"""Export the Wan2.1-T2V-1.3B architecture through the compiler pass at a small latent shape (ONNX).

Not part of CI: it needs ~12-20 GB of RAM and several minutes on 2 CPU cores.

    python tools/export_real_size.py --out /tmp/wan13b-export [--model-path DIR] [--text-tokens 512]

Without --model-path the transformer is built from the 1.3B config with random
weights (seeded): fine for export time, memory, file sizes, op list, exporter
correctness (ONNX Runtime vs eager) and the cached-step cost ratio c, meaningless
for caching quality. The profile is synthetic (mask F.F., nominal sigmas, zero
correction), since calibrating random weights says nothing.

Prints one JSON report: wall time per stage, peak RSS, file sizes, validation
error, ONNX Runtime full/cached step times and c.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ertacache.export import ExportConfig, ExportPackage, ModelIdentity  # noqa: E402
from ertacache.models.adapter import adapter_for  # noqa: E402
from ertacache.models.loading import fingerprint_module  # noqa: E402
from ertacache.profile.artifact import Profile  # noqa: E402
from ertacache.sampling.sigmas import nominal_sigmas  # noqa: E402

#: diffusers' config of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (transformer/config.json)
WAN21_1P3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def build_transformer(model_path: str | None, seed: int, layers: int | None = None):
    from diffusers import WanTransformer3DModel

    if model_path:
        return WanTransformer3DModel.from_pretrained(model_path, subfolder="transformer",
                                                     torch_dtype=torch.float32).eval(), "weights"
    torch.manual_seed(seed)
    config = dict(WAN21_1P3B, **({"num_layers": layers} if layers else {}))
    return WanTransformer3DModel(**config).eval(), "random"


def synthetic_profile(model, latent_shape, steps: int) -> Profile:
    c = latent_shape[0]
    mask = [i % 2 == 0 for i in range(steps)]  # F.F.: half the steps cached
    sig = nominal_sigmas(steps, 3.0)
    frames = (latent_shape[1] - 1) * 4 + 1
    return Profile("wan2.1", fingerprint_module(model), steps, 3.0, latent_shape[2] * 8, latent_shape[3] * 8, frames,
                   list(latent_shape), 5.0, 2, 0.0, mask, list(sig), list(sig), [1.0] * steps,
                   torch.zeros(steps, 2, c), torch.zeros(steps, 2, c), {"synthetic": True}, {})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="export folder (replaced if it exists)")
    p.add_argument("--model-path", default=None, help="diffusers-format Wan2.1-T2V-1.3B folder (else random)")
    p.add_argument("--latent", default="16,3,16,16", help="C,F',H',W' of one sample's latents")
    p.add_argument("--text-tokens", type=int, default=512, help="L of text_embeds (UMT5: 512)")
    p.add_argument("--steps", type=int, default=4, help="schedule length for validation")
    p.add_argument("--timing-repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=None, help="override num_layers (smoke tests of this tool)")
    p.add_argument("--compile-check", action="store_true", help="also run the torch._dynamo.explain check")
    args = p.parse_args(argv)

    latent = tuple(int(x) for x in args.latent.split(","))
    report: dict = {"latent": [1, *latent], "text_tokens": args.text_tokens, "threads": torch.get_num_threads()}
    start = time.perf_counter()
    model, source = build_transformer(args.model_path, seed=0, layers=args.layers)
    report["weights"] = source
    report["parameters"] = sum(t.numel() for t in model.parameters())
    report["build_s"] = round(time.perf_counter() - start, 1)
    profile = synthetic_profile(model, latent, args.steps)
    identity = ModelIdentity("wan2.1", profile.model_fingerprint, type(model).__name__, args.model_path,
                             text_encoder={"kind": "UMT5PromptEncoder", "hub_id": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                                           "embed_shape": [args.text_tokens, 4096]})
    config = ExportConfig(out=Path(args.out), targets="onnx", dtype="fp32", force=True, decode_graph=False,
                          check_compile=args.compile_check, timing_repeats=args.timing_repeats)
    start = time.perf_counter()
    result = ExportPackage(config, log=lambda s: print(s, flush=True))(
        adapter_for(model), profile, identity, (args.text_tokens, 4096))
    report["total_export_s"] = round(time.perf_counter() - start, 1)
    report["stage_s"] = {k: round(v, 1) for k, v in result.stage_s.items()}
    report["peak_rss_gb"] = round(peak_rss_gb(), 2)
    report["files_mb"] = {k: round(v / 1024**2, 1) for k, v in result.files.items()}
    report["validation"] = result.validation
    report["timing"] = result.timing
    report["ops"] = {n: g["ops"] for n, g in result.manifest["targets"]["onnx"]["graphs"].items()}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
