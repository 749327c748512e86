"""Module-name patterns read from a config, guarded against catastrophic backtracking before PEFT matches them.

A GrinConfig's ``target_modules``, ``exclude_modules`` and ``layers_pattern`` may be regexes, and configs come from
downloaded files; PEFT runs these patterns against every module name, so one that could hang matching is refused
when the config is built.
"""

from __future__ import annotations

from typing import Any

from .errors import GrinError

# Limits on module-name regexes read from a config: Python's backtracking `re` needs exponential time on nested
# quantifiers such as "(.*.*)*X", and polynomial time of high degree on long chains of unbounded repeats.
MAX_PATTERN_LENGTH = 512
MAX_UNBOUNDED_REPEATS = 4


def _sre():
    """The regex parser and its constants (`re._parser` from Python 3.11, `sre_parse` before)."""
    try:
        from re import _constants, _parser
    except ImportError:  # Python 3.10
        import sre_constants as _constants
        import sre_parse as _parser
    return _parser, _constants


def _count_repeats(parsed, nested: bool = False) -> int:
    """Unbounded repeats in a parsed regex; raises GrinError on a repeat inside a repeat (catastrophic
    backtracking)."""
    constants = _sre()[1]
    count = 0
    for op, arg in parsed:
        if op in (constants.MAX_REPEAT, constants.MIN_REPEAT, getattr(constants, "POSSESSIVE_REPEAT", None)):
            low, high, sub = arg
            unbounded = high == constants.MAXREPEAT or high > 64
            if nested and high > 1:
                raise GrinError("a repeated group contains another repeat")
            count += int(unbounded) + _count_repeats(sub, nested or high > 1)
        elif op == constants.SUBPATTERN:
            count += _count_repeats(arg[-1], nested)
        elif op == constants.BRANCH:
            if nested:
                raise GrinError("a repeated group contains alternatives")
            count += sum(_count_repeats(branch, nested) for branch in arg[1])
        elif op in (constants.ASSERT, constants.ASSERT_NOT):
            count += _count_repeats(arg[1], nested)
    return count


def check_module_pattern(field_name: str, pattern: str) -> None:
    """Refuse a module-name regex that could hang matching: too long, a repeat nested in a repeat, or too many
    unbounded repeats. Configs come from downloaded files, and PEFT runs these patterns against every module name."""
    parser = _sre()[0]
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise GrinError(
            f"GrinConfig.{field_name}: a pattern of {len(pattern)} characters (at most {MAX_PATTERN_LENGTH})."
        )
    try:
        parsed = parser.parse(pattern)
        repeats = _count_repeats(parsed)
    except GrinError as exc:
        raise GrinError(
            f"GrinConfig.{field_name}={pattern!r}: {exc}, which can take exponential time to match; refused."
        ) from None
    except Exception as exc:  # re.error, RecursionError on absurd nesting
        raise GrinError(f"GrinConfig.{field_name}={pattern!r} is not a valid regular expression: {exc}") from None
    if repeats > MAX_UNBOUNDED_REPEATS:
        raise GrinError(
            f"GrinConfig.{field_name}={pattern!r} has {repeats} unbounded repeats (at most "
            f"{MAX_UNBOUNDED_REPEATS}); refused, it can take very long to match."
        )


def _validate_module_patterns(config: Any) -> None:  # a GrinConfig: config imports this module, not the reverse
    """Types of the module-selection fields, and every string PEFT will use as a regex checked for safety."""
    for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
        value = getattr(config, name)
        if value is None:
            continue
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, set, tuple)) or not all(isinstance(item, str) for item in items):
            raise GrinError(f"GrinConfig.{name}={value!r} must be a string or a list of strings.")
        if name == "layers_pattern" or (isinstance(value, str) and name in ("target_modules", "exclude_modules")):
            for item in items:
                check_module_pattern(name, item)
        elif name in ("target_modules", "exclude_modules", "modules_to_save"):
            for item in items:
                if len(item) > MAX_PATTERN_LENGTH:
                    raise GrinError(f"GrinConfig.{name}: a module name of {len(item)} characters.")
    layers = config.layers_to_transform
    if layers is not None:
        items = [layers] if isinstance(layers, int) else layers
        if not isinstance(items, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
        ):
            raise GrinError(f"GrinConfig.layers_to_transform={layers!r} must be a layer index or a list of them.")
