"""Wan2.1 I2V's step graphs: the text states (CFG rows), the CLIP image states and the condition latents (one row
per sample) as three named graph inputs, validated over the whole schedule against the eager sampler.

The export-time attention (``wan_stack_rope``, which now covers the image cross-attention) is installed
while exporting, as for text-to-video; the exported programs, ONNX Runtime and AOTInductor must equal
the eager sampler run with diffusers' own processor.
"""

import pytest
import torch

from ertacache.contract import CACHED_STEP, FULL_STEP, step_inputs
from ertacache.export.graphs import BakeStepGraphs
from ertacache.export.runners import EagerRunner, relative_l2, run_schedule
from ertacache.models.adapter import adapter_for
from ertacache.sampling import CachedSampler
from tests.export.fixtures import aoti_runner, onnx_runner, program_runner
from tests.models.test_wan_i2v import (C, GUIDANCE, IMAGE_DIM, IMAGE_TOKENS, LATENT, TEXT_DIM, TEXT_LEN, i2v_cond,
                                       i2v_profile, tiny_wan_i2v)

SHAPES = {"text_embeds": (TEXT_LEN, TEXT_DIM), "image_embeds": (IMAGE_TOKENS, IMAGE_DIM),
          "image_latents": (4 + C, *LATENT[1:])}
NAMES = tuple(SHAPES)


@pytest.fixture(scope="module")
def i2v_graphs():
    model = tiny_wan_i2v()
    profile = i2v_profile(model)
    adapter = adapter_for(model)
    graphs = BakeStepGraphs(batch_size=1, dtype=torch.float32, text_shape=SHAPES)(adapter, profile)
    return adapter, profile, graphs


def _schedule_error(runner, adapter, profile, seed: int) -> float:
    noise = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(seed))
    cond = i2v_cond(batch=1, frames=LATENT[1], h=LATENT[2], w=LATENT[3], seed=seed + 50)
    with torch.no_grad():
        ref = CachedSampler(adapter, profile.tables(), profile.mask)(noise, cond, GUIDANCE).latents
        got = run_schedule(runner, profile.mask, noise, tuple(cond[n] for n in NAMES), GUIDANCE, profile.history)
    return relative_l2(got, ref)


def test_each_input_is_a_named_graph_input_with_its_row_rule(i2v_graphs):
    _, _, graphs = i2v_graphs
    assert graphs.conditioning == NAMES
    assert graphs.specs[FULL_STEP].input_names == list(step_inputs(NAMES))
    shapes = {s.name: tuple(s.shape) for s in graphs.specs[FULL_STEP].inputs}
    assert shapes["text_embeds"] == (2, TEXT_LEN, TEXT_DIM)  # cond and uncond rows
    assert shapes["image_embeds"] == (1, IMAGE_TOKENS, IMAGE_DIM) and shapes["image_latents"] == (1, 4 + C, *LATENT[1:])
    cached = [s.name for s in graphs.specs[CACHED_STEP].inputs]
    assert "image_latents" in cached and "image_embeds" in cached  # every graph takes every input; the cached one reads only the latents


def test_exported_programs_equal_the_eager_sampler_over_the_schedule(i2v_graphs):
    adapter, profile, graphs = i2v_graphs
    assert _schedule_error(EagerRunner(graphs.modules), adapter, profile, seed=31) < 1e-6
    assert _schedule_error(program_runner(graphs.programs), adapter, profile, seed=32) < 1e-5


@pytest.mark.slow  # ONNX export of both graphs
def test_onnx_graphs_equal_the_eager_sampler_over_the_schedule(i2v_graphs, tmp_path):
    adapter, profile, graphs = i2v_graphs
    runner, paths = onnx_runner(graphs, tmp_path)
    assert _schedule_error(runner, adapter, profile, seed=33) < 1e-4
    import onnx

    ops = {node.op_type for node in onnx.load(str(paths[FULL_STEP]), load_external_data=False).graph.node}
    assert "ScatterND" not in ops  # the export-time rope rewrite covered the I2V attention too


@pytest.mark.slow
def test_aoti_packages_equal_the_eager_sampler_over_the_schedule(i2v_graphs, tmp_path):
    adapter, profile, graphs = i2v_graphs
    assert _schedule_error(aoti_runner(graphs, tmp_path), adapter, profile, seed=34) < 1e-4
