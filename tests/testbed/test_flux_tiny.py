"""The flux-tiny image testbed: its data, judge, text path and trainer (no trained weights needed here).

What needs the shipped weights is in test_shipped_flux_tiny.py.
"""

import importlib.util
import sys

import numpy as np
import pytest
import torch

from ertacache.errors import PromptError, UserError
from ertacache.testbed import image_data as idata
from ertacache.testbed.flux_tiny import FluxSpec, build_flux_tiny, flux_sigmas, flux_velocity, sample_images
from ertacache.testbed.image_judge import attribute_accuracy, correct_per_sample
from ertacache.testbed.judges import JUDGES, judge_for
from ertacache.testbed.text_encoder import PooledPromptEncoder

from conftest import ROOT

#: a two-block model: the plumbing, not the quality, is under test here
SMALL = FluxSpec(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, text_dim=16,
                 axes_dims_rope=(4, 6, 6))


def test_prompt_grammar_round_trips_and_refuses_other_text():
    prompts = idata.all_prompts()
    assert len(prompts) == len(set(prompts)) == 40
    assert all(idata.make_prompt(*idata.parse_prompt(p)) == p for p in prompts)
    for bad in ("purple digit 3", "red digit 12", "red number 3", "digit 3 moving left", ""):
        with pytest.raises(PromptError):
            idata.parse_prompt(bad)
    with pytest.raises(UserError, match="colour must be one of"):
        idata.make_prompt("purple", 3)
    # the judges' grammars stay disjoint: the prompts alone pick the judge
    assert judge_for(idata.held_out_prompts(8)) is JUDGES["digit-images"]
    assert not JUDGES["digits"].reads(prompts[:1]) and not JUDGES["scenes"].reads(prompts[:1])
    assert set(idata.calibration_prompts(40)) == set(prompts)  # balanced: every prompt once in 40


def test_images_show_the_prompt_over_the_split_photographs():
    images, prompts = idata.DigitImageSampler("train", seed=1).batch(6, prompts=["red digit 3"] * 6)
    assert images.shape == (6, 3, 32, 32) and prompts == ["red digit 3"] * 6
    assert images.min() >= -1 and images.max() <= 1
    rgb = (images + 1) / 2  # (B, 3, H, W)
    # the ink is red: somewhere the red channel is near 1 while green is low
    assert bool(((rgb[:, 0] > 0.9) & (rgb[:, 1] < 0.4)).flatten(1).any(1).all())
    # the background is textured, not flat: a dimmed photo window below the ink's brightness
    background = rgb.max(1).values < idata.ImageSpec().background_level + 1e-6  # (B, H, W)
    assert float(rgb.max(1).values[background].std()) > 0.02
    # held-out images come from other handwriting and another strip of each photograph
    train_bg = idata._background_regions("train", idata.ImageSpec())
    held_bg = idata._background_regions("held_out", idata.ImageSpec())
    assert all(t.shape[1] > h.shape[1] for t, h in zip(train_bg, held_bg))


def test_judge_reads_real_held_out_images_and_rejects_wrong_prompts():
    frames, prompts = idata.real_image_batch("held_out", 200, seed=5)  # (B, 1, H, W, 3)
    assert frames.shape == (200, 1, 32, 32, 3) and frames.dtype == np.uint8
    acc = attribute_accuracy(frames, prompts)
    assert acc["digit"] >= 0.8 and acc["colour"] >= 0.97, acc
    # the same images against shifted prompts (another digit, another colour): near chance
    wrong = [idata.make_prompt(idata.COLOUR_NAMES[(idata.COLOUR_NAMES.index(c) + 1) % 4], (d + 1) % 10)
             for c, d in map(idata.parse_prompt, prompts)]
    bad = correct_per_sample(frames, wrong)
    assert bad["digit"].mean() < 0.2 and bad["colour"].mean() < 0.05
    assert JUDGES["digit-images"].score(frames, prompts) == {"digit_acc": acc["digit"], "colour_acc": acc["colour"]}


def test_pooled_encoder_gives_flux_both_inputs():
    _, text_encoder, _ = build_flux_tiny(0, SMALL)
    enc = PooledPromptEncoder(text_encoder)
    out = enc.encode(["red digit 3", "blue digit 1"])
    assert set(out) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert out["prompt_embeds"].shape == (2, 4, 16) and out["pooled_prompt_embeds"].shape == (2, 16)
    # pooled = the mean of the states over the prompt's words (3 of the 4 positions)
    assert torch.allclose(out["pooled_prompt_embeds"][0], out["prompt_embeds"][0, :3].mean(0), atol=1e-6)
    with pytest.raises(PromptError, match="unknown word 'purple'.*knows: digit 0 1"):
        enc.encode(["purple digit 3"])


def test_pixel_vae_round_trips_images():
    _, _, vae = build_flux_tiny(0, SMALL)
    images, _ = idata.DigitImageSampler("train", seed=2).batch(2)  # (2, 3, 32, 32)
    lat = vae.encode_images(images)
    assert lat.shape == (2, 48, 8, 8)  # RGB folded 4 x 4 into channels
    frames = vae.decode(lat)  # (2, 1, 32, 32, 3) uint8
    want = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert frames.shape == (2, 1, 32, 32, 3) and torch.equal(frames[:, 0], want)


def test_reference_sampler_uses_the_flux_family_schedule():
    from ertacache.models.flux import FLUX_T2I

    sig = flux_sigmas(50, 32, 32, 4)
    assert sig.shape == (51,) and sig[-1] == 0 and torch.all(sig[1:] < sig[:-1])
    assert np.allclose(sig.numpy(), FLUX_T2I.sigmas(50, None, 16))  # 16 tokens: 8 x 8 latents packed 2 x 2
    transformer, text_encoder, _ = build_flux_tiny(0, SMALL)
    for g in (1.0, 3.0):  # one branch, and CFG with the empty prompt
        lat = sample_images(transformer.eval(), text_encoder.eval(), ["red digit 3"], [0], steps=3, guidance_scale=g)
        assert lat.shape == (1, 48, 8, 8) and torch.isfinite(lat).all()


def _trainer():
    name = "train_flux_testbed"
    if name not in sys.modules:  # a script, not a package module: load it by path
        sys.path.insert(0, str(ROOT / "tools"))
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "train_flux_testbed.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_trainer_checkpoints_and_resumes(tmp_path):
    """Two steps, a checkpoint, then one more step resumed from it equals three steps in one go."""
    tft = _trainer()
    cfg = tft.TrainConfig(steps=2, batch_size=4, minutes=5, prompt_dropout=0.0, shift=tft.TRAIN_SHIFT, warmup=2)
    tft.train(cfg, SMALL, tmp_path / "a", resume=False, checkpoint_every=2)
    assert (tmp_path / "a.checkpoint.pt").is_file()  # beside the model folder: the folder ships, this does not
    cfg3 = tft.TrainConfig(steps=3, batch_size=4, minutes=5, prompt_dropout=0.0, shift=tft.TRAIN_SHIFT, warmup=2)
    resumed, _, _, log = tft.train(cfg3, SMALL, tmp_path / "a", resume=True, checkpoint_every=0)
    straight, _, _, log3 = tft.train(cfg3, SMALL, tmp_path / "b", resume=False, checkpoint_every=0)
    assert log["steps_done"] == log3["steps_done"] == 3
    assert log["first_loss"] == log3["first_loss"]
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_velocity_call_matches_the_transformer_on_packed_tokens():
    """flux_velocity (what training and the reference sampler call) is FluxPipeline's call, unpacked."""
    from ertacache.models.flux import image_ids, pack_latents, unpack_latents

    transformer, text_encoder, _ = build_flux_tiny(0, SMALL)
    cond = PooledPromptEncoder(text_encoder).encode(["green digit 7"])
    x = torch.randn(1, 48, 8, 8)
    sigma = torch.tensor([0.7])
    want = transformer(hidden_states=pack_latents(x), timestep=sigma, encoder_hidden_states=cond["prompt_embeds"],
                       pooled_projections=cond["pooled_prompt_embeds"], img_ids=image_ids(4, 4),
                       txt_ids=torch.zeros(4, 3), return_dict=False)[0]
    assert torch.allclose(flux_velocity(transformer, x, sigma, cond), unpack_latents(want, 8, 8))
