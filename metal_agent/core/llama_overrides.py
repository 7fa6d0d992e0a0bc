"""`tensorOverrides` and `metadataOverrides` as llama-server reads them (pure).

Checked in the pinned build 11434 (`common/arg.cpp`, `common/common.cpp`):

* Both options accumulate: every occurrence's handler appends to the same
  list. But the argument parser logs "DEPRECATED: argument ... specified
  multiple times, use comma-separated values instead (only last value will
  be used)" for any repeated option but `--spec-type` (`parse_cli_args`), so
  the agent says each option once, its items joined with commas.
* `--override-kv` splits its value with `parse_csv_row`: a field that starts
  with `"` is quoted (commas inside it are kept, `""` is one `"`). So an item
  holding a comma (a `str:` value) or a quote is sent quoted, and every
  metadata override can be said. `string_parse_kv_override` then takes the
  key up to the first `=` (under 128 bytes), a type of int, float, bool
  or str, `bool:` only `true`/`false`, a `str:` value of at most 127
  bytes; `int:`/`float:` go through `atol`/`atof`, which read `abc` as 0
  without a word, so they must be numbers.
* `--override-tensor` splits its value with a plain `string_split(',')` (no
  quoting) and each item at its first `=`: a pattern holding a comma or an
  `=` cannot be said at all, so it is refused.
"""

from __future__ import annotations

import re

#: `string_parse_kv_override`'s limits, in bytes: the key and a `str:` value are copied into char[128] each.
KV_KEY_MAX = 127
KV_STR_MAX = 127

_KV = re.compile(r"([^=\s]+)=(int|float|bool|str):(.*)", re.DOTALL)
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|infinity|nan)", re.IGNORECASE)
INT64 = 2**63


def kv_override_problem(item: str) -> str | None:
    """Why llama-server would not read `item` as the metadata override it says (None: it would)."""
    found = _KV.fullmatch(item)
    if found is None:
        return "is not a metadata override of the form key=type:value (type one of int, float, bool, str)"
    key, kind, value = found.groups()
    if len(key.encode()) > KV_KEY_MAX:
        return f"key is {len(key.encode())} bytes long; llama-server takes at most {KV_KEY_MAX}"
    if kind == "int" and not _INT.fullmatch(value):
        return f"int value {value!r} is not an integer (llama-server would read it as {_leading(value, _INT)})"
    if kind == "int" and not -INT64 <= int(value) < INT64:
        return f"int value {value} does not fit in 64 bits"
    if kind == "float" and not _FLOAT.fullmatch(value):
        return f"float value {value!r} is not a number (llama-server would read it as {_leading(value, _FLOAT)})"
    if kind == "bool" and value not in ("true", "false"):
        return f"bool value {value!r} must be true or false"
    if kind == "str" and len(value.encode()) > KV_STR_MAX:
        return f"str value is {len(value.encode())} bytes long; llama-server takes at most {KV_STR_MAX}"
    return None


def _leading(value: str, number: re.Pattern[str]) -> str:
    found = number.match(value.lstrip())
    return found.group(0) if found else "0"


def tensor_override_problem(item: str) -> str | None:
    """Why `item` cannot be said to llama-server as one tensor override (None: it can)."""
    pattern, sep, target = item.partition("=")
    if not sep or not pattern.strip() or not target.strip():
        return "is not a tensor override of the form <tensor pattern>=<buffer type>"
    if "," in item:
        return ("contains a comma, which llama-server's --override-tensor always reads as a separator between "
                "overrides (write the pattern without one, e.g. a character class or alternation)")
    if "=" in target:
        return "contains a second '='; llama-server splits at the first one, so the pattern cannot hold '='"
    return None


def kv_overrides_value(items: tuple[str, ...]) -> str:
    """One `--override-kv` value for every item, each quoted as `parse_csv_row` reads it when it must be."""
    return ",".join(_csv_field(item) for item in items)


def tensor_overrides_value(items: tuple[str, ...]) -> str:
    """One `--override-tensor` value for every item (validation refused items holding a comma)."""
    return ",".join(items)


def _csv_field(item: str) -> str:
    if "," in item or '"' in item:
        return '"' + item.replace('"', '""') + '"'
    return item
