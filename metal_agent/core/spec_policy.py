"""What this Mac's owner lets a spec do: one small value passed to every check, never a global.

A spec is written by a stranger in some namespace; the Mac's owner decides,
with `metal-agent run` (and `metal-agent render`, which must refuse exactly
what the agent refuses) flags, what reaches beyond the model:

* `extra_args`: engine options allowed beyond the built-in allowlist
  (`--allow-extra-arg`, see `core.extra_args`);
* `model_roots`: the folders `file://` and absolute-path Model sources must
  lie in once symlinks are resolved (`--allowed-model-roots`; by default the
  model store alone).

Refusals of either are security refusals (`SECURITY_REASONS`): a process
already serving a spec that is now refused is stopped, not kept, because
keeping it open is the very hole the refusal closes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metal_agent.core.extra_args import EXTRA_ARG_REFUSED, ExtraArgsPolicy

SOURCE_NOT_ALLOWED = "SourceNotAllowed"
INVALID_SPEC = "InvalidSpec"
SECURITY_REASONS = (EXTRA_ARG_REFUSED, SOURCE_NOT_ALLOWED)


@dataclass(frozen=True, slots=True)
class SpecPolicy:
    extra_args: ExtraArgsPolicy = field(default_factory=ExtraArgsPolicy)
    model_roots: tuple[str, ...] = ()  # absolute folders as the owner gave them (resolved when checked)


def spec_reason(reasons) -> str:
    """The status reason for a list of errors' reasons: a security refusal first, else InvalidSpec."""
    reasons = [r for r in reasons if r]
    return next((r for r in SECURITY_REASONS if r in reasons), INVALID_SPEC)
