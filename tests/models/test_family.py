"""The model-family object: validation, latent layouts, sigma schedules, guidance modes, the registry."""

from dataclasses import replace

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from ertacache.errors import UserError
from ertacache.models.family import (
    CFG, EMBEDDED, IMAGE, NO_GUIDANCE, VIDEO, ConditioningInput, LatentLayout, ModelFamily, SigmaSchedule,
    family_for_model, family_named, find_family, register_family,
)
from ertacache.models.recipes import Recipe, load_recipe
from ertacache.models.wan import WAN_T2V
from tests.conftest import tiny_wan


def _loader(path, dtype):
    return None


def a_family(**changes) -> ModelFamily:
    """An image family of a made-up class, FLUX-like (not registered unless a test does so)."""
    fields = dict(
        name="test-image", transformer_class="MadeUpImageTransformer", latent_kind=IMAGE, packing=2,
        conditioning=(ConditioningInput("prompt_embeds"), ConditioningInput("pooled_prompt_embeds", rows="sample"),
                      ConditioningInput("img_ids", rows="shared")),
        timestep_scale=1000.0, sigma_schedule=SigmaSchedule("dynamic"), guidance=EMBEDDED,
        transformer=_loader, prompt_encoder=_loader, decoder=_loader, required_files=("transformer/config.json",),
    )
    fields.update(changes)
    return ModelFamily(**fields)


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("changes, match", [
    (dict(latent_kind="audio"), "latent_kind"),
    (dict(guidance="cfg++"), "guidance"),
    (dict(timestep_scale=0.0), "timestep_scale"),
    (dict(timestep_scale=float("nan")), "timestep_scale"),
    (dict(packing=0), "packing"),
    (dict(conditioning=()), "conditioning"),
    (dict(conditioning=(ConditioningInput("a"), ConditioningInput("a"))), "repeat"),
    (dict(export_rewrites=("not a name",)), "rewrite"),
    (dict(transformer="not callable"), "loader"),
    (dict(required_files=()), "required_files"),
    (dict(name="bad name!"), "family name"),
    (dict(transformer_class="Not.AClass"), "transformer_class"),
    (dict(sigma_schedule="static"), "SigmaSchedule"),
])
def test_a_bad_family_entry_is_refused_with_the_field_named(changes, match):
    a_family()  # the base entry is valid
    with pytest.raises(ValueError, match=match):
        a_family(**changes)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="latents"), "collides"),
    (dict(name="residual_1"), "collides"),
    (dict(name="guidance_scale"), "collides"),
    (dict(name="text embeds"), "identifier"),
    (dict(name="x", rows="per-token"), "rows"),
])
def test_conditioning_inputs_validate_their_names_and_rows(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConditioningInput(**kwargs)


def test_sigma_schedule_and_layout_validate_themselves():
    with pytest.raises(ValueError, match="kind"):
        SigmaSchedule("karras")
    with pytest.raises(ValueError, match="base_seq_len < max_seq_len"):
        SigmaSchedule("dynamic", base_seq_len=4096, max_seq_len=256)
    with pytest.raises(ValueError, match="patch of 3"):
        LatentLayout(VIDEO, 16, 8, (2, 2))
    with pytest.raises(ValueError, match="patch of 2"):
        LatentLayout(IMAGE, 16, 8, (1, 2, 2))
    with pytest.raises(ValueError, match="temporal_factor must be 1"):
        LatentLayout(IMAGE, 16, 8, (2, 2), temporal_factor=4)
    with pytest.raises(ValueError, match="channels"):
        LatentLayout(VIDEO, 0, 8, (1, 2, 2))


# ------------------------------------------------------------------------------------------ layouts


def test_video_layout_shapes_and_tokens_match_wan2_1():
    layout = LatentLayout(VIDEO, channels=16, spatial_factor=8, temporal_factor=4, patch=(1, 2, 2), model="wan2.1")
    assert layout.latent_shape(2, 480, 832, 81) == (2, 16, 21, 60, 104)
    assert layout.rank == 4 and layout.channel_axis == 1
    assert layout.tokens(480, 832, 81) == 21 * 30 * 52  # 32,760 tokens: Wan2.1's 480p, 81-frame sequence


def test_image_layout_shapes_and_tokens_with_packing():
    layout = LatentLayout(IMAGE, channels=16, spatial_factor=8, patch=(1, 1), packing=2, model="flux")
    assert layout.latent_shape(1, 1024, 768) == (1, 16, 128, 96)
    assert layout.rank == 3
    assert layout.tokens(1024, 768) == 64 * 48  # FLUX packs 2x2 latent pixels into one token


@pytest.mark.parametrize("size, match", [
    ((480, 830, 81), "multiples of 16 .*VAE factor 8 x patch 2.*--width 816"),
    ((0, 832, 81), "positive multiples of 16"),
    ((480, 832, 80), r"4\*k \+ 1.*--frames 77"),
    ((480, 832, None), "generates video: give the number of frames"),
])
def test_video_layout_refuses_sizes_that_do_not_divide(size, match):
    layout = LatentLayout(VIDEO, channels=16, spatial_factor=8, temporal_factor=4, patch=(1, 2, 2), model="wan2.1")
    with pytest.raises(UserError, match=match):
        layout.latent_shape(1, *size)


def test_temporal_patch_refusal_names_a_frame_count_that_fits():
    layout = LatentLayout(VIDEO, channels=4, spatial_factor=1, temporal_factor=1, patch=(2, 2, 2))
    with pytest.raises(UserError, match="temporal patch 2.*--frames 4"):
        layout.check(8, 8, 3)
    layout.check(8, 8, 4)


def test_image_layout_refuses_frames_and_sizes_off_the_packing_grid():
    layout = LatentLayout(IMAGE, channels=16, spatial_factor=8, patch=(1, 1), packing=2, model="flux")
    with pytest.raises(UserError, match="generates images: --frames applies to video models only"):
        layout.check(1024, 1024, 1)
    with pytest.raises(UserError, match="multiples of 16 .*VAE factor 8 x packing 2 x patch 1"):
        layout.check(1000, 1024)


def test_family_layout_reads_the_decoder_and_patch():
    class Decoder:
        latent_channels, spatial_factor, temporal_factor = 16, 8, 4

    wan = WAN_T2V.layout(Decoder(), (1, 2, 2), "wan2.1")
    assert (wan.kind, wan.channels, wan.spatial_factor, wan.temporal_factor, wan.patch) == (VIDEO, 16, 8, 4, (1, 2, 2))
    image = a_family().layout(Decoder(), (1, 1, 1))  # an image family: no time axis, the (1, ...) patch dropped
    assert (image.kind, image.temporal_factor, image.patch, image.packing) == (IMAGE, 1, (1, 1), 2)


# ------------------------------------------------------------------------------------------ sigma schedules


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("steps", [2, 10, 50])
def test_static_schedule_equals_diffusers_scheduler(shift, steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    ours = SigmaSchedule("static").table(steps, shift)
    np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), rtol=0, atol=1e-6)
    assert ours[-1] == 0.0 and ours.dtype == np.float64
    assert np.array_equal(WAN_T2V.sigmas(steps, shift), ours)


def documented_mu(seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """FluxPipeline's ``calculate_shift``, written from its documented formula: mu is linear in the tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + (base_shift - m * base_seq_len)


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 6000])
@pytest.mark.parametrize("steps", [4, 28, 50])
def test_dynamic_schedule_equals_diffusers_scheduler_with_dynamic_shifting(seq_len, steps):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    schedule = SigmaSchedule("dynamic", base_shift=0.5, max_shift=1.15, base_seq_len=256, max_seq_len=4096)
    mu = documented_mu(seq_len)
    assert schedule.mu(seq_len) == pytest.approx(mu, abs=1e-12)
    assert schedule.mu(seq_len) == pytest.approx(calculate_shift(seq_len), abs=1e-12)

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096,
                                                time_shift_type="exponential")
    # what FluxPipeline does: the linear ramp 1 .. 1/T, shifted by mu inside set_timesteps
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = schedule.table(steps, seq_len=seq_len)
    assert ours.shape == (steps + 1,) and ours[-1] == 0.0
    np.testing.assert_array_equal(ours.astype(np.float32), scheduler.sigmas.numpy())


def test_dynamic_schedule_shifts_more_at_higher_resolution_and_ignores_shift():
    schedule = SigmaSchedule("dynamic")
    small, large = schedule.table(10, seq_len=256), schedule.table(10, seq_len=4096)
    assert np.all(large[1:-1] > small[1:-1])  # more tokens: more of the schedule at high noise
    assert np.array_equal(schedule.table(10, shift=7.0, seq_len=256), small)
    assert not schedule.uses_shift and SigmaSchedule("static").uses_shift
    with pytest.raises(UserError, match="token count"):
        schedule.table(10)
    with pytest.raises(UserError, match="shift must be > 0"):
        SigmaSchedule("static").table(10, shift=0.0)


# ------------------------------------------------------------------------------------------ guidance


def test_guidance_modes_decide_branches_and_refuse_what_the_family_lacks():
    assert (WAN_T2V.guidance, WAN_T2V.n_branches(5.0), WAN_T2V.n_branches(1.0)) == (CFG, 2, 1)
    embedded = a_family(guidance=EMBEDDED)
    assert embedded.n_branches(3.5) == 1  # a distilled guidance embedding: one branch
    embedded.check_guidance(3.5)
    schnell = a_family(guidance=NO_GUIDANCE)
    assert schnell.n_branches(0.0) == 1
    schnell.check_guidance(0.0)
    with pytest.raises(UserError, match="takes no guidance.*drop --guidance-scale"):
        schnell.check_guidance(3.5)
    with pytest.raises(UserError, match="finite number >= 0"):
        WAN_T2V.check_guidance(float("inf"))


# ------------------------------------------------------------------------------------------ registry


def test_registry_by_name_and_by_class():
    assert family_named("wan") is WAN_T2V
    assert family_for_model(tiny_wan()) is WAN_T2V
    testbed = family_named("testbed")  # registered by ertacache.testbed.family on demand
    assert testbed.variant_of == "wan" and testbed.prompt_encoder is not WAN_T2V.prompt_encoder
    assert all(getattr(testbed, f) == getattr(WAN_T2V, f) for f in ("latent_kind", "conditioning", "guidance",
                                                                    "timestep_scale", "sigma_schedule"))
    assert find_family(nn.Linear(2, 2)) is None
    with pytest.raises(UserError, match="no ERTACache model family for model class 'Linear'.*register_family"):
        family_for_model(nn.Linear(2, 2))
    with pytest.raises(UserError, match="unknown model family 'nope'.*'testbed'.*'wan'"):
        family_named("nope")


def test_a_variant_may_change_only_how_components_load():
    with pytest.raises(ValueError, match="cannot change \\['guidance'\\]"):
        WAN_T2V.variant("wan-distilled", guidance=EMBEDDED)
    sneaky = replace(WAN_T2V, name="wan-sneaky", variant_of="wan", timestep_scale=1.0)
    with pytest.raises(ValueError, match="differs in \\['timestep_scale'\\]"):
        register_family(sneaky)
    with pytest.raises(ValueError, match="already belongs to family 'wan'"):
        register_family(replace(WAN_T2V, name="wan-again"))


def test_a_recipe_naming_an_unknown_family_is_refused():
    d = {"model": "m", "family": "flux-typo", "hub_id": "x/y",
         "defaults": {"height": 8, "width": 8, "frames": 1, "steps": 2, "shift": 1.0, "guidance_scale": 1.0,
                      "speedup": 2.0}}
    with pytest.raises(UserError, match="recipe 'm' names an unknown model family 'flux-typo'.*'wan'"):
        Recipe.from_dict(d)
    assert load_recipe("wan2.1").family == "wan"
