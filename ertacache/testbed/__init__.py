"""The testbeds: small WanTransformer3DModels trained here, shipped in the package.

``wan2.1-tiny`` (moving digits; this module's top-level names) gives the caching
toolchain a real, trained diffusion transformer that runs on a laptop CPU, with a
judge that says whether samples still show the prompted content. ``wan2.1-small``
(:mod:`~ertacache.testbed.small`, :mod:`~ertacache.testbed.scene_data`,
:mod:`~ertacache.testbed.scene_judge`) is the harder one, on coloured shapes over
panning photographs. :mod:`~ertacache.testbed.judges` says which judge reads which prompts.
"""

from ertacache.testbed.data import (
    DIRECTIONS, DIGITS, HELD_OUT_SEEDS, CALIBRATION_SEEDS, DigitVideoSampler, VideoSpec, all_prompts,
    calibration_prompts, digit_images, held_out_prompts, make_prompt, parse_prompt,
)
from ertacache.testbed.judge import (
    frame_digit_accuracy, frame_digit_accuracy_per_sample, frame_digit_predictions, motion_accuracy,
    motion_correct_per_sample, predict_directions,
)
from ertacache.testbed.judges import JUDGES, PromptJudge, judge_for
from ertacache.testbed.model import (
    ASSET_DIR, Testbed, TransformerSpec, check_testbed_folder, flow_sigmas, load_testbed, sample_frames, sample_latents,
)
from ertacache.testbed.pixel_vae import PixelVAE
from ertacache.testbed.residuals import ResidualProbe, plot_residual_change, residual_change_curve
from ertacache.testbed.text_encoder import TinyTextEncoder

__all__ = [
    "ASSET_DIR", "CALIBRATION_SEEDS", "DIGITS", "DIRECTIONS", "DigitVideoSampler", "HELD_OUT_SEEDS", "JUDGES",
    "PixelVAE", "PromptJudge", "ResidualProbe", "Testbed", "TinyTextEncoder", "TransformerSpec", "VideoSpec",
    "all_prompts",
    "calibration_prompts", "check_testbed_folder", "digit_images", "flow_sigmas", "frame_digit_accuracy",
    "frame_digit_accuracy_per_sample", "frame_digit_predictions", "held_out_prompts", "judge_for", "load_testbed",
    "make_prompt", "motion_accuracy", "motion_correct_per_sample", "parse_prompt", "plot_residual_change",
    "predict_directions", "residual_change_curve", "sample_frames", "sample_latents",
]
