"""The argument checks every layer shares, each written once: integers, numbers, token ids, seeds.

An integer is an `numbers.Integral` that is not a bool (numpy and 0-d torch integers included); a
float that happens to be whole is not one, except where a file format writes integers as floats
(`as_int(..., whole_floats=True)`, for config.json)."""
from __future__ import annotations

import math
import numbers
import operator

SEED_RANGE = (0, 2**32)  # every seed: generation, training (its data order), the command line


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def as_int(name: str, value, *, whole_floats: bool = False) -> int:
    """`value` as an int, or a ValueError naming `name`. int(True) or int(2.7) would silently be another value."""
    if whole_floats and isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def as_float(name: str, value, *, finite: bool = False) -> float:
    """A real number (not a bool) as a float, or a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)) and not hasattr(value, "__float__"):
        raise ValueError(f"{name}={value!r} must be a number")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number") from None
    if finite and not math.isfinite(out):
        raise ValueError(f"{name}={value!r} must be a finite number")
    return out


def is_token_id(t, vocab_size: int | None = None) -> bool:
    return is_int(t) and t >= 0 and (vocab_size is None or t < vocab_size)


def as_token_id(t, vocab_size: int | None = None) -> int:
    """A token id as an int; a TypeError for what is no integer (a str, a bool, 1.5), a ValueError out of range."""
    if not is_int(t):
        raise TypeError(f"{t!r} is not a token id (an integer)")
    if not is_token_id(t, vocab_size):
        raise ValueError(f"token id {t} is out of range [0, {vocab_size if vocab_size else 'vocab_size'})")
    return int(t)


def as_seed(seed, name: str = "seed") -> int:
    """An integer seed in SEED_RANGE (numpy and 0-d tensor integers too); int(1.5) or int("3") would
    quietly pick another seed."""
    try:
        if isinstance(seed, bool):
            raise TypeError
        value = operator.index(seed)
    except TypeError:
        raise TypeError(f"{name}={seed!r}: expected an integer (got {type(seed).__name__})") from None
    if not SEED_RANGE[0] <= value < SEED_RANGE[1]:
        raise ValueError(f"{name}={value} is out of range: a seed is an integer in [0, 2**32)")
    return value
