"""`spec.extraArgs` by allowlist: which engine options a stranger's spec may set, and how.

An InferenceService is written by someone with rights in one namespace, not
on the Mac. Its `extraArgs` go straight onto the engine's command line, and
llama-server has options that read any file (and serve its contents over the
unauthenticated `/props`), write anywhere, connect to other hosts or expose
control endpoints. A blocklist of them goes stale with every llama.cpp
release, so this is an allowlist: each engine has a table of every option its
pinned build accepts, each classified in a `Category` that either tunes the
model's behaviour with a plain value (allowed) or says why not (refused). An
option in neither is refused too, as unknown.

The check walks the tokens exactly as the engine's own parser will, so every
token the engine reads as an option is the one checked here:

* llama.cpp (`common/arg.cpp`): a token is looked up whole, after `_` -> `-`
  in `--` options, case-sensitively; `--opt=value` is *not* one of its
  spellings (it would stop the server), so we split it into two tokens
  (`normalized`), which makes `--temp=0.7` work as users expect. An option
  consumes exactly its arity in following tokens, whatever they look like
  (`--temp --rpc` gives `--temp` the value `--rpc`), so the arity in the
  table must be exact: a flag wrongly listed as taking a value would let its
  "value" be read as an option by llama-server unchecked.
* argparse (mlx_lm.server): also any unambiguous prefix of a long option, and
  `--opt=value`; a value may not start with `-` unless it is a number.

Values of allowed options must be plain (`ValueKind`): numbers, identifiers
and lists of them, or for a few options free text that the engine never
treats as a path (an inline grammar, JSON schema or chat template).

A Mac's owner (never a spec) may widen the table with `--allow-extra-arg`
(`SpecPolicy.extra_args`): the named option, in all its spellings, then
passes with any value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import Enum

EXTRA_ARG_REFUSED = "ExtraArgRefused"


class ValueKind(Enum):
    """What an allowed option's value may look like (checked) and how many tokens it takes."""

    NONE = "none"  # a switch: takes no value
    INT = "int"  # -?digits
    NUM = "num"  # an integer or decimal, optionally with an exponent
    WORD = "word"  # identifiers and lists of them: letters, digits, _ . : + , ; - (no /, no spaces)
    PATTERN = "pattern"  # printable, no whitespace and no '/': a tensor regex=buffer, KEY=TYPE:VALUE
    TEXT = "text"  # free text the engine never reads as a path (inline grammar, schema, template, message)
    TWO_INTS = "two-ints"  # two tokens, each an INT


_INT = re.compile(r"-?\d{1,18}")
_NUM = re.compile(r"-?(?:\d{1,18}(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?")
_WORD = re.compile(r"(?:-?\d|[A-Za-z0-9_.])[A-Za-z0-9_.:+,;-]{0,255}")
_PATTERN = re.compile(r"[!-.0-~]{1,1024}")  # printable ASCII without space and '/'
MAX_TEXT = 64 << 10


def plain_value(kind: ValueKind, value: str) -> bool:
    """Whether `value` is a plain value of `kind` (NONE never is: a switch takes no value)."""
    if kind in (ValueKind.INT, ValueKind.TWO_INTS):
        return _INT.fullmatch(value) is not None
    if kind is ValueKind.NUM:
        return _NUM.fullmatch(value) is not None
    if kind is ValueKind.WORD:
        return _WORD.fullmatch(value) is not None
    if kind is ValueKind.PATTERN:
        return _PATTERN.fullmatch(value) is not None
    if kind is ValueKind.TEXT:
        return 0 < len(value) <= MAX_TEXT
    return False


def arity(kind: ValueKind) -> int:
    return 0 if kind is ValueKind.NONE else 2 if kind is ValueKind.TWO_INTS else 1


@dataclass(frozen=True, slots=True)
class Category:
    """Why options are grouped: `allowed`, or refused with `why` (shown to the user).
    `security`: the option reaches beyond the model (files, hosts, endpoints, code)."""

    name: str
    allowed: bool
    why: str = ""
    security: bool = False


@dataclass(frozen=True, slots=True)
class Option:
    """One option of an engine: every spelling it accepts, its category, its value."""

    spellings: tuple[str, ...]
    category: Category
    value: ValueKind = ValueKind.NONE

    @property
    def name(self) -> str:
        """The spelling shown to users: the first long one."""
        return next((s for s in self.spellings if s.startswith("--")), self.spellings[0])


@dataclass(frozen=True, slots=True)
class OptionTable:
    """Every option one engine build accepts, and how its parser reads a command line."""

    engine: str
    options: tuple[Option, ...]
    argparse: bool = False  # prefixes of long options and --opt=value are options too (Python's argparse)
    _by_spelling: dict[str, Option] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Looked up for every extraArgs token of every reconcile: built once per table.
        object.__setattr__(self, "_by_spelling",
                           {spelling: option for option in self.options for spelling in option.spellings})

    @classmethod
    def from_rows(cls, engine: str, rows: tuple[tuple[str, Category, ValueKind], ...], *,
                  argparse: bool = False) -> OptionTable:
        """A table from rows of (space-separated spellings, category, value), as the engine modules list them."""
        return cls(engine, tuple(Option(tuple(spellings.split()), category, value) for spellings, category, value in rows),
                   argparse)

    def spellings(self) -> dict[str, Option]:
        return dict(self._by_spelling)

    def option(self, spelling: str) -> Option | None:
        """The option `spelling` names, as the engine's parser resolves it (None: it would refuse it)."""
        table = self._by_spelling
        if self.argparse:
            if spelling in table:
                return table[spelling]
            if spelling.startswith("--") and len(spelling) > 2:
                matches = {option for s, option in table.items() if s.startswith(spelling) and s.startswith("--")}
                return matches.pop() if len(matches) == 1 else None
            return None
        if spelling.startswith("--"):
            spelling = spelling.replace("_", "-")  # llama.cpp does this before its lookup
        return table.get(spelling)


@dataclass(frozen=True, slots=True)
class ExtraArgsPolicy:
    """What the Mac's owner allows beyond the table: option names (any spelling of the option)."""

    allowed: frozenset[str] = frozenset()

    def widens(self, option: Option | None, spelling: str) -> bool:
        names = {s.replace("_", "-") for s in (option.spellings if option else (spelling,))}
        return bool(names & {a.replace("_", "-") for a in self.allowed})


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refused extraArgs item: its index, and the sentence for the user."""

    index: int
    message: str
    security: bool = False  # an option that reaches beyond the model, or one nobody has classified


@dataclass(frozen=True, slots=True)
class Checked:
    """The verdict on a whole extraArgs list: the tokens to pass on, or what is refused."""

    tokens: tuple[str, ...]
    refusals: tuple[Refusal, ...] = ()


def _owner_hint(name: str) -> str:
    return f" (this Mac's owner can allow it with `metal-agent run --allow-extra-arg={name}`)"


def check_extra_args(table: OptionTable, args: tuple[str, ...] | list[str],
                     policy: ExtraArgsPolicy = ExtraArgsPolicy()) -> Checked:
    """Walk `args` as the engine's parser would and refuse every option or value not allowed.

    Returns the tokens to append to the command line: `--opt=value` becomes
    two tokens for llama.cpp, which has no `=` spelling.
    """
    out: list[str] = []
    refusals: list[Refusal] = []
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("-") or token in ("-", "--") or _INT.fullmatch(token) or _NUM.fullmatch(token):
            refusals.append(Refusal(i, f"{token!r} is not an option of {table.engine}: each extraArgs item is an"
                                       " option (e.g. --top-k) or the value right after an option that takes one"))
            i += 1
            continue
        spelling, inline = token, None
        if "=" in token and (table.argparse or token.startswith("--")):
            spelling, inline = token.split("=", 1)
        option = table.option(spelling)
        widened = policy.widens(option, spelling)
        name = option.name if option else spelling
        if option is None and not widened:
            refusals.append(Refusal(i, f"{spelling!r} is not an option this agent lets a spec set for"
                                       f" {table.engine} (extraArgs are allowlisted: sampling, batching, cache"
                                       f" and other options that tune the model with a plain value)"
                                       + _owner_hint(spelling), security=True))
            # Its value, if it has one, is not reported again as "not an option".
            i += 2 if inline is None and i + 1 < len(args) and not args[i + 1].startswith("-") else 1
            continue
        if option is not None and not option.category.allowed and not widened:
            shown = repr(spelling) if spelling == name else f"{spelling!r} ({table.engine} reads it as {name})"
            refusals.append(Refusal(i, f"{shown} is refused: {option.category.why}" + _owner_hint(name),
                                    security=option.category.security))
            i += 1 + (arity(option.value) if inline is None else 0)
            continue
        kind = option.value if option is not None else _guess_kind(args, i, inline)
        values: list[str] = []
        if inline is not None:
            if arity(kind) != 1:
                refusals.append(Refusal(i, f"{name} takes {'no value' if arity(kind) == 0 else 'two values'},"
                                           f" so {token!r} cannot be read"))
                i += 1
                continue
            values = [inline]
        else:
            values = list(args[i + 1:i + 1 + arity(kind)])
            if len(values) < arity(kind):
                refusals.append(Refusal(i, f"{name} needs a value after it"))
                i += 1 + len(values)
                continue
        bad = next((v for v in values if not widened and not _value_ok(table, kind, v)), None)
        if bad is not None:
            refusals.append(Refusal(i, f"{bad!r} is not a plain {_KIND_TEXT[kind]} for {name}"))
        if inline is None:
            out += [token, *values]
        else:
            out += [token] if table.argparse else [spelling, inline]
        i += 1 + (0 if inline is not None else len(values))
    return Checked(tuple(out), tuple(refusals))


def _value_ok(table: OptionTable, kind: ValueKind, value: str) -> bool:
    if not plain_value(kind, value):
        return False
    # argparse would read a value that starts with '-' (and is not a number) as an option.
    return not (table.argparse and value.startswith("-") and not _NUM.fullmatch(value))


def _guess_kind(args, i: int, inline: str | None) -> ValueKind:
    """An owner-allowed option the table does not know: it takes the next token if that is no option."""
    if inline is not None:
        return ValueKind.TEXT
    following = args[i + 1] if i + 1 < len(args) else None
    if following is not None and (not following.startswith("-") or _NUM.fullmatch(following)):
        return ValueKind.TEXT
    return ValueKind.NONE


_KIND_TEXT = {
    ValueKind.INT: "integer", ValueKind.TWO_INTS: "integer", ValueKind.NUM: "number",
    ValueKind.WORD: "identifier (letters, digits, _ . : + , ; -; no paths or spaces)",
    ValueKind.PATTERN: "pattern (no spaces, no '/')", ValueKind.TEXT: "text", ValueKind.NONE: "value",
}


def with_checked_args(spec, tokens: tuple[str, ...]):
    """`spec` (an InferenceServiceSpec) with its extraArgs as they go on the command line."""
    return spec if tuple(spec.extra_args) == tokens else replace(spec, extra_args=tokens)
