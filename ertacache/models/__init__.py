"""Model knowledge as data: adapters (the pre/blocks/head split), recipes and loading."""

from ertacache.models.adapter import ModelAdapter, PreOutput, adapter_for, register_adapter
from ertacache.models.recipes import Recipe, available_models, load_recipe

__all__ = [
    "ModelAdapter",
    "PreOutput",
    "adapter_for",
    "register_adapter",
    "Recipe",
    "available_models",
    "load_recipe",
]
