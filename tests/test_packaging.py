"""The distribution ships every subpackage and recipe, and the console scripts resolve."""

import importlib
import pathlib
import tomllib

import ertacache
from ertacache.models.recipes import DEFAULT_MODEL, available_models, load_recipe

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_subpackage_on_disk_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "ertacache").rglob("__init__.py")
    }
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_recipes_are_installed_and_valid():
    models = available_models()
    assert {"wan2.1", "wan2.1-14b", DEFAULT_MODEL} <= set(models)
    for m in models:
        r = load_recipe(m)
        assert r.model == m
        assert r.defaults.steps >= 2 and r.calibration_prompts


def test_console_scripts_resolve():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))
    assert ertacache.__version__
