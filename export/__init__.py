"""Per-model export recipes: data files, one JSON per model id.

This folder is installed as ``ertacache.recipes`` (see pyproject.toml), so the
CLIs find the recipes in a wheel install as well as in a source checkout.
Adding a model means adding a JSON file here (and, for a new model family,
a family entry and an adapter in ertacache/models/: docs/families.md).
"""
