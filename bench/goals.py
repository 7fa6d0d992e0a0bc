"""A bench's figures against its goals, and an exit status that says whether they were met.

A goal that is only printed is one nobody checks: a bench run by CI or by a
release script must fail when a figure misses. Each bench builds `Figure`s
(what was measured, as shown, and the goal as a predicate) and ends with
`sys.exit(report(figures))`: the table, then every missed goal, and exit 1
if there was one. A figure with no goal ("-") is shown and never fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Figure:
    name: str
    shown: str  # the measured value as printed
    goal: str = "-"  # the goal as printed
    met: bool | None = None  # None: no goal


def at_most(name: str, value: float | None, limit: float, shown: str | None = None, goal: str | None = None) -> Figure:
    """A figure whose goal is `value <= limit`; a value that could not be measured misses it."""
    text = shown if shown is not None else ("not measured" if value is None else f"{value:g}")
    return Figure(name, text, goal or f"<= {limit:g}", value is not None and value <= limit)


def shown_only(name: str, shown: object) -> Figure:
    return Figure(name, str(shown))


def check(name: str, shown: str, goal: str, met: bool) -> Figure:
    return Figure(name, shown, goal, met)


def table(figures: Sequence[Figure]) -> str:
    head = ("figure", "measured", "goal", "")
    rows = [(f.name, f.shown, f.goal, {True: "met", False: "MISSED", None: ""}[f.met]) for f in figures]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])


def report(figures: Sequence[Figure], printer: Callable[[str], None] = print) -> int:
    """Print the figures and the missed goals; 1 if any goal was missed, else 0."""
    printer(table(figures))
    missed = [f for f in figures if f.met is False]
    for f in missed:
        printer(f"MISSED: {f.name}: {f.shown} (goal {f.goal})")
    return 1 if missed else 0
