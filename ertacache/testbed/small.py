"""The ``wan2.1-small`` testbed: what it is made of, built from the tiny testbed's parts.

Same classes as ``wan2.1-tiny`` (diffusers ``WanTransformer3DModel``, ``TinyTextEncoder``,
``PixelVAE``), larger and on harder data (:mod:`ertacache.testbed.scene_data`). Loading and
sampling reuse :func:`ertacache.testbed.model.load_testbed` and ``sample_frames`` with
``SMALL_ASSET_DIR``; only the recipe differs, so it lives here as data.

Size arithmetic (measured single-threaded on the project's 2-core AVX2 VM, CPU time, see
``docs/testbed.md``): one CFG step is one forward of batch 2 at 512 tokens; per token and
block that is about 4D^2 (self-attention projections) + 2D^2 (cross-attention q, o) +
2*D*ffn (MLP) + 2*N*D (attention scores and values) multiply-adds, i.e. about
0.98 M MACs at D = 256, ffn = 640, N = 512; x 512 tokens x 8 blocks x 2 branches x 2
FLOP/MAC = 16 GFLOP per step, 0.8 TFLOP per 50-step sample. At the ~50 GFLOP/s one core
sustains here that is ~16 s on one thread and ~9 s on two, inside the issue's ~10 s.
"""

from __future__ import annotations

from pathlib import Path

from ertacache.testbed.model import TransformerSpec
from ertacache.testbed.scene_data import VOCABULARY, SceneSpec

SMALL_ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "wan2.1-small"
SMALL_MODEL_ID = "wan2.1-small"

# RGB frames folded 4x4 into channels: 3 * 4 * 4 = 48 latent channels at 1/4 resolution.
SPATIAL_FACTOR = 4
IMAGE_CHANNELS = 3
LATENT_CHANNELS = IMAGE_CHANNELS * SPATIAL_FACTOR**2
TEXT_LENGTH = 8  # the template has 6 words; 2 spare
TEXT_DIM = 64

# 8 blocks x width 256 (4 heads x 64), MLP 640: 7.5 M parameters, ~29 MB in fp32 (the issue's
# budget is ~30 MB). A 768-wide MLP would cross 30 MB; 1024 also costs ~25 % more time per step.
SMALL_TRANSFORMER = TransformerSpec(num_layers=8, num_attention_heads=4, attention_head_dim=64, ffn_dim=640,
                                    freq_dim=128, in_channels=LATENT_CHANNELS, text_dim=TEXT_DIM)
SMALL_SCENE = SceneSpec()


def small_tokens(scene: SceneSpec = SMALL_SCENE) -> int:
    """Transformer tokens per sample: frames x (H / (4 * 2)) x (W / (4 * 2)) for the VAE factor 4 and patch 2."""
    step = SPATIAL_FACTOR * 2
    return scene.frames * (scene.height // step) * (scene.width // step)


def build_small_models(seed: int = 0, spec: TransformerSpec = SMALL_TRANSFORMER):
    """Fresh, seeded (transformer, text encoder, pixel VAE) of the small testbed."""
    import torch
    from diffusers import WanTransformer3DModel

    from ertacache.testbed.pixel_vae import PixelVAE
    from ertacache.testbed.text_encoder import PAD, TinyTextEncoder

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**spec.to_diffusers())
    text_encoder = TinyTextEncoder(vocab=(PAD, *VOCABULARY), max_length=TEXT_LENGTH, embed_dim=spec.text_dim,
                                   seed=seed)
    vae = PixelVAE(latent_channels=spec.in_channels, spatial_factor=SPATIAL_FACTOR, temporal_factor=1,
                   image_channels=IMAGE_CHANNELS)
    return transformer, text_encoder, vae
