"""What the per-family command-line tests share: profile and export a tiny diffusers folder, then sample the
export folder from a prompt and compare it with the eager cached sampler on the same embeddings."""

from ertacache.cli import export as export_cli
from ertacache.cli import profile as profile_cli


def profile_and_export(model_id: str, folder, root, size: list[str], *profile_args: str) -> None:
    """``ertacache-profile`` (fp32, at ``size``) into ``root/profile.json``, then an ONNX ``ertacache-export`` of it
    into ``root/out``."""
    model = ["--model", model_id, "--model-path", str(folder), "--dtype", "fp32", "--quiet"]
    assert profile_cli.main([*model, *size, *profile_args, "--out", str(root / "profile.json")]) == 0
    assert export_cli.main([*model, "--profile", str(root / "profile.json"), "--engines", str(root / "out"),
                            "--targets", "onnx", "--timing-repeats", "0"]) == 0


def export_error_vs_eager(model_id: str, folder, root, prompt: str, seed: int = 5) -> float:
    """Relative L2 between the export folder's ONNX Runtime sample of ``prompt`` and the eager cached sampler's
    (same profile, embeddings and noise)."""
    import torch

    from ertacache.export.runners import relative_l2
    from ertacache.models.loading import load_bundle
    from ertacache.profile.artifact import load_profile
    from ertacache.runtime import Runtime
    from ertacache.runtime.inputs import noise_for
    from ertacache.sampling import CachedSampler

    bundle = load_bundle(model_id, folder, dtype="fp32")
    profile = load_profile(root / "profile.json")
    cond = bundle.encode([prompt], "", profile.n_branches)
    with Runtime(root / "out", "onnxruntime") as rt:
        noise = noise_for(rt.manifest, seed)
        got = rt.sample(noise, cond).clone()
    with torch.no_grad():
        ref = CachedSampler(bundle.adapter, profile.tables(), profile.mask)(noise, cond, profile.guidance_scale).latents
    return relative_l2(got, ref)
