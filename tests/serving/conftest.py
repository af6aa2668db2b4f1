"""A Triton repository over the suite's tiny exports, and the direct runtime the served outputs must equal.

Models (all over tests/export/fixtures.py exports, ONNX Runtime on the CPU):
    wan          the tiny diffusers-format Wan2.1 folder: prompt (UMT5 bundled) or text_embeds, + latents
    tiny         a tiny random Wan2.1 built in code (no text encoder): text_embeds, + latents
    tiny_stream  tiny, decoupled: one progress response per step, then the result
    tiny_rows    tiny with max_batch_size 2: Triton batches requests into rows
    flux         a tiny random FLUX (embedded guidance, K = 3): prompt_embeds and pooled_prompt_embeds, + latents
    i2v          the tiny diffusers-format Wan2.1 I2V folder: prompt + image (UMT5, CLIP vision, VAE bundled)
    hunyuan      the tiny diffusers-format HunyuanVideo folder: prompt (Llama + CLIP bundled) or its three tensors
    a14b         a tiny two-expert Wan2.2 A14B-style folder: prompt (UMT5 bundled) or text_embeds, guidance_scale
                 and guidance_scale_2, + latents
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ertacache.models.loading import FAMILIES
from ertacache.runtime import Runtime
from ertacache.runtime.inputs import encode_prompt, noise_for
from ertacache.serving import RepositoryConfig, write_repository

MODELS = ("wan", "tiny", "tiny_stream", "tiny_rows", "flux", "i2v", "hunyuan", "a14b")


@pytest.fixture(scope="session")
def served_repo(tmp_path_factory, onnx_export, wan_folder_export, flux_onnx_export, i2v_folder_export,
                hunyuan_folder_export, a14b_folder_export):
    """(repository folder, {name: RepositoryReport})."""
    repo = tmp_path_factory.mktemp("triton") / "repo"
    options = {"wan": dict(engines=wan_folder_export, latents=True),
               "tiny": dict(engines=onnx_export.out, latents=True),
               "tiny_stream": dict(engines=onnx_export.out, decoupled=True),
               "tiny_rows": dict(engines=onnx_export.out, max_batch_size=2),
               "flux": dict(engines=flux_onnx_export.out, latents=True),
               "i2v": dict(engines=i2v_folder_export.out, model_path=i2v_folder_export.folder),
               "hunyuan": dict(engines=hunyuan_folder_export.out, model_path=hunyuan_folder_export.folder),
               "a14b": dict(engines=a14b_folder_export.out, model_path=a14b_folder_export.folder, latents=True)}
    return repo, {name: write_repository(RepositoryConfig(repo=repo, name=name, **o)) for name, o in options.items()}


class Direct:
    """The direct runtime over the same export folders: what every served output must equal, byte for byte."""

    def __init__(self, folders: dict, wan_model_folder):
        self.runtimes = {name: Runtime(folder, "onnxruntime").__enter__() for name, folder in folders.items()}
        self.encoder = FAMILIES["wan"].prompt_encoder(wan_model_folder, torch.float32)

    def text(self, name: str, prompt: str | None = None, text_seed: int = 0):
        """The request's text tensor, or (a folder with several conditioning inputs) a mapping of them."""
        m = self.runtimes[name].manifest
        if prompt is not None:
            return encode_prompt(self.encoder, prompt, m)
        gen = torch.Generator().manual_seed(text_seed)
        if m.conditioning != ("text_embeds",):
            return {n: torch.randn(m.spec("full_step", n).shape, generator=gen) for n in m.conditioning}
        return torch.randn(m["shapes"]["text_embeds"], generator=gen)

    def __call__(self, name: str, seed: int, prompt: str | None = None, text_seed: int = 0,
                 guidance: float | None = None, guidance_2: float | None = None) -> dict[str, np.ndarray]:
        rt = self.runtimes[name]
        latents = rt.sample(noise_for(rt.manifest, seed), self.text(name, prompt, text_seed), guidance,
                            guidance_scale_2=guidance_2)
        out = {"latents": latents.numpy().copy()}
        if rt.has_decode:
            out["frames"] = rt.decode().numpy().copy()
        return out

    def close(self):
        for rt in self.runtimes.values():
            rt.__exit__(None, None, None)


@pytest.fixture(scope="session")
def direct(onnx_export, wan_folder_export, tiny_wan_folder, flux_onnx_export, a14b_folder_export):
    d = Direct({"wan": wan_folder_export, "tiny": onnx_export.out, "flux": flux_onnx_export.out,
                "a14b": a14b_folder_export.out}, tiny_wan_folder)
    yield d
    d.close()
