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
from ertacache.models.experts import Experts
from ertacache.sampling.sampler import check_empty_slots, validate_mask
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
    assert [experts.expert(i) for i in range(10)] == [0] * b + [1] * (10 - b)
    assert (experts.segment_start(b + 1), experts.guidance_at(b - 1), experts.guidance_at(b)) == (b, 4.0, 3.0)
    assert list(np.flatnonzero(experts.forced_full(10, 2))) == [0, 1, b, b + 1]
    with pytest.raises(UserError, match="one of the two transformers would never run"):
        Experts.from_boundary(sigmas, 0.001, (GUIDANCE, GUIDANCE_2))  # the last step: 0.0089
    with pytest.raises(ValueError, match="one guidance scale per expert"):
        Experts((0, 3), (4.0,))


def test_masks_and_taylor_weights_restart_at_the_switch():
    starts = (0, 5)
    ok = [True, True, False, True, False, True, True, False, True, False]
    assert validate_mask(ok, 10, starts=starts) == tuple(ok)
    with pytest.raises(UserError, match="step 5, the first step of expert 1"):
        validate_mask([True, True, False, True, True, False, True, True, True, True], 10, starts)
    w = taylor_weights(ok, 2, starts)  # (T, K, 1)
    np.testing.assert_allclose(w[7, :, 0], [2.0, -1.0])  # from steps 6 and 5: linear, never from step 3 or 4
    np.testing.assert_allclose(w[2, :, 0], [2.0, -1.0])  # from steps 1 and 0
    # one full step of expert 1 before a cached step: reuse of it, never a line through expert 0's step 4
    early = [True, True, True, True, True, True, False, True, True, True]
    w_early = torch.as_tensor(taylor_weights(early, 2, starts))
    np.testing.assert_allclose(w_early[6, :, 0], [1.0, 0.0])
    check_empty_slots(w_early, early, starts)
    w_early[6, :, 0] = torch.tensor([2.0, -1.0])  # the line through step 5 and expert 0's step 4
    with pytest.raises(UserError, match="step 6 is cached after 1 full step.*slot 2 of 2"):
        check_empty_slots(w_early, early, starts)


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
    validate_mask(res.mask, 12, experts.starts)  # each expert opens with a full step
    assert res.mask[b] and res.mask[0]
    check_empty_slots(res.pred_w, res.mask, experts.starts)  # no cached step reads the other expert's residuals
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


def _a14b_folder(tmp_path):
    from tests.conftest import save_tiny_wan_folder

    folder = save_tiny_wan_folder(tmp_path / "a14b")
    tiny_wan(seed=1).save_pretrained(folder / "transformer_2")  # the low-noise expert: same shape, other weights
    return folder


def test_the_wan22_id_loads_both_experts_and_other_ids_refuse_the_folder(tmp_path):
    from ertacache.errors import ModelNotFoundError
    from ertacache.models.loading import fingerprint_module, load_bundle
    from tests.conftest import save_tiny_wan_folder

    folder = _a14b_folder(tmp_path)
    bundle = load_bundle("wan2.2", folder, dtype="fp32")
    assert bundle.transformer_2 is not None and len(bundle.adapters) == 2
    assert bundle.fingerprint == f"{fingerprint_module(bundle.transformer)}+{fingerprint_module(bundle.transformer_2)}"
    with pytest.raises(UserError, match=r"holds two transformers .* use a two-expert id \(wan2.2, wan2.2-i2v\)"):
        load_bundle("wan2.1", folder, dtype="fp32")
    with pytest.raises(ModelNotFoundError, match="no transformer_2/ folder"):
        load_bundle("wan2.2", save_tiny_wan_folder(tmp_path / "one"), dtype="fp32")


def test_a14b_profile_generate_and_pipeline_hook_agree(tmp_path):
    """ertacache-profile's path makes a schema-3 profile with the switch; generate and the hook on a two-expert
    WanPipeline (both transformers hooked, the profile's two CFG scales) give the same latents."""
    from ertacache.generation import generate
    from ertacache.integrations import enable_ertacache
    from ertacache.models.loading import load_bundle
    from ertacache.profile.artifact import load_profile
    from ertacache.profile.build import build_profile
    from ertacache.profile.config import CalibrationConfig
    from ertacache.profile.predictor import PredictorConfig
    from ertacache.sampling.settings import SampleSettings

    bundle = load_bundle("wan2.2", _a14b_folder(tmp_path), dtype="fp32")
    settings = SampleSettings.from_recipe(bundle.recipe, height=32, width=48, frames=5, steps=10)
    assert (settings.guidance_scale, settings.guidance_scale_2, settings.shift) == (4.0, 3.0, 12.0)
    config = CalibrationConfig(speedup=2.0, batch_size=2, predictor=PredictorConfig(kind="taylor", order=1))
    profile = build_profile(bundle, config, settings, ["a cat walks", "a red car"], progress=False,
                            log=lambda s: None)
    assert profile.experts == bundle.experts(profile.nominal_sigmas, settings) and profile.schema_version == 3
    profile.save(tmp_path / "profile")
    loaded = load_profile(tmp_path / "profile")
    assert loaded.experts == profile.experts and loaded.mask == profile.mask
    b = profile.experts.starts[1]
    assert 0 < b < 10 and profile.mask[b] and profile.mask[b + 1]  # the low-noise expert's warm-up

    result = generate(bundle, ["a dog runs"], [7], settings, loaded, decode=False)
    assert result.full_steps == profile.full_steps

    pipe = WanPipeline(tokenizer=bundle.prompt_encoder.tokenizer, text_encoder=bundle.prompt_encoder.text_encoder,
                       transformer=bundle.transformer, transformer_2=bundle.transformer_2, vae=None,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=settings.shift), boundary_ratio=0.875)
    pipe.set_progress_bar_config(disable=True)
    enable_ertacache(pipe, loaded)
    text = bundle.encode(["a dog runs"], settings.negative_prompt, 2)
    from ertacache.sampling.sampler import initial_latents

    noise = initial_latents(profile.latent_shape, [7])
    with torch.no_grad():
        got = pipe(prompt_embeds=text[:1], negative_prompt_embeds=text[1:], height=32, width=48, num_frames=5,
                   num_inference_steps=10, guidance_scale=4.0, guidance_scale_2=3.0, latents=noise,
                   output_type="latent", return_dict=False)[0]
    torch.testing.assert_close(got, result.latents, rtol=1e-4, atol=1e-4)


def test_a14b_profiles_are_checked_and_unsupported_stages_refuse(tmp_path, capsys):
    import json

    from ertacache.cli.eval import main as eval_main
    from ertacache.errors import ProfileError
    from ertacache.profile.artifact import load_profile

    cal, experts, sigmas = _calibration_set(steps=10, prompts=2)
    # a hand-made profile folder from a calibration of the two tiny experts
    from ertacache.profile.calibrate import calibrate
    from ertacache.profile.config import CalibrationConfig
    from tests.integrations.test_wan_pipeline import make_profile

    res = calibrate(cal, CalibrationConfig(speedup=2.0, batch_size=2), progress=False, log=lambda s: None).result
    profile = make_profile(tiny_wan(), cal.adapter)
    profile.steps, profile.mask, profile.nominal_sigmas = 10, list(res.mask), [float(s) for s in sigmas]
    profile.sigmas, profile.phi = [float(s) for s in res.sigmas], [float(p) for p in res.phi]
    profile.corr_a, profile.corr_b, profile.pred_w, profile.pred_b = res.corr_a, res.corr_b, res.pred_w, res.pred_b
    profile.experts = experts
    profile.save(tmp_path / "p")
    assert load_profile(tmp_path / "p").experts == experts
    meta = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert meta["schema_version"] == 3
    meta["experts"]["starts"] = [0, experts.starts[1] + 1]  # a step moved to the other expert
    (tmp_path / "p" / "profile.json").write_text(json.dumps(meta))
    with pytest.raises(ProfileError, match="disagrees with the switch"):
        load_profile(tmp_path / "p")
    assert eval_main(["--model", "wan2.2", "--out", str(tmp_path / "e")]) == 2
    assert "ertacache-eval does not take two-expert models yet" in capsys.readouterr().err


def test_profile_and_generate_command_lines_take_the_two_experts(tmp_path, capsys):
    from ertacache.cli import generate as generate_cli
    from ertacache.cli import profile as profile_cli
    from ertacache.profile.artifact import load_profile

    folder = _a14b_folder(tmp_path)
    base = ["--model", "wan2.2", "--model-path", str(folder), "--dtype", "fp32", "--height", "32", "--width", "48",
            "--frames", "5", "--steps", "20"]
    # 10 steps at 4x: 2 full steps, but 3 forced (each expert's first step, the last)
    rc = profile_cli.main([*base[:-1], "10", "--speedup", "4", "--quiet", "--out", str(tmp_path / "q")])
    assert rc == 2 and "the two experts force 3" in capsys.readouterr().err  # before any calibration pass
    assert profile_cli.main([*base, "--quiet", "--guidance-scale-2", "2.5", "--out", str(tmp_path / "p")]) == 0
    profile = load_profile(tmp_path / "p")
    assert profile.experts.guidance_scales == (4.0, 2.5)
    assert generate_cli.main([*base[:6], "--prompt", "a cat", "--profile", str(tmp_path / "p"),
                              "--out", str(tmp_path / "v.gif")]) == 0  # the profile's two scales
    assert (tmp_path / "v.gif").is_file()
    rc = generate_cli.main([*base[:6], "--prompt", "a cat", "--profile", str(tmp_path / "p"), "--guidance-scale-2",
                            "3.5", "--out", str(tmp_path / "w.gif")])
    assert rc == 2 and "profile again" in capsys.readouterr().err
    rc = generate_cli.main(["--model", "wan2.1-tiny", "--prompt", "digit 1 moving up", "--guidance-scale-2", "2",
                            "--out", str(tmp_path / "x.gif")])
    assert rc == 2 and "has one transformer" in capsys.readouterr().err


def tiny_wan_i2v_a14b(seed: int):
    """Wan2.2 I2V-A14B's expert at toy size: latents + 4 mask + condition channels in, no image embedder."""
    from diffusers import WanTransformer3DModel

    from tests.models.test_wan_i2v import C, TEXT_DIM

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                 in_channels=2 * C + 4, out_channels=C, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32,
                                 num_layers=2, cross_attn_norm=True, rope_max_seq_len=64).eval()


def test_i2v_a14b_sampler_and_hook_equal_the_two_expert_i2v_pipeline():
    """WanImageToVideoPipeline with two experts and no CLIP: the condition latents from the VAE alone (our
    conditioner), the all-full sampler equals the pipeline, and the hook on both transformers equals the sampler."""
    from diffusers import WanImageToVideoPipeline

    from ertacache.integrations import enable_ertacache
    from ertacache.models.wan import WanImageConditioner
    from tests.models.test_wan_i2v import C, TEXT_DIM, TEXT_LEN, conditioning_image, pipeline_condition, tiny_wan_vae

    high, low = tiny_wan_i2v_a14b(0), tiny_wan_i2v_a14b(1)
    adapters = [adapter_for(high), adapter_for(low)]
    assert adapters[0].family.name == "wan-i2v-a14b"
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, image_encoder=None, image_processor=None,
                                   transformer=high, transformer_2=low, vae=tiny_wan_vae(), boundary_ratio=0.9,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT))
    pipe.set_progress_bar_config(disable=True)
    size, frames, steps = 32, 5, 8
    image = conditioning_image(size)
    pil_rgb = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # the same picture as uint8
    ours_cond = WanImageConditioner(None, None, pipe.vae).encode([pil_rgb], size, size, frames)
    assert sorted(ours_cond) == ["image_latents"]
    torch.testing.assert_close(ours_cond["image_latents"], pipeline_condition(pipe, image, frames, size),
                               rtol=1e-3, atol=2e-3)  # uint8 rounding of the picture
    g = torch.Generator().manual_seed(2)
    text = torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g)
    cond = {"text_embeds": text, "image_latents": pipeline_condition(pipe, image, frames, size)}
    noise = torch.randn(1, C, 2, 4, 4, generator=g)
    sigmas = adapters[0].family.sigmas(steps, shift=SHIFT)
    experts = Experts.from_boundary(sigmas, 0.9, (GUIDANCE, GUIDANCE_2))
    tables = StepTables(sigmas, n_branches=2, channels=C)

    def run_pipe():
        with torch.no_grad():
            return pipe(image=image, prompt_embeds=text[:1], negative_prompt_embeds=text[1:], height=size, width=size,
                        num_frames=frames, num_inference_steps=steps, guidance_scale=GUIDANCE,
                        guidance_scale_2=GUIDANCE_2, latents=noise, output_type="latent", return_dict=False)[0]

    with torch.no_grad():
        ours = CachedSampler(adapters, tables, [True] * steps, experts)(noise, cond, 0.0).latents
    torch.testing.assert_close(ours, run_pipe(), rtol=1e-5, atol=1e-5)

    b = experts.starts[1]
    mask = [True] * steps
    for i in (b - 1, b + 2):  # one cached step per expert, each after its expert's own full steps
        if i >= 2 and i != b and i != b + 1:
            mask[i] = False
    from ertacache.models.loading import fingerprint_modules
    from ertacache.profile.artifact import Profile

    zeros = torch.zeros(steps, 2, C)
    profile = Profile("wan2.2-i2v-test", fingerprint_modules([high, low]), steps, SHIFT, size, size, frames,
                      [C, 2, 4, 4], GUIDANCE, 2, 0.1, mask, [float(s) for s in sigmas], [float(s) for s in sigmas],
                      [1.0] * steps, zeros, zeros, {}, {}, experts=experts)
    enable_ertacache(pipe, profile)
    got = run_pipe()
    with torch.no_grad():
        want = CachedSampler(adapters, profile.tables(), mask, experts)(noise, cond, 0.0).latents
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - ours).abs().max() > 1e-5  # the cached steps changed something


def test_the_wan22_i2v_id_loads_a_two_expert_folder_without_clip_and_generates(tmp_path):
    """A folder as WanImageToVideoPipeline.save_pretrained writes Wan2.2 I2V-A14B (no image_encoder/, two
    transformers): the id loads it, the image path is the VAE alone, and generate runs both experts."""
    from diffusers import WanImageToVideoPipeline

    from ertacache.generation import generate
    from ertacache.models.images import sample_images
    from ertacache.models.loading import load_bundle
    from ertacache.sampling.settings import SampleSettings
    from tests.conftest import tiny_umt5
    from tests.models.test_wan_i2v import tiny_wan_vae

    tokenizer, text_encoder = tiny_umt5("a cat walks on the grass camera pans slowly".split())
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, image_encoder=None,
                                   image_processor=None, transformer=tiny_wan_i2v_a14b(0),
                                   transformer_2=tiny_wan_i2v_a14b(1), vae=tiny_wan_vae(), boundary_ratio=0.9,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT))
    pipe.save_pretrained(tmp_path / "folder")
    bundle = load_bundle("wan2.2-i2v", tmp_path / "folder", dtype="fp32")
    assert bundle.family.name == "wan-i2v-a14b" and bundle.transformer_2 is not None
    assert bundle.image_encoder.clip is None and bundle.image_encoder.vae is bundle.decoder.vae
    settings = SampleSettings.from_recipe(bundle.recipe, height=32, width=32, frames=5, steps=6)
    cond = bundle.encode(["a cat walks"], "", 2, sample_images(1), (5, 32, 32))
    assert list(cond) == ["text_embeds", "image_latents"]
    a = generate(bundle, ["a cat walks"], [0], settings, None, images=sample_images(1))
    b = generate(bundle, ["a cat walks"], [0], settings, None, images=sample_images(1, offset=1))
    assert a.frames.shape == (1, 5, 32, 32, 3) and not torch.equal(a.latents, b.latents)
