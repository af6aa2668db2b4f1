"""CogVideoX's step graphs: the flow-matching view (the timestep map and the scale in and out of the model's
coordinates, baked from the checkpoint's noise schedule) exports and runs the whole schedule.

The tiny 5B-style (rotary) ``CogVideoXTransformer3DModel`` with the hand-written profile of
tests/integrations/test_cogvideox_pipeline.py (cached steps, an adjusted sigma table, so fractional
model timesteps, and a K = 3 predictor): the exported programs, their ONNX Runtime sessions and their
AOTInductor packages must equal the eager sampler.
"""

import pytest
import torch

from ertacache.export.graphs import BakeStepGraphs
from ertacache.export.runners import EagerRunner, relative_l2, run_schedule
from ertacache.models.adapter import adapter_for
from ertacache.sampling import CachedSampler
from tests.export.fixtures import aoti_runner, onnx_runner, program_runner
from tests.integrations.test_cogvideox_pipeline import cogvideox_profile
from tests.models.test_cogvideox_adapter import LATENT, TEXT_DIM, TEXT_LEN, tiny_cogvideox
from tests.models.test_cogvideox_family import GUIDANCE


@pytest.fixture(scope="module")
def cogvideox_graphs():
    model = tiny_cogvideox(True)
    profile = cogvideox_profile(model)
    adapter = adapter_for(model)
    graphs = BakeStepGraphs(batch_size=1, dtype=torch.float32, text_shape=(TEXT_LEN, TEXT_DIM))(adapter, profile)
    return adapter, profile, graphs


def _schedule_error(runner, adapter, profile, seed: int) -> float:
    """Relative L2 of ``runner`` over the whole schedule against the eager sampler, on fresh feeds."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, *LATENT, generator=g)  # (B, C, F, H, W)
    text = torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g)  # cond row, then uncond
    with torch.no_grad():
        ref = CachedSampler(adapter, profile.tables(), profile.mask)(noise, text, GUIDANCE).latents
        got = run_schedule(runner, profile.mask, noise, text, GUIDANCE, profile.history)
    assert (ref - noise).abs().max() > 0.1
    return relative_l2(got, ref)


def test_exported_programs_equal_the_eager_sampler_over_the_schedule(cogvideox_graphs):
    adapter, profile, graphs = cogvideox_graphs
    assert _schedule_error(EagerRunner(graphs.modules), adapter, profile, seed=21) < 1e-6
    assert _schedule_error(program_runner(graphs.programs), adapter, profile, seed=22) < 1e-5


@pytest.mark.slow  # ONNX export of both graphs
def test_onnx_graphs_equal_the_eager_sampler_over_the_schedule(cogvideox_graphs, tmp_path):
    adapter, profile, graphs = cogvideox_graphs
    runner, _ = onnx_runner(graphs, tmp_path)
    assert _schedule_error(runner, adapter, profile, seed=23) < 1e-4


@pytest.mark.slow
def test_aoti_packages_equal_the_eager_sampler_over_the_schedule(cogvideox_graphs, tmp_path):
    """AOTInductor packages of the CogVideoX graphs (a minute or two of compiling on 2 cores)."""
    adapter, profile, graphs = cogvideox_graphs
    assert _schedule_error(aoti_runner(graphs, tmp_path), adapter, profile, seed=24) < 1e-4


def test_a_profile_of_another_scheduler_is_refused_before_export():
    """Graphs bake the timestep map of the loaded checkpoint's scheduler; a profile calibrated on another
    scheduler's table (here SNR shift 1, the model's is 3) would run mismatched tables."""
    from ertacache.errors import UserError

    profile = cogvideox_profile(tiny_cogvideox(False, snr_shift_scale=1.0))
    with pytest.raises(UserError, match="not this model's"):
        BakeStepGraphs(batch_size=1, dtype=torch.float32, text_shape=(TEXT_LEN, TEXT_DIM))(
            adapter_for(tiny_cogvideox(False)), profile)
