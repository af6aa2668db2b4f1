"""Regression guard on the shipped flux-tiny: it loads from the package by id and still draws what prompts ask for.

Everything that does not need the trained weights is tested on a random-weights folder in
test_flux_tiny_toolchain.py.
"""

import json

import pytest

from ertacache.models.loading import load_bundle
from ertacache.models.recipes import load_recipe
from ertacache.testbed.flux_tiny import FLUX_TINY_DIR, FLUX_TINY_ID, sample_images
from ertacache.testbed.image_judge import ATTRIBUTES, attribute_accuracy

pytestmark = pytest.mark.skipif(
    not (FLUX_TINY_DIR / "testbed.json").exists(),
    reason="flux-tiny weights not in this checkout: run `python tools/train_flux_testbed.py` (docs/testbed.md)",
)

#: 40 samples here against the 80 of the shipped evaluation: room for sampling noise and another
#: machine's floating-point order (the guard is for breakage, not for a percent)
SLACK = 0.15
SIZE_LIMIT = 30 * 2**20  # 7.2 M parameters in fp32: 27 MiB


@pytest.fixture(scope="module")
def facts():
    return json.loads((FLUX_TINY_DIR / "testbed.json").read_text())


def test_folder_is_small_and_facts_complete(facts):
    size = sum(p.stat().st_size for p in FLUX_TINY_DIR.rglob("*") if p.is_file())
    assert size <= SIZE_LIMIT, f"{size / 2**20:.1f} MiB shipped"
    assert not list(FLUX_TINY_DIR.rglob("*.pt"))  # the trainer's resume state lives beside the folder, not in it
    held = facts["eval"]["held_out"]
    assert held["samples"] >= 40 and all(f"{a}_accuracy" in held for a in ATTRIBUTES)
    assert all(held[f"{a}_accuracy"] >= 0.8 for a in ATTRIBUTES), held  # the bar, as measured at training
    assert facts["training"]["train_seconds"] <= 3600  # trained in at most an hour (as recorded, not timed here)


def test_loads_from_the_package_by_id_with_the_recipe_defaults(facts):
    bundle = load_bundle(FLUX_TINY_ID)
    assert bundle.path.resolve() == FLUX_TINY_DIR.resolve()
    d = load_recipe(FLUX_TINY_ID).defaults
    assert (d.height, d.width, d.steps, d.guidance_scale) == (facts["height"], facts["width"],
                                                              facts["recommended_steps"], facts["guidance_scale"])
    assert list(bundle.latent_shape(None, d.height, d.width)) == facts["latent_shape"]


@pytest.mark.slow
def test_held_out_samples_keep_the_shipped_accuracy(facts):
    """40 of the shipped evaluation's held-out prompts and seeds, 50 steps, uncached, through the package's loader."""
    n = 40
    prompts, seeds = facts["eval"]["held_out_prompts"][:n], facts["eval"]["held_out_seeds"][:n]
    bundle = load_bundle(FLUX_TINY_ID)
    lat = sample_images(bundle.transformer, bundle.prompt_encoder.text_encoder, prompts, seeds,
                        guidance_scale=facts["guidance_scale"])
    frames = bundle.decoder.decode(lat).numpy()  # (n, 1, H, W, 3)
    acc = attribute_accuracy(frames, prompts)
    shipped = facts["eval"]["held_out"]
    low = {a: (round(acc[a], 3), shipped[f"{a}_accuracy"]) for a in ATTRIBUTES
           if acc[a] < shipped[f"{a}_accuracy"] - SLACK}
    assert not low, f"accuracy now vs shipped, below shipped - {SLACK}: {low}"
