"""GBNF for JSON numbers, exact for integer and decimal ranges (``minimum`` / ``maximum``, exclusive or not).

A range is written digit by digit: the numbers of one length between two bounds
are a prefix shared by both, then a choice of the first differing digit, the
classic range-to-regex construction. Fractions compare as digit strings padded
with zeros. Bounded numbers are written in plain decimal notation (no
exponent); unbounded integer parts stop at 16 digits and fractions at 20, so a
small model cannot run away with digits (llama.cpp's converter caps them too).
"""

from __future__ import annotations

from decimal import Decimal
from typing import overload

__all__ = ["integer_range", "number_range", "MAX_INT_DIGITS", "MAX_FRACTION_DIGITS", "NUMBER", "INTEGER"]

MAX_INT_DIGITS = 16
MAX_FRACTION_DIGITS = 20
_TAIL = f"[0-9]{{0,{MAX_FRACTION_DIGITS - 1}}}"  # the free digits after a decided one
_ANY_FRACTION = (f"[0-9]{{1,{MAX_FRACTION_DIGITS}}}", True)
_ZEROS = f'"0"{{1,{MAX_FRACTION_DIGITS}}}'  # a zero fraction, bounded like every other (no run of zeros)

# A fraction language: (GBNF for its non-empty digit strings or None, whether "no fraction" (= 0) belongs).
Fraction = tuple["str | None", bool]


def _group(alternatives: list[str]) -> str:
    alternatives = [a for a in alternatives if a]
    if len(alternatives) <= 1:
        return alternatives[0] if alternatives else ""
    return "(" + " | ".join(alternatives) + ")"


def _digit_class(lo: int, hi: int) -> str:
    return f'"{lo}"' if lo == hi else f"[{lo}-{hi}]"


def _same_length(a: str, b: str) -> str:
    """Digit strings s with len(s) == len(a) == len(b) and a <= s <= b."""
    if a == b:
        return f'"{a}"' if a else ""
    if a[0] == b[0]:
        return f'"{a[0]}" {_same_length(a[1:], b[1:])}'
    rest = len(a) - 1
    low_full, high_full = a[1:] == "0" * rest, b[1:] == "9" * rest
    first, last = int(a[0]) + (not low_full), int(b[0]) - (not high_full)
    alternatives = []
    if not low_full:
        alternatives.append(f'"{a[0]}" {_same_length(a[1:], "9" * rest)}')
    if first <= last:
        alternatives.append(_digit_class(first, last) + (f" [0-9]{{{rest}}}" if rest > 1 else " [0-9]" if rest else ""))
    if not high_full:
        alternatives.append(f'"{b[0]}" {_same_length("0" * rest, b[1:])}')
    return _group(alternatives)


def _natural_range(lo: int, hi: int | None) -> str | None:
    """Non-negative integers in [lo, hi] without leading zeros; hi None: up to MAX_INT_DIGITS digits."""
    if hi is not None and hi < lo:
        return None
    top = len(str(hi)) if hi is not None else max(MAX_INT_DIGITS, len(str(lo)))
    alternatives = []
    for length in range(len(str(lo)), top + 1):
        first = max(lo, 10 ** (length - 1) if length > 1 else 0)
        if hi is None and first == 10 ** (length - 1) and length > 1:  # every longer number: one alternative
            alternatives.append(f"[1-9] [0-9]{{{length - 1},{top - 1}}}" if length < top else f"[1-9] [0-9]{{{top - 1}}}")
            break
        last = 10 ** length - 1 if hi is None else min(hi, 10 ** length - 1)
        if first <= last:
            alternatives.append(_same_length(str(first), str(last)))
    return _group(alternatives)


@overload
def integer_range(lo: None = None, hi: None = None) -> str: ...  # an unbounded range is never empty


@overload
def integer_range(lo: int | None = None, hi: int | None = None) -> str | None: ...


def integer_range(lo: int | None = None, hi: int | None = None) -> str | None:
    """GBNF for the JSON integers in [lo, hi] (None: unbounded); None when the range is empty."""
    if lo is not None and hi is not None and hi < lo:
        return None
    alternatives = []
    if lo is None or lo < 0:
        magnitude = _natural_range(max(1, -hi) if hi is not None and hi < 0 else 1, None if lo is None else -lo)
        if magnitude:
            alternatives.append(f'"-" {magnitude}')
    if hi is None or hi >= 0:
        alternatives.append(_natural_range(max(lo or 0, 0), hi) or "")
    return _group(alternatives) or None


# -- fractions: digit strings f read as 0.f -------------------------------------------------------


def _then(digit: str, rest: Fraction) -> str | None:
    """``digit`` followed by a fraction language (its empty member meaning: nothing more)."""
    expression, empty_ok = rest
    if expression is None:
        return f'"{digit}"' if empty_ok else None
    return f'"{digit}" ({expression})?' if empty_ok else f'"{digit}" {expression}'


def _fraction(alternatives: list[str | None], empty_ok: bool) -> Fraction:
    present = [a for a in alternatives if a]
    return (_group(present) if present else None), empty_ok


def _at_least(g: str, strict: bool) -> Fraction:
    """f >= g (f > g when strict); g has no trailing zeros."""
    if not g:
        return (f'"0"{{0,{MAX_FRACTION_DIGITS - 1}}} [1-9] ' + _TAIL, False) if strict else _ANY_FRACTION
    digit = int(g[0])
    higher = f"{_digit_class(digit + 1, 9)} {_TAIL}" if digit < 9 else None
    return _fraction([higher, _then(g[0], _at_least(g[1:], strict))], False)


def _at_most(h: str, strict: bool) -> Fraction:
    """f <= h (f < h when strict); h has no trailing zeros."""
    if not h:
        return (None, False) if strict else (_ZEROS, True)
    digit = int(h[0])
    lower = f"{_digit_class(0, digit - 1)} {_TAIL}" if digit > 0 else None
    return _fraction([lower, _then(h[0], _at_most(h[1:], strict))], True)


def _between(g: str, h: str, g_strict: bool, h_strict: bool) -> Fraction:
    """g <= f <= h (each bound strict or not), for g <= h."""
    if not h:  # h is 0: only f == 0, if both bounds allow it
        return (_ZEROS, True) if not (g or g_strict or h_strict) else (None, False)
    if not g and not g_strict:
        return _at_most(h, h_strict)
    g_digit, h_digit = (g or "0")[0], h[0]
    if g_digit == h_digit:
        return _fraction([_then(g_digit, _between(g[1:], h[1:], g_strict, h_strict))], False)
    middle = f"{_digit_class(int(g_digit) + 1, int(h_digit) - 1)} {_TAIL}" if int(h_digit) - int(g_digit) > 1 else None
    return _fraction([_then(g_digit, _at_least(g[1:], g_strict)), middle, _then(h_digit, _at_most(h[1:], h_strict))], False)


def _split(value: Decimal) -> tuple[int, str]:
    whole, _, fraction = format(value, "f").partition(".")
    return int(whole), fraction.rstrip("0")


def _with_fraction(whole: str | None, fraction: Fraction) -> str | None:
    expression, empty_ok = fraction
    if whole is None or (expression is None and not empty_ok):
        return None
    if expression is None:
        return whole
    return f'{whole} ("." {expression})?' if empty_ok else f'{whole} "." {expression}'


def _magnitude(lo: Decimal, hi: Decimal | None, lo_strict: bool, hi_strict: bool) -> str | None:
    """Non-negative decimals in the range, in plain notation."""
    a, g = _split(lo)
    if hi is None:
        return _group([_with_fraction(f'"{a}"', _at_least(g, lo_strict)) or "",
                       _with_fraction(_natural_range(a + 1, None), _ANY_FRACTION) or ""]) or None
    if hi < lo or (hi == lo and (lo_strict or hi_strict)):
        return None
    b, h = _split(hi)
    if a == b:
        return _with_fraction(f'"{a}"', _between(g, h, lo_strict, hi_strict))
    return _group([_with_fraction(f'"{a}"', _at_least(g, lo_strict)) or "",
                   _with_fraction(_natural_range(a + 1, b - 1), _ANY_FRACTION) or "",
                   _with_fraction(f'"{b}"', _at_most(h, hi_strict)) or ""]) or None


def number_range(lo: Decimal | None, hi: Decimal | None, lo_strict: bool = False, hi_strict: bool = False) -> str | None:
    """GBNF for the JSON numbers in the range, in plain decimal notation; None when it is empty."""
    zero = Decimal(0)
    alternatives = []
    if hi is None or hi >= zero:  # written without a sign
        start, start_strict = (zero, False) if lo is None or lo < zero else (lo, lo_strict)
        alternatives.append(_magnitude(start, hi, start_strict, hi_strict) or "")
    if lo is None or lo <= zero:  # written with "-": the magnitude is -value
        start, start_strict = (zero, False) if hi is None or hi > zero else (-hi, hi_strict)
        magnitude = _magnitude(start, None if lo is None else -lo, start_strict, lo_strict)
        if magnitude:
            alternatives.append(f'"-" {magnitude}')
    return _group(alternatives) or None


INTEGER = integer_range()
NUMBER = f'"-"? {_natural_range(0, None)} ("." [0-9]{{1,{MAX_FRACTION_DIGITS}}})? ([eE] [-+]? [0-9]{{1,4}})?'
