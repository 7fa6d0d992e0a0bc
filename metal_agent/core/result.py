"""Outcome types shared by the parsers: a value, or every problem found.

Why result values instead of exceptions: objects come from a cluster we do
not control, and one bad field must turn into a status message for that one
service, never into a crash of the agent. Returning `Invalid` with *all*
problems (not only the first) lets a user fix a manifest in one round trip.
An exception escaping a parser is therefore always a bug.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem, located by the JSON path of the field that has it.

    `kind` and `name` say which object the path belongs to, so errors of a
    Model and of the InferenceService using it can travel in one list and
    still be printed unambiguously ("Model default/qwen: spec.sha256: ...").
    `reason` marks a refusal by the owner's policy (`core.spec_policy`), which
    status reports under its own reason; `security` says the refused thing
    could reach beyond the model, so a process the agent did not start itself
    is stopped rather than adopted.
    """

    path: str
    message: str
    kind: str = ""
    name: str = ""
    reason: str = ""  # a status reason of its own (e.g. ExtraArgRefused); "" is the generic InvalidSpec
    security: bool = False  # serving it could reach beyond the model (a file, a host, an endpoint)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"

    def describe(self) -> str:
        """The error prefixed by the object it belongs to, for humans and logs."""
        subject = " ".join(part for part in (self.kind, self.name) if part)
        return f"{subject}: {self}" if subject else str(self)


@dataclass(frozen=True, slots=True)
class Parsed(Generic[T]):
    """Input that passed every check, as a typed value."""

    value: T


@dataclass(frozen=True, slots=True)
class Invalid:
    """Input that failed; `errors` holds every problem found, never empty."""

    errors: tuple[FieldError, ...]

    def __post_init__(self) -> None:
        if not self.errors:
            raise ValueError("Invalid needs at least one error")

    def paths(self) -> tuple[str, ...]:
        return tuple(error.path for error in self.errors)


@dataclass(frozen=True, slots=True)
class NotOurs:
    """The object belongs to some other agent or runtime; leave it alone.

    Deliberately not an error: a vLLM service in the same namespace is
    perfectly valid, it just is not ours to report on.
    """

    reason: str
