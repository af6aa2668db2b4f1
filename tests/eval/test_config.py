import pytest

from ertacache.errors import UserError
from ertacache.eval.config import (
    ALL_METHODS, BASELINES, ERTA_METHODS, EvalConfig, MagCacheConfig, TeaCacheConfig, erta_flags, full_step_budget,
    parse_methods,
)
from ertacache.eval.methods import registered_methods
from ertacache.profile.config import CalibrationConfig


def test_method_groups_and_order():
    assert parse_methods("all") == ALL_METHODS
    assert parse_methods("baselines") == BASELINES
    assert parse_methods("uniform, erta,uniform") == ("uniform", *ERTA_METHODS)
    assert erta_flags("erta-closed-policy") == ("closed", False, False)
    assert erta_flags("erta-open-time") == ("open", True, False)
    assert erta_flags("erta-closed-full") == ("closed", True, True)


@pytest.mark.parametrize("spec, match", [("nope", "unknown method 'nope'"), (" , ", "--methods is empty")])
def test_bad_methods_say_what_exists(spec, match):
    with pytest.raises(UserError, match=match):
        parse_methods(spec)


def test_every_method_has_a_builder():
    assert set(registered_methods()) == set(ALL_METHODS)


def test_budget_is_the_profile_rule():
    for steps in (10, 50):
        for s in (1.5, 2.0, 2.5, 3.0):
            assert full_step_budget(steps, s) == CalibrationConfig(speedup=s).target_full_steps(steps)
    assert [full_step_budget(50, s) for s in (1.5, 2, 2.5, 3)] == [33, 25, 20, 17]


def _cfg(**kw):
    base = dict(speedups=(2.0,), methods=("uniform",), calibration_prompts=["a"], held_out_prompts=["b"],
                held_out_seeds=[1000])
    base.update(kw)
    return EvalConfig(**base)


@pytest.mark.parametrize("kw, match", [
    (dict(speedups=(1.0,)), "must be > 1"),
    (dict(speedups=()), "--speedups is empty"),
    (dict(held_out_seeds=[1000, 1001]), "one seed per prompt"),
    (dict(held_out_seeds=[0]), "are calibration seeds"),
    (dict(batch_size=0), "batch sizes"),
])
def test_eval_config_refuses_bad_values(kw, match):
    with pytest.raises(UserError, match=match):
        _cfg(**kw)


def test_baseline_configs_validate():
    with pytest.raises(UserError, match="max_skip"):
        MagCacheConfig(max_skip=0)
    with pytest.raises(UserError, match="retention_ratio"):
        MagCacheConfig(retention_ratio=1.0)
    with pytest.raises(UserError, match="poly_degree"):
        TeaCacheConfig(poly_degree=0)
