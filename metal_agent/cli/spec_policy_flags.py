"""The flags that say what specs may do on this Mac, shared by `metal-agent run` and `render`.

`render` must refuse exactly what the agent refuses, with the agent's
defaults, so both commands declare these options from here and build the
policy with `build_policy`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List

import typer

from metal_agent.core.extra_args import ExtraArgsPolicy
from metal_agent.core.spec_policy import SpecPolicy

_OPTION_NAME = re.compile(r"--?[A-Za-z0-9][A-Za-z0-9_.-]*")


def allow_extra_arg_option() -> List[str]:
    return typer.Option(
        [], "--allow-extra-arg", envvar="METAL_AGENT_ALLOW_EXTRA_ARGS",
        help="Let specs' extraArgs use this engine option too (all its spellings, any value), beyond the built-in"
             " allowlist of options that tune the model with a plain value; repeat or comma-separate. Only for"
             " options you trust every namespace with: e.g. --chat-template-file lets a spec read any file the"
             " agent can.")


def allowed_model_roots_option() -> List[str]:
    return typer.Option(
        [], "--allowed-model-roots", envvar="METAL_AGENT_ALLOWED_MODEL_ROOTS",
        help="Folders file:// and absolute-path Model sources must lie in, symlinks resolved (repeat or"
             " comma-separate; default: the model store --model-dir alone).")


def _items(values: List[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def build_policy(allow_extra_args: List[str], allowed_model_roots: List[str], model_dir: Path) -> SpecPolicy:
    """The policy from the flags' values; ValueError (naming the flag) for a value that cannot be one."""
    names = _items(allow_extra_args)
    for name in names:
        if not _OPTION_NAME.fullmatch(name):
            raise ValueError(f"--allow-extra-arg: {name!r} is not an option name (e.g. --chat-template-file)")
    roots = []
    for root in _items(allowed_model_roots) or [str(model_dir)]:
        expanded = os.path.expanduser(root)
        if not os.path.isabs(expanded):
            raise ValueError(f"--allowed-model-roots: {root!r} is not an absolute path")
        roots.append(os.path.normpath(expanded))
    return SpecPolicy(extra_args=ExtraArgsPolicy(frozenset(names)), model_roots=tuple(roots))
