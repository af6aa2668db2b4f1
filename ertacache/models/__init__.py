"""Model knowledge as data: families (ertacache.models.family), adapters (the pre/blocks/head split), recipes and loading.

The names below load on first use (PEP 562), so that reading a recipe (what the CLIs do to
write their --help) does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "ModelAdapter": "ertacache.models.adapter",
    "PreOutput": "ertacache.models.adapter",
    "adapter_for": "ertacache.models.adapter",
    "register_adapter": "ertacache.models.adapter",
    "LatentLayout": "ertacache.models.family",
    "ModelFamily": "ertacache.models.family",
    "SigmaSchedule": "ertacache.models.family",
    "family_for_model": "ertacache.models.family",
    "family_named": "ertacache.models.family",
    "register_family": "ertacache.models.family",
    "Recipe": "ertacache.models.recipes",
    "available_models": "ertacache.models.recipes",
    "load_recipe": "ertacache.models.recipes",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
