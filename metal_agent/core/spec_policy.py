"""What this Mac's owner lets a spec do: one small value passed to every check, never a global.

A spec is written by a stranger in some namespace; the Mac's owner decides,
with `metal-agent run` (and `metal-agent render`, which must refuse exactly
what the agent refuses) flags, what reaches beyond the model:

* `extra_args`: engine options allowed beyond the built-in allowlist
  (`--allow-extra-arg`, see `core.extra_args`);
* `model_roots`: the folders `file://` and absolute-path Model sources must
  lie in once symlinks are resolved (`--allowed-model-roots`; by default the
  model store alone).

Refusals carry their own status reasons (`ExtraArgRefused`, `SourceNotAllowed`)
instead of InvalidSpec. A refusal marked `security` (a file, another host, an
endpoint, code: `FieldError.security`) also decides what happens to a process
already running for that service: one this agent started under its current
policy serves a spec it accepted and keeps serving (as for any invalid
change); one it did not start (left by a previous agent, perhaps an older
version or a wider policy) is stopped and never adopted, because keeping it
open may be the very hole the refusal closes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metal_agent.core.extra_args import EXTRA_ARG_REFUSED, ExtraArgsPolicy
from metal_agent.core.fields import UNSUPPORTED_FIELD

SOURCE_NOT_ALLOWED = "SourceNotAllowed"
INVALID_SPEC = "InvalidSpec"
#: Reasons of refusals (not mistakes), most serious first; `UnsupportedField` is a field LLMKube
#: documents that the agent cannot honour on a Mac (core.fields).
POLICY_REASONS = (EXTRA_ARG_REFUSED, SOURCE_NOT_ALLOWED, UNSUPPORTED_FIELD)


@dataclass(frozen=True, slots=True)
class SpecPolicy:
    extra_args: ExtraArgsPolicy = field(default_factory=ExtraArgsPolicy)
    model_roots: tuple[str, ...] = ()  # absolute folders as the owner gave them (resolved when checked)


def spec_reason(reasons) -> str:
    """The status reason for a list of errors' reasons: a security refusal first, then an
    unsupported field, else InvalidSpec."""
    reasons = [r for r in reasons if r]
    return next((r for r in POLICY_REASONS if r in reasons), INVALID_SPEC)
