"""The Go agent's flag values, read as Go reads them (strconv, time.ParseDuration) (pure).

Why its own module: `core.go_flags` maps the Go agent's flags onto ours; how
Go spells a bool, an octal int or `1h30m` is a separate job with its own
corner cases (`0x1p-2`, `_` separators, fractional durations), and both
the flag table and the argv readers use it.
"""

from __future__ import annotations

import enum
import re
from fractions import Fraction


class GoFlagError(ValueError):
    """An argument the Go agent itself would have refused (its `flag` package exits 2 on it)."""


class Kind(enum.Enum):
    STRING = "string"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    DURATION = "duration"


# -- Go's value syntax (strconv and time.ParseDuration) --------------------------------

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_go_bool(text: str) -> bool:
    """strconv.ParseBool: exactly these spellings, nothing else (not "yes", not "on")."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"invalid syntax {text!r} (Go booleans are 1, t, true, 0, f, false)")


_OCTAL = re.compile(r"[+-]?0[0-7_]+")


def parse_go_int(text: str) -> int:
    """strconv.ParseInt(s, 0, 64): decimal, 0x/0o/0b prefixes, and a leading 0 meaning octal."""
    if not text or text != text.strip():
        raise ValueError(f"invalid syntax {text!r}")
    try:
        value = int(text, 8) if _OCTAL.fullmatch(text) else int(text, 0)
    except ValueError:
        raise ValueError(f"invalid syntax {text!r}") from None
    if not -(1 << 63) <= value < (1 << 63):
        raise ValueError(f"value out of range {text!r}")
    return value


def parse_go_float(text: str) -> float:
    """strconv.ParseFloat(s, 64) for the forms a person writes (1, 0.8, .5, 1e-1, 0x1p-2, inf)."""
    if not text or text != text.strip() or "_" in text:
        raise ValueError(f"invalid syntax {text!r}")
    try:
        return float.fromhex(text) if "0x" in text.lower() else float(text)
    except ValueError:
        raise ValueError(f"invalid syntax {text!r}") from None


_NS_PER_UNIT = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9,
                "h": 3600 * 10**9}
_DURATION_PART = re.compile(r"(\d*)(?:\.(\d*))?([^\d.]*)")


def parse_go_duration(text: str) -> Fraction:
    """time.ParseDuration, in seconds: a sequence of numbers with units (`1h30m`, `1.5s`, `500ms`);
    a unit is required except for a lone `0`."""
    rest = text
    sign = 1
    if rest[:1] in ("+", "-"):
        sign, rest = (-1 if rest[0] == "-" else 1), rest[1:]
    if rest == "0":
        return Fraction(0)
    if not rest:
        raise ValueError(f"invalid duration {text!r}")
    total = Fraction(0)
    pos = 0
    while pos < len(rest):
        match = _DURATION_PART.match(rest, pos)
        whole, frac, unit = match.group(1), match.group(2), match.group(3)
        if not whole and not frac:
            raise ValueError(f"invalid duration {text!r}")
        if not unit:
            raise ValueError(f"missing unit in duration {text!r}")
        if unit not in _NS_PER_UNIT:
            raise ValueError(f"unknown unit {unit!r} in duration {text!r}")
        number = Fraction(int(whole or "0")) + (Fraction(int(frac), 10 ** len(frac)) if frac else 0)
        total += number * _NS_PER_UNIT[unit]
        pos = match.end()
    return sign * total / 10**9


def parse_value(kind: Kind, text: str) -> object:
    """The typed value of `text` for a flag of `kind`, as Go's flag package would set it."""
    if kind is Kind.STRING:
        return text
    if kind is Kind.INT:
        return parse_go_int(text)
    if kind is Kind.FLOAT:
        return parse_go_float(text)
    if kind is Kind.BOOL:
        return parse_go_bool(text)
    return parse_go_duration(text)


def seconds_text(value: Fraction) -> str:
    """Seconds as our flags take them: `120`, `0.5`."""
    return str(int(value)) if value.denominator == 1 else repr(float(value))
