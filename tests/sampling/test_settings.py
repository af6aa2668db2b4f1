"""SampleSettings ask the model family: guidance mode, branches, frames only for video."""

import pytest

import ertacache.models.family as family_mod
from ertacache.errors import UserError
from ertacache.models.family import EMBEDDED, NO_GUIDANCE, register_family
from ertacache.models.recipes import Defaults, Recipe, load_recipe
from ertacache.sampling.settings import SampleSettings
from tests.models.test_family import a_family


@pytest.fixture
def image_family(monkeypatch):
    """Register a made-up image family for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(family_mod, "_FAMILIES", dict(family_mod._FAMILIES))
    monkeypatch.setattr(family_mod, "_BY_CLASS", dict(family_mod._BY_CLASS))

    def make(guidance):
        register_family(a_family(guidance=guidance))
        return Recipe("image-model", "test-image", Defaults(height=64, width=64, frames=None, steps=4, shift=1.0,
                                                           guidance_scale=3.5, speedup=2.0), hub_id="x/y")
    return make


def test_wan_settings_are_cfg_with_two_branches_above_scale_1():
    settings = SampleSettings.from_recipe(load_recipe("wan2.1-tiny"))
    assert (settings.guidance, settings.n_branches, settings.frames) == ("cfg", 2, 4)
    assert SampleSettings.from_recipe(load_recipe("wan2.1-tiny"), guidance_scale=1.0).n_branches == 1


def test_an_image_family_takes_no_frames(image_family):
    recipe = image_family(EMBEDDED)
    settings = SampleSettings.from_recipe(recipe)
    assert (settings.frames, settings.guidance, settings.n_branches) == (None, EMBEDDED, 1)
    with pytest.raises(UserError, match="image-model generates images: --frames applies to video models only"):
        SampleSettings.from_recipe(recipe, frames=5)


def test_a_guidance_free_family_refuses_a_guidance_scale(image_family):
    recipe = image_family(NO_GUIDANCE)
    with pytest.raises(UserError, match="takes no guidance.*drop --guidance-scale"):
        SampleSettings.from_recipe(recipe)  # the recipe's 3.5 default is itself refused
    assert SampleSettings.from_recipe(recipe, guidance_scale=0.0).n_branches == 1
