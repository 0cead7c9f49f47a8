"""fgm.measures: every complexity measure of Appendix D, registered by family."""

from .registry import REGISTRY, MeasureSpec, list_measures, measure

__all__ = ["REGISTRY", "MeasureSpec", "list_measures", "measure"]
