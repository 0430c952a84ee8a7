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


# ---- plain numbers and float settings ----------------------------------------------------------
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32: below it float32 rounds towards 0
FLOAT32_MAX = 3.4028234663852886e38  # above it float32 is inf


def plain_number(value):
    """A numpy scalar or a 0-d torch tensor holding a real number -> the Python int / float it holds;
    anything else (bools included) is returned unchanged, for the caller's check to refuse by name."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if getattr(value, "ndim", None) == 0 or isinstance(value, numbers.Real):
        dtype = str(getattr(value, "dtype", ""))
        if "bool" in dtype or "complex" in dtype:
            return value
        try:
            item = value.item() if hasattr(value, "item") else value
        except (TypeError, ValueError, RuntimeError):
            return value
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            return item
    return value


def float_setting(name: str, value, low: float = -math.inf, high: float = math.inf, *,
                  low_open: bool = False, high_open: bool = False, normal: bool = False,
                  allowed: str = "") -> float:
    """The one rule for every float setting (sampling controls, training settings): a real number
    (numpy / 0-d torch scalars included, bools not), not NaN, within float32's range (the settings are
    used in float32 tensors, where a value above 3.4e38 is inf), inside [low, high] (or the open ends).
    normal=True for a setting that divides or scales (temperature, a learning rate): unless it is 0 it
    must also be a normal float32, since float32 holds 1e-40 as a subnormal and 1e-46 as 0 (a division
    by it is inf, a scale by it erases). Elsewhere (a probability cut) float32's rounding towards 0 is
    the setting's own limit. -0.0 is 0.0. `allowed` says the domain in words ("must be in (0, 1]").
    Returns the float; a ValueError naming `name` otherwise."""
    if not allowed:
        allowed = f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    v = plain_number(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name}={value!r} is out of range: must be a number")
    v = float(v) + 0.0  # -0.0 -> 0.0
    if math.isnan(v):
        raise ValueError(f"{name}={value!r} is out of range: {allowed} (NaN is no number)")
    if math.isinf(v):
        raise ValueError(f"{name}={value!r} is out of range: must be a finite number; {allowed}")
    if abs(v) > FLOAT32_MAX or normal and 0 < abs(v) < FLOAT32_TINY:
        becomes = "inf" if abs(v) > FLOAT32_MAX else "0 or a subnormal"
        raise ValueError(f"{name}={value!r} is out of range: float32 would hold it as {becomes}; a nonzero value "
                         f"must lie within 1.2e-38 <= |x| <= 3.4e38; {allowed}")
    if (v <= low if low_open else v < low) or (v >= high if high_open else v > high):
        raise ValueError(f"{name}={value!r} is out of range: {allowed}")
    return v


# ---- one setting said two ways -------------------------------------------------------------------
class SettingConflict(ValueError):
    """One setting given twice with different values; `first` / `second` are (how it was spelled, value)."""

    def __init__(self, key: str, first: tuple, second: tuple):
        self.key, self.first, self.second = key, first, second
        super().__init__(f"{second[0]} and {first[0]} disagree: give one of them")


def merge_settings(sources) -> dict:
    """The one rule for a setting that can be said two ways (a flag and a --set, --controls and
    --max-new-tokens, max_length and max_new_tokens, a key twice in one control string): the sources,
    in order, as (spelling, {key: value}); a key given by two of them must have one value, else
    SettingConflict names both spellings. spelling: a format string with {key} and {value}, or a
    callable (key, value) -> str. Returns the merged settings."""
    merged, spelled = {}, {}
    for spelling, values in sources:
        for key, value in values.items():
            text = spelling(key, value) if callable(spelling) else spelling.format(key=key, value=value)
            if key in merged and not _same_value(merged[key], value):
                raise SettingConflict(key, (spelled[key], merged[key]), (text, value))
            merged[key], spelled[key] = value, text
    return merged


def _same_value(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b or is_int(a) and is_int(b) and a == b or \
        isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool) and a == b or \
        isinstance(b, float) and isinstance(a, (int, float)) and not isinstance(a, bool) and a == b
