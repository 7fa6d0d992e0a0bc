"""Read the fields of one raw object (a dict from the API server or a YAML file), collecting every problem.

Separate from the per-kind parsers (`core.model_validation`, `core.isvc_validation`)
because both kinds read fields the same way, and the rules of that reading are the
agent's promises about bad input:

* Every check appends to one error list and parsing carries on with a
  harmless placeholder, so a manifest with five mistakes yields five errors.
* `null` is reported as a wrong type wherever we read a field. The API
  server prunes nulls before we see an object, so a null only ever comes
  from a hand-written manifest, where it usually means a forgotten value.
* `bool` is rejected where an integer belongs (Python's `True == 1` would
  otherwise turn `replicas: true` into one replica).
* No characters that cannot travel in an argv element (NUL), and no line
  breaks where a value ends up in a log line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any, TypeVar

from metal_agent.core.result import FieldError

E = TypeVar("E", bound=StrEnum)

INT32_MAX = 2**31 - 1

# Plain non-negative decimals: what a human writes for a proportion or
# factor, and nothing llama-server's `stof` would read differently
# (no exponents, no hex, no inf/nan).
DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


class _Missing:
    """Marks a key that is absent (as opposed to present with value null)."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


def describe(value: Any) -> str:
    """A short, safe rendering of an offending value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f"string {text!r}"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


class Reader:
    """Reads fields of one object, collecting every problem with its path."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name
        self.errors: list[FieldError] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message, self.kind, self.name))

    # -- structure ----------------------------------------------------------

    def get(self, obj: Mapping[str, Any] | None, key: str) -> Any:
        if obj is None:
            return MISSING
        return obj.get(key, MISSING)

    def mapping(
        self, obj: Mapping[str, Any] | None, key: str, path: str, *, required: bool = False
    ) -> Mapping[str, Any] | None:
        value = self.get(obj, key)
        if value is MISSING:
            if required:
                self.error(path, "required")
            return None
        if not isinstance(value, Mapping):
            self.error(path, f"expected an object, got {describe(value)}")
            return None
        return value

    # -- scalars ------------------------------------------------------------

    def integer(
        self,
        obj: Mapping[str, Any] | None,
        key: str,
        path: str,
        *,
        default: int,
        minimum: int | None = None,
        maximum: int = INT32_MAX,
    ) -> int:
        value = self.get(obj, key)
        if value is MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, f"expected an integer, got {describe(value)}")
            return default
        if minimum is not None and value < minimum:
            self.error(path, f"must be at least {minimum}, got {value}")
            return default
        if value > maximum:
            self.error(path, f"must be at most {maximum}, got {value}")
            return default
        return value

    def optional_integer(
        self,
        obj: Mapping[str, Any] | None,
        key: str,
        path: str,
        *,
        minimum: int | None = None,
        maximum: int = INT32_MAX,
    ) -> int | None:
        if self.get(obj, key) is MISSING:
            return None
        before = len(self.errors)
        value = self.integer(obj, key, path, default=0, minimum=minimum, maximum=maximum)
        return value if len(self.errors) == before else None

    def boolean(self, obj: Mapping[str, Any] | None, key: str, path: str, *, default: bool) -> bool:
        value = self.get(obj, key)
        if value is MISSING:
            return default
        if not isinstance(value, bool):
            self.error(path, f"expected true or false, got {describe(value)}")
            return default
        return value

    def optional_boolean(self, obj: Mapping[str, Any] | None, key: str, path: str) -> bool | None:
        """A boolean whose absence means something of its own (None), not false."""
        if self.get(obj, key) is MISSING:
            return None
        before = len(self.errors)
        value = self.boolean(obj, key, path, default=False)
        return value if len(self.errors) == before else None

    def string(
        self,
        obj: Mapping[str, Any] | None,
        key: str,
        path: str,
        *,
        required: bool = False,
        allow_newlines: bool = True,
    ) -> str | None:
        """A string, or None when absent; empty strings are returned as ""."""
        value = self.get(obj, key)
        if value is MISSING:
            if required:
                self.error(path, "required")
            return None
        if not isinstance(value, str):
            self.error(path, f"expected a string, got {describe(value)}")
            return None
        if not self.argv_safe(value, path, allow_newlines=allow_newlines):
            return None
        return value

    def argv_safe(self, value: str, path: str, *, allow_newlines: bool) -> bool:
        """NUL cannot be passed to exec at all; newlines smuggle lines into logs."""
        if "\x00" in value:
            self.error(path, "must not contain a NUL character")
            return False
        if not allow_newlines and ("\n" in value or "\r" in value):
            self.error(path, "must not contain a line break")
            return False
        return True

    def enum(
        self,
        obj: Mapping[str, Any] | None,
        key: str,
        path: str,
        enum: type[E],
        *,
        default: E | None,
        empty_is_unset: bool = True,
    ) -> E | None:
        value = self.get(obj, key)
        if value is MISSING or (empty_is_unset and value == ""):
            return default
        allowed = ", ".join(member.value for member in enum)
        if not isinstance(value, str):
            self.error(path, f"expected one of {allowed}; got {describe(value)}")
            return default
        try:
            return enum(value)
        except ValueError:
            self.error(path, f"unsupported value {value!r}; expected one of {allowed}")
            return default

    def string_list(
        self,
        obj: Mapping[str, Any] | None,
        key: str,
        path: str,
        *,
        item_check: Callable[[str, str], None] | None = None,
    ) -> tuple[str, ...]:
        value = self.get(obj, key)
        if value is MISSING:
            return ()
        if not isinstance(value, list | tuple):
            self.error(path, f"expected a list of strings, got {describe(value)}")
            return ()
        items: list[str] = []
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            if not isinstance(item, str):
                self.error(item_path, f"expected a string, got {describe(item)}")
                continue
            if not self.argv_safe(item, item_path, allow_newlines=False):
                continue
            if item_check is not None:
                item_check(item, item_path)
            items.append(item)
        return tuple(items)

