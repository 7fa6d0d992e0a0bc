"""LLMKube's Go Metal Agent's command line: read as Go reads it, mapped onto `metal-agent run` (pure).

Why: a drop-in swap keeps the Go agent's launchd job, whose ProgramArguments
carry its flags (`--model-store`, `--apple-power-enabled`, `--port`, ...).
If our agent refused them (click's "No such option", exit 2) launchd would
restart it every 30 s forever. So every flag of the Go agent
(`cmd/metal-agent/main.go`, plus `--kubeconfig`, which controller-runtime
registers on the same flag set) is accepted with its meaning mapped onto
ours, and a flag for something we do not do (other runtimes, a host-side
proxy, fixed thresholds) is *ignored out loud*: the caller reports it once.

Two users, one table (`FLAGS`):

* `metal-agent run` rewrites the Go spellings in its argv before click
  parses it (`normalize_run_argv`): `-flag value`, `--flag value`,
  `-flag=value`, bare bool flags and `--flag=false`, Go durations (`1s`,
  `500ms`, `2m`).
* `metal-agent migrate` reads a Go job's arguments exactly as the Go binary
  did (`parse_go_argv`: Go defaults, the last value wins, parsing stops at
  the first non-flag) and translates the whole set (`translate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterable, Mapping, Sequence

from metal_agent.core.go_values import GoFlagError, Kind, parse_value, seconds_text


# -- what each flag becomes ---------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One Go flag's value, mapped: our arguments for it, and why it is (partly) ignored, if it is."""

    args: tuple[str, ...] = ()
    ignored: str | None = None


def _ours(flag: str, empty_means_default: bool = True) -> Callable[[object], Outcome]:
    """The same setting under our spelling; an empty string is the Go agent's "auto-detect", which is ours too."""
    def mapped(value: object) -> Outcome:
        if empty_means_default and value == "":
            return Outcome()
        return Outcome((f"{flag}={value}",))
    return mapped


def _ignored(reason: str) -> Callable[[object], Outcome]:
    return lambda value: Outcome(ignored=reason)


def _unless(matches: object, reason: str) -> Callable[[object], Outcome]:
    """Accepted silently when the value is what metal-agent does anyway; otherwise ignored with `reason`."""
    return lambda value: Outcome() if value == matches else Outcome(ignored=reason)


def _bool_pair(on: str, off: str) -> Callable[[object], Outcome]:
    return lambda value: Outcome((on if value else off,))


def _namespace(value: object) -> Outcome:
    # "" made the Go agent list every namespace, which is what no --namespace means here.
    return Outcome((f"--namespace={value}",)) if value else Outcome()


def _port(value: object) -> Outcome:
    assert isinstance(value, int)
    if not 0 <= value <= 65535:
        return Outcome(ignored=f"{value} is not a TCP port; the agent listens on 127.0.0.1:9090")
    return Outcome((f"--listen=127.0.0.1:{value}",))  # the Go agent's health server binds 127.0.0.1 too


_LOG_LEVELS = {"debug": "debug", "info": "info", "warn": "warning", "warning": "warning", "error": "error"}


def _log_level(value: object) -> Outcome:
    level = _LOG_LEVELS.get(str(value).lower())
    if level is None:
        return Outcome(("--log-level=info",), ignored="not a level; LLMKube's agent logs at info then, and so does metal-agent")
    return Outcome((f"--log-level={level}",))


def _memory_fraction(value: object) -> Outcome:
    assert isinstance(value, float)
    return Outcome() if value <= 0 else Outcome((f"--memory-fraction={value!r}",))  # <= 0: auto, in both


def _memory_check_mode(value: object) -> Outcome:
    if value in ("", "enforce", "warn"):
        return Outcome((f"--memory-check-mode={value or 'enforce'}",))
    # The Go agent logs a warning and enforces: a typo must not pick the fail-open mode.
    return Outcome(("--memory-check-mode=enforce",), ignored="not a mode; enforce, as LLMKube's agent falls back to")


def _watchdog_interval(value: object) -> Outcome:
    assert isinstance(value, Fraction)
    if value <= 0:
        return Outcome(ignored="the memory pressure check cannot be turned off (it costs one reading per "
                               "--memory-interval and evicts nothing without --eviction-enabled)")
    return Outcome((f"--memory-interval={seconds_text(value)}",))


def _startup_timeout(value: object) -> Outcome:
    assert isinstance(value, Fraction)
    # <= 0: the Go agent falls back to its default, 2 minutes.
    return Outcome((f"--startup-timeout={seconds_text(value) if value > 0 else '120'}",))


def _power_interval(value: object) -> Outcome:
    assert isinstance(value, Fraction)
    if value <= 0:
        return Outcome(ignored="not a sampling interval; powermetrics samples every 1000 ms")
    return Outcome((f"--power-interval-ms={math.floor(value * 1000 + Fraction(1, 2))}",))


def _version(value: object) -> Outcome:
    return Outcome(("--version",)) if value else Outcome()


_RUNTIME = ("metal-agent runs llama-server for GGUF Models and mlx_lm.server for MLX Models, side by side; "
            "InferenceServices whose runtime is unset or llamacpp are served, other runtimes are left alone")


#: Where the agent looks for mlx_lm.server (adapters.mlx_binary.find_mlx_server) and how to put it there.
MLX_LM_INSTALL = ("`pip install mlx-lm` into the agent's venv (`~/Library/Application Support/metal-agent/venv/bin/pip"
                  " install mlx-lm`), where the agent looks first, then Homebrew's bin directories and PATH; or "
                  "`--mlx-server PATH`")
MLX_SERVER_BIN_IGNORED = ("the Go agent's Swift mlx-server, not used: metal-agent runs mlx-lm's mlx_lm.server "
                          "instead")


def _runtime(value: object) -> Outcome:
    """The Go agent's one runtime per Mac becomes the default engine (for Models whose format names none):
    mlx-server -> mlx_lm.server. GGUF Models keep llama-server and MLX Models mlx_lm.server either way."""
    if value == "llama-server":
        return Outcome()
    if value == "mlx-server":
        return Outcome(("--default-runtime=mlx-lm",))
    return Outcome(ignored=_RUNTIME)
_PRESSURE = ("memory pressure is macOS's own level (kern.memorystatus_vm_pressure_level), not a threshold "
             "on free memory")
def _client_port(value: object) -> Outcome:
    assert isinstance(value, int)
    if not 0 <= value <= 65535:
        return Outcome(ignored=f"{value} is not a TCP port")
    return Outcome((f"--client-port={value}",))  # served by the front door (on by default)


@dataclass(frozen=True)
class GoFlag:
    """One flag of the Go agent: its name, type, Go default, what it means here, and the mapping."""

    name: str
    kind: Kind
    default: str  # as Go prints it in --help
    meaning: str  # for the README's table
    map: Callable[[object], Outcome] = field(repr=False)

    def outcome(self, text: str) -> Outcome:
        """Map one raw value (Go syntax); raises GoFlagError for a value Go would refuse."""
        try:
            value = parse_value(self.kind, text)
        except ValueError as err:
            raise GoFlagError(f"invalid value {text!r} for flag -{self.name}: {err}") from None
        return self.map(value)


def _flag(name: str, kind: Kind, default: str, meaning: str, mapping: Callable[[object], Outcome]) -> GoFlag:
    return GoFlag(name, kind, default, meaning, mapping)


S, I, F, B, D = Kind.STRING, Kind.INT, Kind.FLOAT, Kind.BOOL, Kind.DURATION

#: Every flag of LLMKube's Go agent at the vendored commit, in main.go's order, then controller-runtime's.
FLAGS: dict[str, GoFlag] = {f.name: f for f in (
    _flag("namespace", S, "default", "`--namespace` (empty: all namespaces). Without it the Go agent watched "
          "`default`; `migrate` writes that out, `run` alone watches all", _namespace),
    _flag("model-store", S, "/tmp/llmkube-models", "`--model-dir`. Our layout differs (one directory per URL); "
          "`migrate` adopts the Go agent's files", _ours("--model-dir")),
    _flag("llama-server", S, "", "`--llama-server` (empty: auto-detect, Homebrew first, in both)", _ours("--llama-server")),
    _flag("llama-server-port", I, "0", "0: accepted (ports are allocated per service, as with 0). Other values: "
          "ignored, since several services run at once", _unless(0, "each service gets its own port; several run at once")),
    _flag("runtime", S, "llama-server", "`llama-server`: accepted. `mlx-server`: `--default-runtime=mlx-lm` (every "
          "Model is still served by the engine its format calls for). Others: ignored", _runtime),
    _flag("omlx-bin", S, "", "ignored (no oMLX runtime)", _ignored(_RUNTIME)),
    _flag("omlx-port", I, "8000", "ignored (no oMLX runtime)", _ignored(_RUNTIME)),
    _flag("ollama-port", I, "11434", "ignored (no Ollama runtime)", _ignored(_RUNTIME)),
    _flag("vllm-swift-bin", S, "", "ignored (no vllm-swift runtime)", _ignored(_RUNTIME)),
    _flag("mlx-server-bin", S, "", "ignored: it is defilantech's Swift `mlx-server`, whose command line (`--model "
          "--host --port --max-slots --tool-call-format` only) cannot take mlx_lm.server's. MLX Models run mlx-lm's "
          f"`mlx_lm.server`: {MLX_LM_INSTALL}", _ignored(MLX_SERVER_BIN_IGNORED)),
    _flag("mlx-server-port", I, "8080", "ignored (each MLX service gets a free port, like llama-server's)",
          _ignored("each MLX service gets a free port and its own EndpointSlice")),
    _flag("port", I, "9090", "`--listen 127.0.0.1:PORT` (metrics, health; the Go agent bound 127.0.0.1 too)", _port),
    _flag("client-port", I, "9999", "`--client-port` (127.0.0.1:PORT serves every model's OpenAI API through the "
          "front door, on by default; 0: off)", _client_port),
    _flag("log-level", S, "info", "`--log-level` (`warn` is `warning`; an unknown level is info, as in Go)", _log_level),
    _flag("host-ip", S, "", "`--host-ip` (empty: auto-detect)", _ours("--host-ip")),
    _flag("memory-fraction", F, "0", "`--memory-fraction` (0: auto, 0.67 up to 36 GiB RAM, 0.75 above, in both)",
          _memory_fraction),
    _flag("memory-check-mode", S, "enforce", "`--memory-check-mode` (unknown: enforce, as in Go)", _memory_check_mode),
    _flag("memory-watchdog-interval", D, "10s", "`--memory-interval` in seconds (0, \"off\": ignored, the check "
          "always runs)", _watchdog_interval),
    _flag("memory-pressure-warning", F, "0.2", "ignored: on macOS the level is the kernel's own "
          "(`kern.memorystatus_vm_pressure_level`); elsewhere Warning is below 15 % of RAM available, Critical "
          "below 8 %", _ignored(_PRESSURE)),
    _flag("memory-pressure-critical", F, "0.1", "ignored (see above)", _ignored(_PRESSURE)),
    _flag("eviction-enabled", B, "false", "`--eviction-enabled` / `--eviction-disabled`",
          _bool_pair("--eviction-enabled", "--eviction-disabled")),
    _flag("max-watch-failures", I, "3", "ignored: the agent never exits because the API server is away "
          "(it keeps serving, and says so in /readyz)", _ignored(
              "the agent never exits because the API server is away; it keeps serving and says so in /readyz")),
    _flag("inference-service-allowlist", S, "", "`--inference-service-allowlist`: only these InferenceServices "
          "are claimed", _ours("--inference-service-allowlist")),
    _flag("llama-server-startup-timeout", D, "2m0s", "`--startup-timeout` in seconds", _startup_timeout),
    _flag("omlx-startup-timeout", D, "2m0s", "ignored (no oMLX runtime)", _ignored(_RUNTIME)),
    _flag("vllm-swift-startup-timeout", D, "2m0s", "ignored (no vllm-swift runtime)", _ignored(_RUNTIME)),
    _flag("mlx-server-startup-timeout", D, "2m0s", "ignored (`--startup-timeout` covers every engine)",
          _ignored("--startup-timeout covers every engine")),
    _flag("apple-power-enabled", B, "false", "`--power` / `--no-power` (needs `make install-powermetrics-sudo`: "
          "our sudoers grant pins the interval). Without it the Go agent sampled nothing; `migrate` writes "
          "`--no-power`, `run` alone samples on macOS", _bool_pair("--power", "--no-power")),
    _flag("apple-power-interval", D, "1s", "`--power-interval-ms`", _power_interval),
    _flag("powermetrics-bin", S, "/usr/bin/powermetrics", "`/usr/bin/powermetrics`: accepted. Others: ignored "
          "(the sudo grant pins that path)", _unless("/usr/bin/powermetrics",
                                                     "the sudoers grant pins /usr/bin/powermetrics")),
    _flag("version", B, "false", "print the version and exit", _version),
    _flag("kubeconfig", S, "", "`--kubeconfig` (registered by controller-runtime on the Go agent's flag set)",
          _ours("--kubeconfig")),
)}

#: The Go agent's `-h`/`-help`: its usage and exit 0. Ours is `--help`.
HELP_NAMES = ("h", "help")


@dataclass(frozen=True)
class Ignored:
    flag: str
    value: str
    reason: str


def describe_ignored(items: Iterable[Ignored]) -> str:
    """The one warning line naming each ignored flag once (the last value wins, as in Go),
    flags ignored for the same reason together: `--a=1, --b=2 (why); --c=3 (why not)`."""
    last: dict[str, Ignored] = {}
    for item in items:
        last.pop(item.flag, None)
        last[item.flag] = item
    by_reason: dict[str, list[str]] = {}
    for item in last.values():
        by_reason.setdefault(item.reason, []).append(f"--{item.flag}={item.value}")
    return "; ".join(f"{', '.join(flags)} ({reason})" for reason, flags in by_reason.items())


# -- `metal-agent run`: Go spellings in a mixed argv ------------------------------------


def _split(token: str) -> tuple[int, str, str | None] | None:
    """(dashes, name, value after '=' or None) of a flag-looking token; None for anything else."""
    if len(token) < 2 or token[0] != "-":
        return None
    dashes = 2 if token[1] == "-" else 1
    body = token[dashes:]
    if not body or body[0] in "-=":
        return None
    name, eq, value = body.partition("=")
    return dashes, name, (value if eq else None)


@dataclass(frozen=True)
class Normalized:
    argv: list[str]
    ignored: tuple[Ignored, ...]


def normalize_run_argv(argv: Sequence[str], takes_value: Iterable[str]) -> Normalized:
    """`argv` with every Go-agent flag rewritten into ours; raises GoFlagError as the Go agent would.

    `takes_value` are our own options that take a value (e.g. `--listen`):
    the token after one is a value and is never rewritten, whatever it looks
    like. Tokens after `--` are left alone.
    """
    ours_with_value = set(takes_value)
    out: list[str] = []
    ignored: list[Ignored] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            out.extend(argv[i - 1:])
            break
        parts = _split(token)
        if parts is None:
            out.append(token)
            continue
        dashes, name, value = parts
        if name in HELP_NAMES and value is None:
            out.append("--help")
            continue
        flag = FLAGS.get(name)
        if flag is None:
            out.append(token)
            if token in ours_with_value and i < len(argv):
                out.append(argv[i])
                i += 1
            continue
        if value is None:
            if flag.kind is Kind.BOOL:
                value = "true"  # a bool flag never takes the next token, in Go
            elif i < len(argv):
                value = argv[i]  # the next token, whatever it looks like, as in Go
                i += 1
            else:
                raise GoFlagError(f"flag needs an argument: -{name}")
        outcome = flag.outcome(value)
        out.extend(outcome.args)
        if outcome.ignored:
            ignored.append(Ignored(name, value, outcome.ignored))
    return Normalized(out, tuple(ignored))


# -- `metal-agent migrate`: a Go job's arguments, as the Go binary read them -------------


@dataclass(frozen=True)
class GoCommandLine:
    """What the Go agent was started with: each flag set (raw text, the last one wins) and
    the arguments after the first non-flag, which Go's flag package never read."""

    values: Mapping[str, str]
    unread: tuple[str, ...] = ()

    def value(self, name: str) -> str:
        """The flag's raw value, or the Go default when it was not given."""
        return self.values.get(name, FLAGS[name].default)


def parse_go_argv(args: Sequence[str]) -> GoCommandLine:
    """Go's flag.Parse on `args` (the program name excluded), for the flags in FLAGS."""
    values: dict[str, str] = {}
    rest = list(args)
    while rest:
        token = rest[0]
        if token == "--":
            rest.pop(0)
            break
        parts = _split(token)
        if parts is None:
            if len(token) >= 2 and token[0] == "-":
                raise GoFlagError(f"bad flag syntax: {token}")
            break  # the first non-flag ends parsing
        rest.pop(0)
        _, name, value = parts
        flag = FLAGS.get(name)
        if flag is None:
            if name in HELP_NAMES:
                raise GoFlagError(f"-{name}: the Go agent printed its usage and exited")
            raise GoFlagError(f"flag provided but not defined: -{name}")
        if value is None:
            if flag.kind is Kind.BOOL:
                value = "true"
            elif rest:
                value = rest.pop(0)
            else:
                raise GoFlagError(f"flag needs an argument: -{name}")
        flag.outcome(value)  # validates, as Go's Set does
        values.pop(name, None)
        values[name] = value
    return GoCommandLine(values, tuple(rest))


_WRITTEN_OUT = ("namespace", "apple-power-enabled")


@dataclass(frozen=True)
class Translation:
    args: tuple[str, ...]
    ignored: tuple[Ignored, ...]


def translate(cmdline: GoCommandLine, *, skip: Iterable[str] = ()) -> Translation:
    """Our `run` arguments for everything the Go job set, in its order; `skip` names Go flags
    the caller decides itself (e.g. `model-store`, which `migrate` replaces).

    Two Go defaults are written out, because ours differ in what the agent
    does: with no `--namespace` the Go agent watched `default` (ours: every
    namespace), and with no `--apple-power-enabled` it sampled no power
    (ours: on, on macOS).
    """
    skipped = set(skip)
    args: list[str] = []
    ignored: list[Ignored] = []
    values = {name: FLAGS[name].default for name in _WRITTEN_OUT if name not in cmdline.values}
    values.update(cmdline.values)
    for name, raw in values.items():
        if name in skipped:
            continue
        outcome = FLAGS[name].outcome(raw)
        args.extend(outcome.args)
        if outcome.ignored:
            ignored.append(Ignored(name, raw, outcome.ignored))
    return Translation(tuple(args), tuple(ignored))


def markdown_table() -> str:
    """The README's table of the Go agent's flags (a unit test keeps the README's copy in sync)."""
    rows = ["| Go agent flag | type | Go default | in metal-agent |", "|---|---|---|---|"]
    for flag in FLAGS.values():
        default = f"`{flag.default}`" if flag.default else "–"
        rows.append(f"| `--{flag.name}` | {flag.kind.value} | {default} | {flag.meaning} |")
    return "\n".join(rows)
