import pytest

from ertacache.errors import UserError
from ertacache.eval.config import (
    ALL_METHODS, BASELINES, BUILTIN_METHODS, ERTA_METHODS, PEER_METHODS, EvalConfig, PeerConfig, TeaCacheConfig,
    erta_flags, full_step_budget, method_label, parse_methods,
)
from ertacache.eval.methods import registered_methods
from ertacache.profile.config import CalibrationConfig


def test_method_groups_and_order():
    assert parse_methods("all") == ALL_METHODS
    assert parse_methods("baselines") == BASELINES
    assert parse_methods("builtin") == BUILTIN_METHODS and parse_methods("peers") == PEER_METHODS
    assert ALL_METHODS == BUILTIN_METHODS + PEER_METHODS and "magcache" not in ALL_METHODS  # diffusers has it
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


def test_every_row_is_labelled_by_implementation():
    assert method_label("teacache") == "ertacache (hand-written) TeaCache-style"
    assert method_label("erta-closed-full") == "ertacache ERTACache closed-loop full"
    import diffusers

    assert method_label("diffusers-taylorseer-o2") == f"diffusers {diffusers.__version__} TaylorSeer o2"


def test_baseline_configs_validate():
    with pytest.raises(UserError, match="max_skip_steps"):
        PeerConfig(magcache_max_skip=0)
    with pytest.raises(UserError, match="retention"):
        PeerConfig(magcache_retention=1.0)
    with pytest.raises(UserError, match="max_probes"):
        PeerConfig(max_probes=1)
    with pytest.raises(UserError, match="poly_degree"):
        TeaCacheConfig(poly_degree=0)
