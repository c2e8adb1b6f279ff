"""Token counts as people write them, in Python as on the command line: ``200_000``, ``"200k"``, ``"2M"``."""

from __future__ import annotations

import argparse
import numbers

from .dataclass_args import parse_count

__all__ = ["as_count"]


def as_count(value, name: str = "tokens") -> int:
    """``value`` as an ``int``: an integer (Python, NumPy), an integral float (``2e5``) or a string with an
    optional ``k`` / ``M`` / ``G`` suffix (``"200k"`` -> 200_000, ``"2M"`` -> 2_000_000, ``"1.5k"`` -> 1500).

    Raises:
        TypeError: ``value`` is a bool or of another type; ``ValueError``: a string or float that is not a
            whole count. Both name ``name`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise TypeError(f"{name} must be a count like 200_000, '200k' or '2M', got {value!r} "
                        f"({type(value).__name__})")
    if isinstance(value, str):
        try:
            return parse_count(value)
        except argparse.ArgumentTypeError:
            raise ValueError(f"{name} must be a count like 200_000, '200k' or '2M', got {value!r}") from None
    if isinstance(value, numbers.Integral):
        return int(value)
    if float(value).is_integer():
        return int(value)
    raise ValueError(f"{name} must be a whole number of tokens, got {value!r}")
