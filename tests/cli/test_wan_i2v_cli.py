"""Wan2.1 I2V through the command lines: profile (the built-in sample images), ONNX export, run with --prompt
and --image, equal to the eager cached sampler on the same conditioning.

A tiny random diffusers-format I2V folder (tests/models/test_wan_i2v_recipe.py) stands in for the 14B
checkpoint.
"""

import numpy as np
import pytest
import torch

from ertacache.cli import profile as profile_cli
from ertacache.cli import run as run_cli

pytestmark = pytest.mark.slow  # the export fixture, profiles and runs: ~20 s on 2 cores

SIZE = ["--height", "32", "--width", "32", "--frames", "5", "--steps", "8"]


@pytest.fixture(scope="module")
def i2v_export(i2v_folder_export):
    """(root, model folder): root holds the export (out/) and first.png, as the session fixture wrote them."""
    assert i2v_folder_export.out.parent == i2v_folder_export.image.parent
    return i2v_folder_export.out.parent, i2v_folder_export.folder


def test_profile_calibrates_an_i2v_model_on_the_sample_photographs(i2v_export, tmp_path):
    from ertacache.profile.artifact import load_profile

    _, folder = i2v_export
    model = ["--model", "wan2.1-i2v", "--model-path", str(folder), "--dtype", "fp32", "--quiet"]
    assert profile_cli.main([*model, *SIZE, "--out", str(tmp_path / "profile")]) == 0
    with_image = [*model, *SIZE, "--image", str(i2v_export[0] / "first.png"), "--out", str(tmp_path / "p2")]
    assert profile_cli.main(with_image) == 0
    a, b = load_profile(tmp_path / "profile"), load_profile(tmp_path / "p2")
    assert a.steps == b.steps == 8 and a.full_steps < 8
    assert not torch.equal(a.corr_a, b.corr_a)  # the calibration images matter


def test_the_folder_samples_prompt_and_image_like_the_eager_sampler(i2v_export):
    from ertacache.contract import load_manifest
    from ertacache.export.runners import relative_l2
    from ertacache.models.images import load_image
    from ertacache.models.loading import load_bundle
    from ertacache.profile.artifact import load_profile
    from ertacache.runtime import Runtime
    from ertacache.runtime.inputs import noise_for, text_embeds_from_prompt
    from ertacache.sampling import CachedSampler

    root, folder = i2v_export
    manifest = load_manifest(root / "out")
    assert manifest.conditioning == ("text_embeds", "image_embeds", "image_latents")
    profile = load_profile(root / "out" / "profile")
    assert profile.calibration["prompts"]  # calibrated on the recipe's prompts with the sample photographs
    bundle = load_bundle("wan2.1-i2v", folder, dtype="fp32")
    cond = text_embeds_from_prompt("a cat walks", manifest, str(folder), image=str(root / "first.png"))
    want = bundle.encode(["a cat walks"], "", 2, [load_image(root / "first.png")], (5, 32, 32))
    for name in manifest.conditioning:
        torch.testing.assert_close(cond[name], want[name], rtol=0, atol=0)
    with Runtime(root / "out", "onnxruntime") as rt:
        noise = noise_for(rt.manifest, 3)
        got = rt.sample(noise, cond).clone()
    with torch.no_grad():
        ref = CachedSampler(bundle.adapter, profile.tables(), profile.mask)(noise, want, profile.guidance_scale).latents
    assert relative_l2(got, ref) < 1e-4


def test_run_takes_image_with_prompt(i2v_export, tmp_path, capsys):
    root, _ = i2v_export
    base = ["--engines", str(root / "out"), "--prompt", "a cat walks", "--seed", "1"]
    assert run_cli.main([*base, "--image", str(root / "first.png"), "--out", str(tmp_path / "v.gif")]) == 0
    capsys.readouterr()
    assert run_cli.main([*base, "--out", str(tmp_path / "bad.gif")]) == 2
    assert "image-to-video: give the conditioning image with --image FILE" in capsys.readouterr().err
    np.savez(tmp_path / "e.npz", text_embeds=np.zeros((2, 512, 16), np.float32))
    rc = run_cli.main(["--engines", str(root / "out"), "--text-embeds", str(tmp_path / "e.npz"), "--image",
                       str(root / "first.png"), "--out", str(tmp_path / "bad.gif")])
    assert rc == 2 and "--image goes with --prompt" in capsys.readouterr().err
    assert not (tmp_path / "bad.gif").exists()


def test_the_triton_model_takes_prompt_and_image(i2v_export, tmp_path):
    """The repository bundles the text and image encoders; the model instance (the code Triton runs, here without
    the server) takes 'prompt' + 'image' and answers what the direct runtime gives for the same inputs."""
    from ertacache.models.images import load_image
    from ertacache.runtime import Runtime
    from ertacache.runtime.inputs import noise_for, text_embeds_from_prompt
    from ertacache.serving import RepositoryConfig, write_repository
    from ertacache.serving.instance import ModelInstance, RequestError

    root, folder = i2v_export
    report = write_repository(RepositoryConfig(engines=root / "out", repo=tmp_path / "repo", name="i2v",
                                               model_path=folder))
    names = [t.name for t in report.io.inputs]
    assert names[:2] == ["prompt", "image"] and report.io.input("image").dims == (-1, -1, 3)
    bundled = report.model_dir / "1" / "text_encoder"
    assert all((bundled / sub).is_dir() for sub in ("image_encoder", "image_processor", "vae"))
    image = load_image(root / "first.png")
    with ModelInstance(report.model_dir / "1", report.model_config) as inst:
        got = inst.handle({"seed": np.array([4]), "prompt": np.array([b"a cat walks"], object), "image": image})
        with pytest.raises(RequestError, match="takes 'image'.*together with 'prompt'"):
            inst.handle({"seed": np.array([4]), "prompt": np.array([b"a cat walks"], object)})
        with pytest.raises(RequestError, match="UINT8 \\[H, W, 3\\]"):
            inst.handle({"seed": np.array([4]), "prompt": np.array([b"a cat walks"], object),
                         "image": image.astype(np.float32)})
    cond = text_embeds_from_prompt("a cat walks", load_manifest_of(root), str(folder), image=str(root / "first.png"))
    with Runtime(root / "out", "onnxruntime") as rt:
        rt.sample(noise_for(rt.manifest, 4), cond)
        want = rt.decode().numpy()
    np.testing.assert_array_equal(got["frames"], want)


def load_manifest_of(root):
    from ertacache.contract import load_manifest

    return load_manifest(root / "out")


def test_image_flags_are_checked_before_the_engines_load(i2v_export, tmp_path, capsys, monkeypatch):
    """A missing --image for an I2V folder, --image without --prompt, and an unreadable file are refused before
    the Runtime is built (the engines are never opened)."""
    import ertacache.runtime

    root, _ = i2v_export

    def no_runtime(*a, **k):
        raise AssertionError("the engines were opened before the flags were checked")

    monkeypatch.setattr(ertacache.runtime, "Runtime", no_runtime)
    (tmp_path / "text.png").write_text("not an image")
    base = ["--engines", str(root / "out"), "--out", str(tmp_path / "v.gif")]
    for args, match in ((["--prompt", "a cat"], "image-to-video: give the conditioning image"),
                        (["--prompt", "a cat", "--image", str(tmp_path / "text.png")], "is not an image PIL can read")):
        assert run_cli.main([*base, *args]) == 2
        assert match in capsys.readouterr().err
