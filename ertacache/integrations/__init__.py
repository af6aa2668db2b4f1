"""ERTACache inside other libraries' pipelines (diffusers)."""

from ertacache.integrations.wan_pipeline import disable_ertacache, enable_ertacache

__all__ = ["enable_ertacache", "disable_ertacache"]
