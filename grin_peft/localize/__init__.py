"""Localization: per-entry scores from data, and the sparse selection they drive."""
