"""HunyuanVideo's step graphs: three conditioning inputs (Llama states, their padding mask, pooled CLIP),
an embedded guidance scale, validated over the whole schedule.

The tiny ``HunyuanVideoTransformer3DModel`` with a K = 3 predictor profile (the hand-written one of
tests/integrations/test_hunyuan_pipeline.py): the exported programs, their ONNX Runtime sessions and
their AOTInductor packages run the schedule and must equal the eager sampler. The padding mask is a
float graph input; feeds with a different number of real tokens than the export example must still
agree (the mask is data, not a constant baked at export).
"""

import pytest
import torch

from ertacache.contract import CACHED_STEP, FULL_STEP, cached_inputs, step_inputs
from ertacache.export.graphs import BakeStepGraphs
from ertacache.export.runners import EagerRunner, relative_l2, run_schedule
from ertacache.models.adapter import adapter_for
from ertacache.sampling import CachedSampler
from tests.export.fixtures import aoti_runner, onnx_runner, program_runner
from tests.integrations.test_hunyuan_pipeline import LATENT, hunyuan_profile
from tests.models.test_hunyuan_video import GUIDANCE, POOLED_DIM, SEQ, TEXT_DIM, hunyuan_cond, tiny_hunyuan

SHAPES = {"prompt_embeds": (SEQ, TEXT_DIM), "prompt_attention_mask": (SEQ,), "pooled_prompt_embeds": (POOLED_DIM,)}
NAMES = tuple(SHAPES)


@pytest.fixture(scope="module")
def hunyuan_graphs():
    model = tiny_hunyuan()
    profile = hunyuan_profile(model)
    adapter = adapter_for(model)
    graphs = BakeStepGraphs(batch_size=1, dtype=torch.float32, text_shape=SHAPES)(adapter, profile)
    return adapter, profile, graphs


def _feeds(seed: int, real: int):
    noise = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(seed))  # (B, C, F', H', W')
    return noise, hunyuan_cond(1, seed=seed + 100, real=(real,))


def _schedule_error(runner, adapter, profile, seed: int, real: int = 4) -> float:
    """Relative L2 of ``runner`` over the whole schedule against the eager sampler, on fresh feeds."""
    noise, cond = _feeds(seed, real)
    with torch.no_grad():
        ref = CachedSampler(adapter, profile.tables(), profile.mask)(noise, cond, GUIDANCE).latents
        got = run_schedule(runner, profile.mask, noise, tuple(cond[n] for n in NAMES), GUIDANCE, profile.history)
    return relative_l2(got, ref)


def test_each_conditioning_tensor_is_a_named_graph_input(hunyuan_graphs):
    _, profile, graphs = hunyuan_graphs
    assert graphs.conditioning == NAMES
    assert graphs.specs[FULL_STEP].input_names == list(step_inputs(NAMES))
    assert graphs.specs[CACHED_STEP].input_names == list(cached_inputs(profile.history, NAMES))
    shapes = {s.name: tuple(s.shape) for s in graphs.specs[FULL_STEP].inputs}
    assert shapes["prompt_attention_mask"] == (1, SEQ) and shapes["pooled_prompt_embeds"] == (1, POOLED_DIM)


@pytest.mark.parametrize("real", [SEQ, 2])
def test_exported_programs_equal_the_eager_sampler_over_the_schedule(hunyuan_graphs, real):
    adapter, profile, graphs = hunyuan_graphs
    noise, cond = _feeds(21, real)
    flat = tuple(cond[n] for n in NAMES)
    with torch.no_grad():
        ref = CachedSampler(adapter, profile.tables(), profile.mask)(noise, cond, GUIDANCE).latents
        eager = run_schedule(EagerRunner(graphs.modules), profile.mask, noise, flat, GUIDANCE, profile.history)
        exported = run_schedule(program_runner(graphs.programs), profile.mask, noise, flat, GUIDANCE, profile.history)
    torch.testing.assert_close(eager, ref, rtol=0, atol=1e-6)
    assert relative_l2(exported, ref) < 1e-5


@pytest.mark.slow  # ONNX export of both graphs
def test_onnx_graphs_equal_the_eager_sampler_over_the_schedule(hunyuan_graphs, tmp_path):
    adapter, profile, graphs = hunyuan_graphs
    runner, _ = onnx_runner(graphs, tmp_path)
    assert _schedule_error(runner, adapter, profile, seed=22, real=3) < 1e-4
    assert _schedule_error(runner, adapter, profile, seed=23, real=SEQ) < 1e-4


@pytest.mark.slow
def test_aoti_packages_equal_the_eager_sampler_over_the_schedule(hunyuan_graphs, tmp_path):
    """AOTInductor packages of the HunyuanVideo graphs (a minute or two of compiling on 2 cores)."""
    adapter, profile, graphs = hunyuan_graphs
    assert _schedule_error(aoti_runner(graphs, tmp_path), adapter, profile, seed=24, real=3) < 1e-4
