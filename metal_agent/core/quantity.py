"""Kubernetes resource quantities ("48Gi", "1.5G", "512M", "1e9").

`Model.spec.hardware.memoryBudget` is a quantity; the agent needs it in bytes
to compare against the Mac's memory. We parse it ourselves, exactly and
without floats, because the grammar is small and pulling in the Kubernetes
client here would break the rule that the core imports nothing with I/O.
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal, InvalidOperation

_QUANTITY = re.compile(
    r"""
    ^(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))
    (?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$
    """,
    re.VERBOSE,
)

_MULTIPLIERS: dict[str, Decimal] = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}

# Generous ceiling so an absurd exponent cannot make Decimal work hard.
_MAX_EXPONENT = 30


def parse_quantity(text: str) -> Decimal | None:
    """The quantity's value (bytes, for memory), or None if `text` is not a quantity."""
    match = _QUANTITY.match(text)
    if match is None:
        return None
    suffix = match.group("suffix") or ""
    try:
        number = Decimal(match.group("number"))
        if suffix[:1] in ("e", "E"):
            exponent = int(suffix[1:])
            if abs(exponent) > _MAX_EXPONENT:
                return None
            return number.scaleb(exponent)
        return number * _MULTIPLIERS[suffix]
    except (InvalidOperation, ValueError):
        return None


def quantity_to_bytes(text: str) -> int | None:
    """Whole bytes, rounded up like Kubernetes' `Value()`; None if not a quantity."""
    value = parse_quantity(text)
    if value is None:
        return None
    return int(value.to_integral_value(rounding=ROUND_CEILING))
