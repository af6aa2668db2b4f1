"""Wan2.2 A14B's two experts in the project's sampler: which expert runs each step, and no residual crosses the switch.

WanPipeline with ``transformer_2`` and ``boundary_ratio`` runs ``transformer`` (and ``guidance_scale``)
while the timestep is at or above ``boundary_ratio * 1000`` and ``transformer_2`` (and
``guidance_scale_2``) below it. Two tiny random transformers of the same shape (different seeds)
stand in for the experts.
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from ertacache.errors import UserError
from ertacache.models.adapter import adapter_for
from ertacache.profile.predictor import taylor_weights
from ertacache.sampling import CachedSampler
from ertacache.sampling.experts import Experts
from ertacache.sampling.sampler import validate_mask
from ertacache.sampling.steps import StepTables
from tests.conftest import tiny_wan

SHIFT, BOUNDARY, GUIDANCE, GUIDANCE_2 = 3.0, 0.875, 4.0, 3.0


def _experts_for(sigmas):
    return Experts.from_boundary(sigmas, BOUNDARY, (GUIDANCE, GUIDANCE_2))


def test_the_switch_is_where_the_pipeline_switches():
    family = adapter_for(tiny_wan()).family
    sigmas = family.sigmas(10, shift=SHIFT)  # (11,)
    experts = _experts_for(sigmas)
    b = experts.starts[1]
    assert sigmas[b - 1] * 1000 >= BOUNDARY * 1000 > sigmas[b] * 1000  # WanPipeline: t >= boundary -> transformer
    assert experts.expert_table(10) == [0] * b + [1] * (10 - b)
    assert (experts.segment_start(b + 1), experts.guidance_at(b - 1), experts.guidance_at(b)) == (b, 4.0, 3.0)
    assert list(np.flatnonzero(experts.forced_full(10, 2))) == [0, 1, b, b + 1]
    with pytest.raises(UserError, match="one of the two transformers would never run"):
        Experts.from_boundary(sigmas, 0.001, (GUIDANCE, GUIDANCE_2))  # the last step: 0.0089
    with pytest.raises(ValueError, match="one guidance scale per expert"):
        Experts((0, 3), (4.0,))


def test_masks_and_taylor_weights_restart_at_the_switch():
    starts = (0, 5)
    ok = [True, True, False, True, False, True, True, False, True, False]
    assert validate_mask(ok, 10, history=2, starts=starts) == tuple(ok)
    with pytest.raises(UserError, match="step 5, the first step of expert 1"):
        validate_mask([True, True, False, True, True, False, True, True, True, True], 10, 2, starts)
    with pytest.raises(UserError, match=r"only 1 full step\(s\) precede the first cached step of expert 1"):
        validate_mask([True, True, False, True, True, True, False, True, True, True], 10, 2, starts)
    w = taylor_weights(ok, 2, starts)  # (T, K, 1)
    np.testing.assert_allclose(w[7, :, 0], [2.0, -1.0])  # from steps 6 and 5: linear, never from step 3 or 4
    np.testing.assert_allclose(w[2, :, 0], [2.0, -1.0])  # from steps 1 and 0
    with pytest.raises(UserError, match="only 1 full step"):
        taylor_weights([True, True, True, True, True, True, False, True, True, True], 2, starts)


def _pipe(high, low):
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=high, transformer_2=low, vae=None,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), boundary_ratio=BOUNDARY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_sampler_with_both_experts_equals_wanpipeline():
    high, low = tiny_wan(seed=0), tiny_wan(seed=1)
    adapters = [adapter_for(high), adapter_for(low)]
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 4, 2, 4, 6, generator=g)  # (B, C, F', H', W')
    text, neg = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    steps = 6
    sigmas = adapters[0].family.sigmas(steps, shift=SHIFT)
    experts = _experts_for(sigmas)
    assert 0 < experts.starts[1] < steps  # both experts run
    tables = StepTables(sigmas, n_branches=2, channels=4)
    with torch.no_grad():
        ours = CachedSampler(adapters, tables, [True] * steps, experts)(noise, torch.cat([text, neg]), 0.0).latents
        ref = _pipe(high, low)(prompt_embeds=text, negative_prompt_embeds=neg, height=32, width=48, num_frames=5,
                               num_inference_steps=steps, guidance_scale=GUIDANCE, guidance_scale_2=GUIDANCE_2,
                               latents=noise, output_type="latent", return_dict=False)[0]
        one = CachedSampler(adapters[0], tables, [True] * steps)(noise, torch.cat([text, neg]), GUIDANCE).latents
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (one - ref).abs().max() > 1e-3  # the first expert alone is another video


def test_a_cached_step_reads_only_its_own_experts_residuals():
    """The low-noise expert's first cached step predicts from its own full steps, not the high-noise expert's."""
    high, low = tiny_wan(seed=0), tiny_wan(seed=1)
    adapters = [adapter_for(high), adapter_for(low)]
    steps = 8
    sigmas = adapters[0].family.sigmas(steps, shift=SHIFT)
    experts = _experts_for(sigmas)
    b = experts.starts[1]
    mask = [True] * steps
    mask[b + 1] = False  # reuse: the residual of step b, the low-noise expert's first
    tables = StepTables(sigmas, n_branches=2, channels=4)
    g = torch.Generator().manual_seed(5)
    noise, text = torch.randn(1, 4, 2, 4, 6, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        got = CachedSampler(adapters, tables, mask, experts)(noise, text, 0.0).latents
    assert torch.isfinite(got).all()
    with pytest.raises(UserError, match="2 expert\\(s\\) in the schedule but 1 transformer"):
        CachedSampler(adapters[0], tables, mask, experts)
    bad = [True] * steps
    bad[b] = False
    with pytest.raises(UserError, match=f"step {b}, the first step of expert 1"):
        CachedSampler(adapters, tables, bad, experts)


def _calibration_set(steps=12, prompts=3):
    from ertacache.profile.calibrate import CalibrationSet

    high, low = tiny_wan(seed=0), tiny_wan(seed=1)
    sigmas = adapter_for(high).family.sigmas(steps, shift=SHIFT)
    experts = _experts_for(sigmas)
    g = torch.Generator().manual_seed(7)
    cal = CalibrationSet(adapter_for(high), torch.randn(prompts, 4, 2, 4, 6, generator=g),
                         torch.randn(2 * prompts, 5, 16, generator=g), GUIDANCE, sigmas, 2, experts=experts,
                         more_adapters=(adapter_for(low),))
    return cal, experts, sigmas


@pytest.mark.parametrize("kind,order,loop", [("taylor", 1, "closed"), ("taylor", 1, "open"), ("reuse", 0, "open"),
                                             ("reuse", 0, "closed")])
def test_calibration_keeps_each_expert_to_itself(kind, order, loop):
    """The mask restarts at the switch, the weights read one expert's residuals, the adjusted sigmas keep
    every step on its expert's side of the boundary, and the profile's tables run in the sampler."""
    from ertacache.profile.calibrate import calibrate
    from ertacache.profile.config import CalibrationConfig
    from ertacache.profile.predictor import PredictorConfig

    cal, experts, sigmas = _calibration_set()
    config = CalibrationConfig(speedup=2.0, loop=loop, batch_size=2, predictor=PredictorConfig(kind=kind, order=order),
                               phi_max=1.5, phi_rule="lsq")
    res = calibrate(cal, config, progress=False, log=lambda s: None).result
    b, k = experts.starts[1], order + 1
    validate_mask(res.mask, 12, k, experts.starts)  # the rule per expert holds
    assert all(res.mask[b:b + k]) and all(res.mask[:k])
    if kind == "taylor":
        np.testing.assert_allclose(res.pred_w.numpy(), taylor_weights(res.mask, k, experts.starts), atol=1e-6)
    assert res.sigmas[b] == pytest.approx(sigmas[b]) and (res.sigmas[:b] >= BOUNDARY).all()
    assert (res.sigmas[b:-1] < BOUNDARY).all() and res.sigmas[-1] == 0.0
    with torch.no_grad():
        out = CachedSampler([cal.adapter, *cal.more_adapters], res.tables(), res.mask, experts)(
            cal.latents, cal.text_embeds, 0.0).latents
    assert torch.isfinite(out).all()


def test_the_time_adjustment_lands_on_the_switch_and_respects_the_floor():
    from ertacache.profile.timeadjust import adjusted_sigmas

    nominal = np.array([1.0, 0.95, 0.9, 0.8, 0.6, 0.3, 0.0])
    phi = np.array([1.0, 2.0, 1.0, 1.0, 0.5, 1.0])
    one = adjusted_sigmas(nominal, phi)
    two = adjusted_sigmas(nominal, phi, starts=(0, 3), floors=(0.875, 0.0))
    assert two[3] == 0.8 and two[-1] == 0.0 and one[3] != 0.8  # each segment lands on the next one's nominal sigma
    assert (two[:3] >= 0.875).all() and adjusted_sigmas(nominal, phi, starts=(0, 3))[2] < 0.875  # floor at work
    np.testing.assert_allclose(adjusted_sigmas(nominal, phi, (0,), None), one)
