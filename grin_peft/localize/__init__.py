"""Localization: per-entry scores from data, and the sparse selection they drive."""

from .pipeline import compute_scores, localize
from .report import LocalizationReport

__all__ = ["LocalizationReport", "compute_scores", "localize"]
