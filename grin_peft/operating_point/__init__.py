"""The automatic operating point: a forget target and a retain floor, and the controller that trains until both hold.

:class:`OperatingPoint` (:mod:`.point`) says what "forgotten" and "kept" mean; :func:`search` (:mod:`.search`) finds a
learning rate, trains under watch and keeps the best evaluated state, by the rules in its module docstring.
"""

from .point import OperatingPoint, split_heldout
from .search import SELECTION_RULE, search

__all__ = ["SELECTION_RULE", "OperatingPoint", "search", "split_heldout"]
