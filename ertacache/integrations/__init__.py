"""ERTACache inside other libraries' pipelines (diffusers), and the shipped testbed as a WanPipeline."""

from ertacache.integrations.testbed import (
    TESTBED_NUM_FRAMES, encode_testbed_prompts, load_testbed_pipeline, pipeline_num_frames,
)
from ertacache.integrations.diffusers_pipeline import disable_ertacache, enable_ertacache

__all__ = ["enable_ertacache", "disable_ertacache", "load_testbed_pipeline", "encode_testbed_prompts",
           "TESTBED_NUM_FRAMES", "pipeline_num_frames"]
