"""The ``wan2.1-tiny`` testbed: a tiny WanTransformer3DModel trained on moving digits.

It gives the caching toolchain a real, trained diffusion transformer that runs on a
laptop CPU, with a judge that says whether samples still show the prompted content.
"""

from ertacache.testbed.data import (
    DIRECTIONS, DIGITS, HELD_OUT_SEEDS, CALIBRATION_SEEDS, DigitVideoSampler, VideoSpec, all_prompts,
    calibration_prompts, digit_images, held_out_prompts, make_prompt, parse_prompt,
)
from ertacache.testbed.judge import (
    frame_digit_accuracy, frame_digit_accuracy_per_sample, frame_digit_predictions, motion_accuracy,
    motion_correct_per_sample, predict_directions,
)
from ertacache.testbed.model import ASSET_DIR, Testbed, TransformerSpec, flow_sigmas, load_testbed, sample_frames, sample_latents
from ertacache.testbed.pixel_vae import PixelVAE
from ertacache.testbed.residuals import ResidualProbe, plot_residual_change, residual_change_curve
from ertacache.testbed.text_encoder import TinyTextEncoder

__all__ = [
    "ASSET_DIR", "CALIBRATION_SEEDS", "DIGITS", "DIRECTIONS", "DigitVideoSampler", "HELD_OUT_SEEDS", "PixelVAE",
    "ResidualProbe", "Testbed", "TinyTextEncoder", "TransformerSpec", "VideoSpec", "all_prompts",
    "calibration_prompts", "digit_images", "flow_sigmas", "frame_digit_accuracy",
    "frame_digit_accuracy_per_sample", "frame_digit_predictions", "held_out_prompts", "load_testbed",
    "make_prompt", "motion_accuracy", "motion_correct_per_sample", "parse_prompt", "plot_residual_change",
    "predict_directions", "residual_change_curve", "sample_frames", "sample_latents",
]
