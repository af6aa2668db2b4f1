import time

import pytest
import torch

from ertacache.errors import ModelNotFoundError, UserError
from ertacache.models.loading import fingerprint_module, load_bundle
from ertacache.models.recipes import load_recipe


def test_wan_folder_written_by_save_pretrained_loads_through_the_real_path(tiny_wan_folder):
    bundle = load_bundle("wan2.1", model_path=tiny_wan_folder)
    assert type(bundle.transformer).__name__ == "WanTransformer3DModel"
    assert bundle.decoder.spatial_factor == 8 and bundle.decoder.temporal_factor == 4
    assert bundle.latent_shape(frames=5, height=32, width=48) == (4, 2, 4, 6)
    emb = bundle.encode(["a cat walks on the grass"], negative_prompt="", n_branches=2)
    assert emb.shape == (2, 512, 16)
    assert torch.all(emb[0, 7:] == 0)  # states past the prompt's 6 tokens (+ eos) are zeroed like WanPipeline
    frames = bundle.decoder.decode(torch.randn(1, 4, 2, 4, 6))
    assert frames.dtype == torch.uint8 and frames.shape == (1, 5, 32, 48, 3)


def test_fingerprint_is_about_weights_not_precision(tiny_wan_folder):
    fp32 = load_bundle("wan2.1", model_path=tiny_wan_folder, dtype="fp32")
    bf16 = load_bundle("wan2.1", model_path=tiny_wan_folder, dtype="bf16")
    assert fp32.fingerprint == bf16.fingerprint
    with torch.no_grad():
        fp32.transformer.proj_out.weight[0, 0] += 1.0
    assert fingerprint_module(fp32.transformer) != bf16.fingerprint


def test_offline_with_nothing_local_fails_at_once_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        load_bundle("wan2.1")
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in msg and "--model-path" in msg and "download" in msg


def test_bad_model_path_and_unknown_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_bundle("wan2.1", model_path=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="missing transformer/config.json"):
        load_bundle("wan2.1", model_path=tmp_path / "empty")
    with pytest.raises(UserError, match="unknown model id 'wan9'"):
        load_bundle("wan9")


def test_14b_recipe_points_at_the_14b_checkpoint():
    assert load_recipe("wan2.1-14b").hub_id == "Wan-AI/Wan2.1-T2V-14B-Diffusers"


@pytest.mark.parametrize("shape, match", [((5, 36, 32), "multiples of 16"), ((4, 32, 32), "4\\*k \\+ 1")])
def test_shapes_that_do_not_fit_the_vae_and_patch_are_refused(tiny_wan_folder, shape, match):
    bundle = load_bundle("wan2.1", model_path=tiny_wan_folder)
    with pytest.raises(UserError, match=match):
        bundle.latent_shape(*shape)


def _tiny_profile(fingerprint: str):
    from ertacache.profile.artifact import Profile
    from ertacache.sampling.sigmas import nominal_sigmas

    steps = 4
    sig = nominal_sigmas(steps, 3.0).tolist()
    return Profile(
        model="wan2.1-tiny", model_fingerprint=fingerprint, steps=steps, shift=3.0, height=32, width=32, frames=5,
        latent_shape=[4, 2, 4, 4], guidance_scale=4.0, n_branches=2, lam=0.1, mask=[True, False, True, True],
        nominal_sigmas=sig, sigmas=sig, phi=[1.0] * steps, corr_a=torch.zeros(steps, 2, 4),
        corr_b=torch.zeros(steps, 2, 4), config={}, calibration={}, stats={}, speedup_target=None,
    )


def test_a_profile_of_the_shipped_model_moves_with_its_weights_not_its_folder(tmp_path):
    """Same weights in another folder (a copy, a wheel install, a trailing slash): same id; other weights: refused."""
    import shutil

    from diffusers import WanTransformer3DModel

    from ertacache.errors import ProfileError
    from ertacache.integrations import enable_ertacache
    from ertacache.profile.artifact import load_profile

    shipped = load_bundle("wan2.1-tiny")
    _tiny_profile(shipped.fingerprint).save(tmp_path / "profile")
    profile = load_profile(tmp_path / "profile")

    copy = tmp_path / "elsewhere" / "my-tiny"
    shutil.copytree(shipped.path, copy)
    for path in (copy, f"{copy}/"):
        moved = load_bundle("wan2.1-tiny", model_path=path)
        assert moved.path != shipped.path
        assert moved.fingerprint == shipped.fingerprint
        profile.check_matches(model=moved.model_id, fingerprint=moved.fingerprint)
    # a transformer loaded by hand, as the diffusers-native API does
    by_hand = WanTransformer3DModel.from_pretrained(copy, subfolder="transformer")
    assert fingerprint_module(by_hand) == shipped.fingerprint

    class Pipe:  # the two attributes enable_ertacache reads
        transformer, scheduler = by_hand, None

    enable_ertacache(Pipe(), profile)

    with torch.no_grad():
        by_hand.proj_out.weight.mul_(1.01)
    by_hand.save_pretrained(copy / "transformer")
    other = load_bundle("wan2.1-tiny", model_path=copy)
    assert other.fingerprint != shipped.fingerprint
    with pytest.raises(ProfileError) as err:
        profile.check_matches(model=other.model_id, fingerprint=other.fingerprint, where="profile P")
    msg = str(err.value)
    assert shipped.fingerprint in msg and other.fingerprint in msg and "flag" not in msg
