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
