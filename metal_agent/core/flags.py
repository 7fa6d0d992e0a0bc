"""What we know about llama-server's command line, in one place.

Two concerns live here because both are facts about llama-server, not about
LLMKube's API:

* **Owned flags.** `spec.extraArgs` is appended after everything the agent
  emits, and llama-server lets the last occurrence of a flag win. Without a
  guard, a user who may edit an InferenceService could therefore move the
  server to another port (the agent's health checks and EndpointSlice would
  point at nothing), serve another file, switch on TLS, or expose the Mac's
  file system and shell (`--path`, `--tools`). The table below lists every
  flag the agent reserves, each with the reason shown to the user.

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

_MODEL = "the agent chooses the model file from the Model resource"
_NETWORK = "the agent chooses where llama-server listens and registers that endpoint"
_AUTH = "authentication is configured by the agent, not per service"
_OBSERVABILITY = "the agent captures logs and always enables /metrics"
_MEMORY = "memory locking is an agent-level setting"
_EXPOSURE = "it would expose this Mac's files or shell to API clients"
_EXITS = "llama-server would print and exit instead of serving"
_LOG_LEVEL = (
    "the agent sets the log verbosity: below it llama-server stops printing where the model"
    " was loaded, and status.acceleration goes blind"
)

#: Flag (every spelling llama-server accepts) -> why extraArgs may not use it.
OWNED_FLAGS: dict[str, str] = {
    # What is served.
    "-m": _MODEL,
    "--model": _MODEL,
    "-mu": _MODEL,
    "--model-url": _MODEL,
    "-hf": _MODEL,
    "-hfr": _MODEL,
    "--hf-repo": _MODEL,
    "-hff": _MODEL,
    "--hf-file": _MODEL,
    "-hft": _MODEL,
    "--hf-token": _MODEL,
    "-dr": _MODEL,
    "--docker-repo": _MODEL,
    "--models-dir": _MODEL,
    "--models-preset": _MODEL,
    # Where and how it is reachable.
    "--host": _NETWORK,
    "--port": _NETWORK,
    "--reuse-port": _NETWORK,
    "--api-prefix": _NETWORK,
    "--ssl-key-file": _NETWORK,
    "--ssl-cert-file": _NETWORK,
    "--api-key": _AUTH,
    "--api-key-file": _AUTH,
    # What the agent observes.
    "--metrics": _OBSERVABILITY,
    "--log-file": _OBSERVABILITY,
    "--log-disable": _OBSERVABILITY,
    "-lv": _LOG_LEVEL,
    "--verbosity": _LOG_LEVEL,
    "--log-verbosity": _LOG_LEVEL,
    # Host memory policy.
    "--mlock": _MEMORY,
    "--no-mlock": _MEMORY,
    "-lm": _MEMORY,
    "--load-mode": _MEMORY,
    # Host exposure.
    "--path": _EXPOSURE,
    "--media-path": _EXPOSURE,
    "--slot-save-path": _EXPOSURE,
    "--tools": _EXPOSURE,
    "--mcp-servers-config": _EXPOSURE,
    "--mcp-servers-json": _EXPOSURE,
    # Print-and-exit flags.
    "-h": _EXITS,
    "--help": _EXITS,
    "--usage": _EXITS,
    "--version": _EXITS,
    "--list-devices": _EXITS,
    "--completion-bash": _EXITS,
}

_OWNED_FOLDED = {flag.casefold(): reason for flag, reason in OWNED_FLAGS.items()}


def flag_name(token: str) -> str | None:
    """The option name a command-line token stands for, or None for a plain value.

    Normalised the way llama.cpp (and common forks) read it, plus spellings
    a lenient parser might accept, so no variant slips past `owned_flag`:
    `--port=1` and `--port 1` (one token) are `--port`; `--api_key` is
    `--api-key` (llama.cpp maps `_` to `-` in long options); case is folded.
    """
    if not token.startswith("-") or token in ("-", "--"):
        return None
    name = re.split(r"[=\s]", token, maxsplit=1)[0]
    if name.startswith("--"):
        name = "--" + name[2:].replace("_", "-")
    return name.casefold()


def owned_flag(token: str) -> str | None:
    """Why `token` may not appear in extraArgs, or None if it may.

    A single-dash long name (`-port`) is checked as `--port` too: llama.cpp
    rejects it today, but a fork with a Go-style parser would not.
    """
    name = flag_name(token)
    if name is None:
        return None
    reason = _OWNED_FOLDED.get(name)
    if reason is None and not name.startswith("--") and len(name) > 2:
        reason = _OWNED_FOLDED.get("--" + name[1:].replace("_", "-"))
    return reason


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

    Unknown or empty help falls back to `--mlock`, the spelling LLMKube and
    the Homebrew builds of its era use.
    """
    if re.search(r"(?<![\w-])--mlock(?![\w-])", help_text):
        return MlockStyle.FLAG
    if re.search(r"(?<![\w-])--load-mode(?![\w-])", help_text):
        return MlockStyle.LOAD_MODE
    return MlockStyle.FLAG


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

    The defaults describe a binary whose help could not be read: the
    classic `--mlock` spelling, no verbosity option (never pass what may
    not exist), and `--no-jinja` (an explicit `jinja: false` is then
    honoured, or fails loudly on an old build rather than silently).
    """

    mlock_style: MlockStyle = MlockStyle.FLAG
    verbosity_flag: str | None = None
    no_jinja: bool = True


def dialect_from_help(help_text: str) -> Dialect:
    """Everything the argv builder needs to know about the binary whose `--help` this is."""
    verbosity = next((flag for flag in VERBOSITY_FLAGS[:2] if _lists(help_text, flag)), None)
    # "Knows --jinja but not --no-jinja" is an old build (engine off by default);
    # help that mentions neither says nothing, so assume a current build.
    no_jinja = _lists(help_text, "--no-jinja") or not _lists(help_text, "--jinja")
    return Dialect(mlock_style=mlock_style_from_help(help_text), verbosity_flag=verbosity, no_jinja=no_jinja)
