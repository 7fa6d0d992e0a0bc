"""What we know about llama-server's command line, in one place.

What `spec.extraArgs` may carry is `core.extra_args` (an allowlist per
engine: `core.llama_options`, `core.mlx_options`). This module holds:

* **Dialects.** llama.cpp renames flags over time. Recent builds dropped
  `--mlock` in favour of `--load-mode mmap+mlock`; Homebrew still ships
  builds with `--mlock`. `MlockStyle` names the two spellings and
  `mlock_style_from_help` picks one from `llama-server --help` output,
  which an adapter (or the CLI) captures; this module only reads the text.
  `Dialect` gathers everything read from that text: the mlock spelling,
  the log-verbosity option (`-lv`), and whether `--no-jinja` exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

# Custom KV cache type names end up as one argv element; only plain
# identifiers like `turbo3` or `tbqp3` are allowed, so nothing that looks
# like shell syntax or another flag can ride along.
CACHE_TYPE_TOKEN = re.compile(r"[a-z0-9_]{1,32}")


class MlockStyle(StrEnum):
    """How the target llama-server build spells "lock the model in RAM"."""

    FLAG = "flag"  # --mlock (llama.cpp builds before the --load-mode rename)
    LOAD_MODE = "load-mode"  # --load-mode mmap+mlock (newer builds)

    def args(self) -> tuple[str, ...]:
        if self is MlockStyle.LOAD_MODE:
            # mmap+mlock is what the old --mlock did: map the file, then pin it.
            return ("--load-mode", "mmap+mlock")
        return ("--mlock",)


def mlock_style_from_help(help_text: str) -> MlockStyle:
    """Pick the mlock spelling from `llama-server --help` output.

    Unknown or empty help falls back to `--load-mode`, the spelling of the
    pinned build and of every current one, which reject `--mlock` at start-up;
    a binary that still has `--mlock` lists it in a readable `--help`.
    """
    if re.search(r"(?<![\w-])--mlock(?![\w-])", help_text):
        return MlockStyle.FLAG
    return MlockStyle.LOAD_MODE


#: The log verbosity the agent runs llama-server at. In current llama.cpp
#: (build 11434: `common/log.cpp`) libllama's INFO messages are logged at
#: level 4 ("trace"), one above the default threshold 3, so without it the
#: lines that say where the model landed (`load_tensors: offloaded N/M layers
#: to GPU`, the `... model buffer size` lines, `using device MTL0 (...)`) are
#: never printed and `status.acceleration` cannot be known. 4 and not 5: 5 is
#: debug output (every tensor and graph node), megabytes per load.
LOG_VERBOSITY = 4

#: Every spelling of llama-server's log-verbosity option (all agent-owned).
VERBOSITY_FLAGS = ("--verbosity", "--log-verbosity", "-lv")


def _lists(help_text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


@dataclass(frozen=True, slots=True)
class Dialect:
    """What one llama-server binary's command line looks like, read from its `--help`.

    * `mlock_style`: see `MlockStyle`.
    * `verbosity_flag`: the spelling of the log-verbosity option, or None
      when the build has none (then nothing is passed: an unknown option
      would stop llama-server at start-up).
    * `no_jinja`: whether `--no-jinja` exists. Builds that have it enable
      the Jinja template engine by default, so `jinja: false` must say so;
      builds without it have the engine off by default, so saying nothing
      already means "off".

    * `no_slots`: pass `--no-slots`. Builds that know it serve `/slots` (every
      slot's prompt in flight) to any client unless told not to.

    The defaults describe a binary whose help could not be read: the
    current `--load-mode` spelling, no verbosity option (never pass what may
    not exist), and `--no-jinja` (an explicit `jinja: false` is then
    honoured, or fails loudly on an old build rather than silently), and
    `--no-slots` (a build that does not know it fails loudly at start
    rather than exposing prompts).
    """

    mlock_style: MlockStyle = MlockStyle.LOAD_MODE
    verbosity_flag: str | None = None
    no_jinja: bool = True
    no_slots: bool = True

    def __post_init__(self) -> None:
        # A programming error, not user input: an unknown option would stop llama-server at start-up.
        if self.verbosity_flag is not None and self.verbosity_flag not in VERBOSITY_FLAGS:
            raise ValueError(f"verbosity_flag must be llama-server's verbosity option, got {self.verbosity_flag!r}")


def dialect_from_help(help_text: str) -> Dialect:
    """Everything the argv builder needs to know about the binary whose `--help` this is."""
    verbosity = next((flag for flag in VERBOSITY_FLAGS[:2] if _lists(help_text, flag)), None)
    # "Knows --jinja but not --no-jinja" is an old build (engine off by default);
    # help that mentions neither says nothing, so assume a current build.
    no_jinja = _lists(help_text, "--no-jinja") or not _lists(help_text, "--jinja")
    # A build listing --slots without --no-slots keeps /slots off unless asked; help that mentions
    # neither says nothing, so assume a current build (on by default): pass --no-slots.
    no_slots = _lists(help_text, "--no-slots") or not _lists(help_text, "--slots")
    return Dialect(mlock_style=mlock_style_from_help(help_text), verbosity_flag=verbosity, no_jinja=no_jinja,
                   no_slots=no_slots)
