"""The predictor's curvature default is recipe data: measured per testbed, set on the recipe it stands in for."""

import argparse

import pytest

from ertacache.cli.common import add_calibration_args, calibration_config
from ertacache.models.recipes import Defaults, load_recipe


@pytest.mark.parametrize("model, want", [("wan2.1-tiny", 0.5), ("wan2.1", 0.5), ("flux-tiny", 1.0),
                                         ("flux.1-dev", 1.0), ("wan2.2", 1.0)])
def test_the_recipe_sets_the_cli_default_and_a_flag_overrides_it(model, want):
    recipe = load_recipe(model)
    assert recipe.defaults.predictor_curvature == want
    parser = argparse.ArgumentParser()
    add_calibration_args(parser)
    config = calibration_config(parser.parse_args([]), None, 2.0, 1, recipe.defaults.predictor_curvature)
    assert config.predictor.kind == "taylor" and config.predictor.curvature == want
    config = calibration_config(parser.parse_args(["--predictor-curvature", "0.25"]), None, 2.0, 1,
                                recipe.defaults.predictor_curvature)
    assert config.predictor.curvature == 0.25


def test_a_recipe_curvature_out_of_range_is_refused():
    with pytest.raises(ValueError, match="predictor_curvature must be in"):
        Defaults(height=32, width=32, frames=4, steps=8, shift=3.0, guidance_scale=3.0, speedup=2.0,
                 predictor_curvature=2.0)


def test_a_profile_from_before_the_flag_counts_as_the_exact_polynomial():
    """check_calibration_flags_against reads a profile without ``curvature`` as c = 1 (what its weights are)."""
    from types import SimpleNamespace

    from ertacache.cli.common import check_calibration_flags_against
    from ertacache.errors import UserError

    parser = argparse.ArgumentParser()
    add_calibration_args(parser)
    old = SimpleNamespace(predictor={"kind": "taylor", "order": 2, "history": 3}, config={"loop": "closed"})
    check_calibration_flags_against(parser.parse_args(["--predictor-curvature", "1"]), old, "the profile P")
    with pytest.raises(UserError, match=r"--predictor-curvature 0.5 differs from the profile P, which was fitted "
                                        r"with --predictor-curvature 1.0"):
        check_calibration_flags_against(parser.parse_args(["--predictor-curvature", "0.5"]), old, "the profile P")
    linear = SimpleNamespace(predictor={"kind": "taylor", "order": 1, "history": 2}, config={"loop": "closed"})
    check_calibration_flags_against(parser.parse_args(["--predictor-curvature", "0.5"]), linear, "P")  # nothing to scale
