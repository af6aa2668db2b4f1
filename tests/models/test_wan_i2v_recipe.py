"""The Wan2.1 I2V ids (`wan2.1-i2v`, `wan2.1-i2v-720p`): a diffusers-format folder loads, the image path equals
WanImageToVideoPipeline's own, and the CLIs take ``--image``.

The folder is written by ``WanImageToVideoPipeline.save_pretrained`` with tiny random components (UMT5 and a
word-level tokenizer, a CLIP vision tower and its processor, the I2V transformer, AutoencoderKLWan), so
the family's loaders run the real transformers/diffusers classes.
"""

import numpy as np
import pytest
import torch

from ertacache.errors import ModelNotFoundError, UserError
from ertacache.models.images import load_image, sample_images
from ertacache.models.loading import load_bundle
from ertacache.models.recipes import load_recipe
from ertacache.sampling.settings import SampleSettings
from tests.conftest import tiny_umt5
from tests.models.test_wan_i2v import tiny_clip_vision, tiny_wan_i2v, tiny_wan_vae

SIZE, FRAMES = 32, 5


def write_i2v_folder(path):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    tokenizer, text_encoder = tiny_umt5("a cat walks on the grass camera pans slowly".split())
    vision, processor = tiny_clip_vision()
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, image_encoder=vision,
                                   image_processor=processor, transformer=tiny_wan_i2v(), vae=tiny_wan_vae(),
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def i2v_folder(tmp_path_factory):
    return write_i2v_folder(tmp_path_factory.mktemp("wan-i2v") / "folder")


@pytest.fixture(scope="module")
def i2v_bundle(i2v_folder):
    return load_bundle("wan2.1-i2v", i2v_folder, dtype="fp32")


def test_the_image_path_equals_the_pipelines(i2v_folder, i2v_bundle):
    """CLIP states (penultimate layer) and the condition latents (mask + normalised mode of the VAE) as
    WanImageToVideoPipeline makes them, for two different images at once."""
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    assert i2v_bundle.family.name == "wan-i2v" and i2v_bundle.image_encoder is not None
    assert i2v_bundle.image_encoder.vae is i2v_bundle.decoder.vae  # one VAE in memory, not a second copy
    pipe = WanImageToVideoPipeline.from_pretrained(i2v_folder)
    images = sample_images(2, size=48)
    ours = i2v_bundle.image_encoder.encode(images, SIZE, SIZE, FRAMES)
    for k, image in enumerate(images):
        pil = Image.fromarray(image)
        with torch.no_grad():
            embeds = pipe.encode_image(pil, torch.device("cpu"))
            pixels = pipe.video_processor.preprocess(pil, height=SIZE, width=SIZE).float()
            _, condition = pipe.prepare_latents(pixels, 1, 4, SIZE, SIZE, FRAMES, torch.float32, torch.device("cpu"),
                                                None, torch.zeros(1, 4, 2, 4, 4))
        torch.testing.assert_close(ours["image_embeds"][k : k + 1], embeds, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours["image_latents"][k : k + 1], condition, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours["image_latents"][0], ours["image_latents"][1])


def test_encode_demands_one_image_per_prompt_and_samples(i2v_bundle):
    from ertacache.generation import generate

    settings = SampleSettings.from_recipe(i2v_bundle.recipe, height=SIZE, width=SIZE, frames=FRAMES, steps=3)
    with pytest.raises(UserError, match="image-to-video: give one conditioning image per prompt"):
        i2v_bundle.encode(["a cat walks"], "", 2)
    cond = i2v_bundle.encode(["a cat walks"], "", 2, sample_images(1), (FRAMES, SIZE, SIZE))
    assert list(cond) == ["text_embeds", "image_embeds", "image_latents"]
    assert cond["text_embeds"].shape == (2, 512, 16) and cond["image_latents"].shape == (1, 8, 2, 4, 4)
    result = generate(i2v_bundle, ["a cat walks"], [0], settings, None, images=sample_images(1))
    assert result.frames.shape == (1, FRAMES, SIZE, SIZE, 3)
    other = generate(i2v_bundle, ["a cat walks"], [0], settings, None, images=sample_images(1, offset=1))
    assert not torch.equal(result.latents, other.latents)  # the image conditions the video


def test_sample_images_are_distinct_deterministic_and_shaped_like_the_video():
    from ertacache.models.images import SAMPLE_CROPS

    a, b = sample_images(SAMPLE_CROPS + 2), sample_images(SAMPLE_CROPS + 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len({x.tobytes() for x in a[:SAMPLE_CROPS]}) == SAMPLE_CROPS  # then the walk repeats
    assert np.array_equal(a[SAMPLE_CROPS], a[0]) and a[0].shape == (256, 256, 3) and a[0].dtype == np.uint8
    held_out = sample_images(SAMPLE_CROPS, held_out=True)
    seen = {x.tobytes() for x in a}
    assert not any(x.tobytes() in seen for x in held_out)  # mirrored: never a calibration image
    wide = sample_images(3, size=60, aspect=832 / 480)
    assert wide[0].shape == (60, 104, 3)  # the video's aspect: no stretching when resized to 480 x 832


def test_generate_takes_image_and_refuses_it_where_it_does_not_apply(i2v_folder, tmp_path, capsys):
    from PIL import Image

    from ertacache.cli import generate as generate_cli

    Image.fromarray(sample_images(1, size=40)[0]).save(tmp_path / "first.png")
    base = ["--model", "wan2.1-i2v", "--model-path", str(i2v_folder), "--dtype", "fp32", "--height", str(SIZE),
            "--width", str(SIZE), "--frames", str(FRAMES), "--steps", "2", "--prompt", "the camera pans slowly"]
    assert generate_cli.main([*base, "--image", str(tmp_path / "first.png"), "--out", str(tmp_path / "v.gif")]) == 0
    assert (tmp_path / "v.gif").stat().st_size > 0
    capsys.readouterr()
    for args, match in (([], "image-to-video: give the conditioning image with --image FILE"),
                        (["--image", str(tmp_path / "missing.png")], "missing.png does not exist or is not a file"),
                        (["--image", str(tmp_path)], "is not a file; give a PNG or JPEG image")):
        assert generate_cli.main([*base, *args, "--out", str(tmp_path / "bad.gif")]) == 2
        assert match in capsys.readouterr().err
    (tmp_path / "text.png").write_text("not an image")
    assert generate_cli.main([*base, "--image", str(tmp_path / "text.png"), "--out", str(tmp_path / "bad.gif")]) == 2
    assert "is not an image PIL can read" in capsys.readouterr().err
    rc = generate_cli.main(["--model", "wan2.1-tiny", "--prompt", "digit 1 moving up", "--image",
                            str(tmp_path / "first.png"), "--out", str(tmp_path / "bad.gif")])
    assert rc == 2 and "takes no --image" in capsys.readouterr().err
    assert not (tmp_path / "bad.gif").exists()


def test_a_folder_of_the_other_wan_family_is_refused_when_it_loads(i2v_folder):
    """An I2V folder given to the text-to-video id (or the reverse) stops right after the transformer loads."""
    with pytest.raises(UserError, match="is a 'wan-i2v' model .* --model wan2.1 expects the 'wan' family"):
        load_bundle("wan2.1", i2v_folder, dtype="fp32")


def test_load_image_reads_rgb(tmp_path):
    from PIL import Image

    Image.new("L", (7, 5), 128).save(tmp_path / "grey.png")
    image = load_image(tmp_path / "grey.png")
    assert image.shape == (5, 7, 3) and image.dtype == np.uint8 and (image == 128).all()


def test_the_recipes_and_offline_message(monkeypatch, tmp_path):
    assert load_recipe("wan2.1-i2v").family == "wan-i2v"
    hd = SampleSettings.from_recipe(load_recipe("wan2.1-i2v-720p"))
    assert (hd.height, hd.width, hd.frames, hd.shift) == (720, 1280, 81, 5.0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for model_id, hub in (("wan2.1-i2v", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"),
                          ("wan2.1-i2v-720p", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers")):
        with pytest.raises(ModelNotFoundError, match=f"hf download {hub} --local-dir"):
            load_bundle(model_id)
