"""LLMKube's Go agent's flags: read as Go reads them, mapped onto `metal-agent run`, and the allowlist claim.

The flag list is checked against the Go agent's own `cmd/metal-agent/main.go`
(read from the vendored tarball; skipped without ../shared), so a flag the Go
agent gains or loses fails here instead of failing a user's drop-in swap.
`run` is exercised through the real command table, in-process, with the agent
itself replaced by a function that records the configuration it was given.
"""

from __future__ import annotations

import json
import re
import tarfile
from fractions import Fraction
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metal_agent.cli.main import app
from metal_agent.core.claim import Allowlist, Ours, claim, evaluate
from metal_agent.core.go_flags import (
    FLAGS,
    Ignored,
    describe_ignored,
    markdown_table,
    normalize_run_argv,
    parse_go_argv,
    translate,
)
from metal_agent.core.go_values import GoFlagError, Kind, parse_go_duration, parse_go_int
from metal_agent.core.result import NotOurs, Parsed
from tests.support.llmkube import find_tarball
from tests.support.manifests import isvc_doc, model_doc

README = Path(__file__).resolve().parents[2] / "README.md"
GO_KINDS = {"StringVar": Kind.STRING, "IntVar": Kind.INT, "Float64Var": Kind.FLOAT, "BoolVar": Kind.BOOL,
            "Bool": Kind.BOOL, "DurationVar": Kind.DURATION}


def _tar_member(suffix: str) -> str:
    tarball = find_tarball()
    if tarball is None:
        pytest.skip("../shared (the vendored LLMKube source) is not present")
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            if member.name.endswith(suffix):
                data = tar.extractfile(member)
                assert data is not None
                return data.read().decode()
    raise AssertionError(f"{suffix} is not in {tarball}")


def go_agent_flags() -> dict[str, Kind]:
    """name -> kind of every flag main.go registers (flag.XxxVar(&v, "name", ...) and flag.Bool("name", ...))."""
    source = _tar_member("cmd/metal-agent/main.go")
    found = {name: GO_KINDS[call] for call, name in
             re.findall(r'\bflag\.(\w+)\(\s*(?:&[\w.]+,\s*)?"([\w-]+)"', source)}
    assert len(found) > 25, "the pattern no longer matches main.go's flag definitions"
    return found


# -- the table is the Go agent's --------------------------------------------------------


def test_every_flag_of_the_go_agent_is_accepted_with_its_type():
    go = go_agent_flags()
    # --kubeconfig is registered on the same flag set by controller-runtime's config package (init()).
    assert {name: flag.kind for name, flag in FLAGS.items() if name != "kubeconfig"} == go


def test_readme_table_of_go_flags_matches_the_code():
    text = README.read_text()
    begin, end = "<!-- BEGIN go-flags (metal_agent.core.go_flags.markdown_table) -->", "<!-- END go-flags -->"
    assert text[text.index(begin) + len(begin):text.index(end)].strip() == markdown_table(), (
        "README's Go flag table is stale: run `python scripts/update_readme.py`")


# -- Go's value syntax ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("1s", 1), ("500ms", Fraction(1, 2)), ("2m", 120), ("1h30m", 5400), ("1.5s", Fraction(3, 2)),
    ("0", 0), ("-1s", -1), ("+2s", 2), ("1µs", Fraction(1, 10**6)), ("1us", Fraction(1, 10**6)),
    ("2m0s", 120), ("1.s", 1), (".5s", Fraction(1, 2)), ("100ns", Fraction(1, 10**7)),
])
def test_go_durations(text, seconds):
    assert parse_go_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "s", "1x", ".s", "1s5", "-", "1 s", "10sec"])
def test_go_refuses_these_durations(text):
    with pytest.raises(ValueError):
        parse_go_duration(text)


@pytest.mark.parametrize(("text", "value"), [("9090", 9090), ("0x10", 16), ("010", 8), ("-3", -3), ("1_000", 1000)])
def test_go_ints(text, value):
    assert parse_go_int(text) == value


@pytest.mark.parametrize("text", ["", "9.5", "08", " 1", "one", str(1 << 63)])
def test_go_refuses_these_ints(text):
    with pytest.raises(ValueError):
        parse_go_int(text)


# -- `metal-agent run`: every Go spelling -------------------------------------------------------

OURS_WITH_VALUE = {"--listen", "--log-dir", "--namespace", "-n", "--threads", "--model-dir", "--kubeconfig"}


def normalized(*argv: str) -> list[str]:
    return normalize_run_argv(list(argv), OURS_WITH_VALUE).argv


@pytest.mark.parametrize("argv", [
    ["-model-store", "/m"], ["--model-store", "/m"], ["-model-store=/m"], ["--model-store=/m"],
])
def test_the_four_go_spellings_of_a_value_flag(argv):
    assert normalized(*argv) == ["--model-dir=/m"]


@pytest.mark.parametrize(("argv", "expected"), [
    (["--apple-power-enabled"], ["--power"]),
    (["-apple-power-enabled"], ["--power"]),
    (["--apple-power-enabled=false"], ["--no-power"]),
    (["--apple-power-enabled=0"], ["--no-power"]),
    (["-apple-power-enabled=T"], ["--power"]),
    (["--eviction-enabled"], ["--eviction-enabled"]),
    (["--eviction-enabled=false"], ["--eviction-disabled"]),
    # A bool flag never takes the next token: --port is read as the next flag.
    (["--eviction-enabled", "--port", "9091"], ["--eviction-enabled", "--listen=127.0.0.1:9091"]),
])
def test_go_bool_flags(argv, expected):
    assert normalized(*argv) == expected


def test_go_refuses_a_bool_spelled_yes():
    with pytest.raises(GoFlagError, match="apple-power-enabled"):
        normalized("--apple-power-enabled=yes")


@pytest.mark.parametrize(("argv", "expected"), [
    (["--apple-power-interval", "1s"], ["--power-interval-ms=1000"]),
    (["--apple-power-interval=500ms"], ["--power-interval-ms=500"]),
    (["--llama-server-startup-timeout", "2m"], ["--startup-timeout=120"]),
    (["--llama-server-startup-timeout", "1.5s"], ["--startup-timeout=1.5"]),
    (["--llama-server-startup-timeout", "0"], ["--startup-timeout=120"]),  # Go: <= 0 is its default, 2m
    (["--memory-watchdog-interval", "10s"], ["--memory-interval=10"]),
])
def test_go_durations_become_our_units(argv, expected):
    assert normalized(*argv) == expected


@pytest.mark.parametrize(("argv", "expected"), [
    (["--port", "9090"], ["--listen=127.0.0.1:9090"]),
    (["--namespace", "llm"], ["--namespace=llm"]),
    (["-namespace", ""], []),  # Go: "" lists every namespace, our default
    (["--host-ip", ""], []),
    (["--llama-server", ""], []),
    (["--memory-fraction", "0"], []),  # 0: auto in both
    (["--memory-fraction", "0.8"], ["--memory-fraction=0.8"]),
    (["--memory-check-mode", "warn"], ["--memory-check-mode=warn"]),
    (["--log-level", "warn"], ["--log-level=warning"]),
    (["--inference-service-allowlist", "a,b"], ["--inference-service-allowlist=a,b"]),
    (["--runtime", "llama-server"], []),
    (["--llama-server-port", "0"], []),
    (["--client-port", "0"], ["--client-port=0"]),
    (["--client-port", "9999"], ["--client-port=9999"]),
    (["-client-port=8088"], ["--client-port=8088"]),
    (["--powermetrics-bin", "/usr/bin/powermetrics"], []),
    (["-kubeconfig", "/k"], ["--kubeconfig=/k"]),
    (["-version"], ["--version"]),
    (["-h"], ["--help"]),
    (["-help"], ["--help"]),
])
def test_go_flags_map_onto_ours(argv, expected):
    assert normalized(*argv) == expected


def test_our_own_flags_and_their_values_are_left_alone():
    argv = ["--listen", "127.0.0.1:1", "--threads", "8", "--log-dir", "-port", "-n", "llm", "--no-mlock",
            "--", "--port", "1"]
    assert normalized(*argv) == argv


def test_a_go_value_flag_takes_the_next_token_whatever_it_looks_like():
    # Go's flag package does this too: `--host-ip --port` sets host-ip to "--port".
    assert normalized("--host-ip", "--port") == ["--host-ip=--port"]
    with pytest.raises(GoFlagError, match="flag needs an argument: -port"):
        normalized("--port")


@pytest.mark.parametrize("argv", [
    ["--omlx-port", "8000"], ["--runtime=omlx"], ["--client-port", "70000"], ["--max-watch-failures", "5"],
    ["--memory-pressure-warning", "0.3"], ["--memory-watchdog-interval", "0"], ["--powermetrics-bin", "/x"],
    ["--llama-server-port", "8080"], ["--mlx-server-startup-timeout", "1m"],
    ["--mlx-server-bin", "/opt/homebrew/bin/mlx-server"],  # the Swift server: cannot run mlx_lm.server's argv
])
def test_what_we_do_not_do_is_ignored_out_loud(argv):
    result = normalize_run_argv(argv, OURS_WITH_VALUE)
    assert result.argv == []
    assert [i.flag for i in result.ignored] == [argv[0].lstrip("-").split("=")[0]]
    assert result.ignored[0].reason


def test_an_unknown_log_level_is_info_as_in_go_and_said_so():
    result = normalize_run_argv(["--log-level", "fatal"], OURS_WITH_VALUE)
    assert result.argv == ["--log-level=info"] and result.ignored[0].flag == "log-level"


def test_the_warning_names_each_ignored_flag_once_grouped_by_reason():
    line = describe_ignored([Ignored("omlx-port", "8000", "no oMLX"), Ignored("client-port", "9999", "no proxy"),
                             Ignored("omlx-bin", "/o", "no oMLX"), Ignored("omlx-port", "8001", "no oMLX")])
    # Ordered by each flag's last occurrence, as the values are (Go: the last value wins).
    assert line == "--client-port=9999 (no proxy); --omlx-bin=/o, --omlx-port=8001 (no oMLX)"


# -- `metal-agent run` itself, as launchd starts it -----------------------------------------------


@pytest.fixture
def restore_logging():
    """`run` configures logging onto the test runner's stderr, closed after each invocation: put it back."""
    import logging

    import structlog

    saved, handlers = structlog.get_config(), list(logging.root.handlers)
    yield
    structlog.configure(**saved)
    for handler in logging.root.handlers[:]:
        if handler not in handlers:
            logging.root.removeHandler(handler)


@pytest.fixture
def started(monkeypatch, restore_logging):
    """Run `metal-agent run ARGV` in-process; returns (result, the AgentConfig the agent got, or None)."""
    import metal_agent.app.manager as agent_module

    seen = []

    async def fake_run_agent(cfg):
        seen.append(cfg)

    monkeypatch.setattr(agent_module, "run_agent", fake_run_agent)

    def start(*argv: str):
        result = CliRunner().invoke(app, ["run", *argv])
        return result, (seen[-1] if seen else None)

    return start


def published_plist_args() -> list[str]:
    import plistlib

    job = plistlib.loads(_tar_member("deployment/macos/com.llmkube.metal-agent.plist").encode())
    return job["ProgramArguments"][1:]


def test_the_go_agents_published_plist_starts_this_agent(started):
    args = published_plist_args()
    assert "--model-store" in args and "--port" in args  # the published job, as its users run it
    result, cfg = started(*args, "--log-format", "json")
    assert result.exit_code == 0, result.output
    assert cfg.kube.namespaces == ("default",)
    assert str(cfg.paths.models) == "/tmp/llmkube-models"
    assert cfg.engines.llama_server == "/opt/homebrew/bin/llama-server"
    assert (cfg.http.host, cfg.http.port) == ("127.0.0.1", 9090)
    assert "ignoring flags" not in result.output  # nothing in it is ignored


def test_the_issues_go_job_starts_this_agent_and_names_what_is_ignored_once(started):
    result, cfg = started(
        "--namespace", "llm", "-model-store=/tmp/llmkube-models", "--llama-server", "/opt/homebrew/bin/llama-server",
        "--port", "9091", "--apple-power-enabled", "--apple-power-interval", "2s", "--inference-service-allowlist",
        "a,b", "--memory-fraction", "0.8", "--eviction-enabled", "--omlx-port", "8000", "--client-port=9999",
        "--omlx-port", "8001", "--log-format", "json")
    assert result.exit_code == 0, result.output
    assert cfg.power.enabled is True and cfg.power.interval_ms == 2000
    assert cfg.controller.allowlist == ("a", "b") and cfg.memory.fraction == 0.8 and cfg.memory.eviction is True
    assert cfg.http.port == 9091 and cfg.kube.namespaces == ("llm",)
    warnings = [json.loads(line) for line in result.output.splitlines() if "ignoring flags" in line]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning" and warnings[0]["flags"] == ["omlx-port"]
    assert "--omlx-port=8001" in warnings[0]["event"] and "client-port" not in warnings[0]["event"]
    assert cfg.front_door.client_port == 9999


def test_a_client_port_asked_for_without_the_front_door_is_said_to_be_unserved(started):
    llama = ("--llama-server", "/opt/homebrew/bin/llama-server")
    result, cfg = started(*llama, "--client-port", "8088", "--no-front-door")
    assert result.exit_code == 0, result.output
    assert "--client-port 8088 is not served with --no-front-door" in result.output
    result, cfg = started(*llama, "--no-front-door")  # the default port, not asked for: nothing to say
    assert result.exit_code == 0 and "not served" not in result.output
    result, cfg = started(*llama, "--client-port", "8088")  # on by default: served
    assert "not served" not in result.output and cfg.front_door.enabled and cfg.front_door.client_port == 8088


def test_a_value_go_would_refuse_is_a_usage_error(started):
    result, cfg = started("--apple-power-interval", "1")
    assert result.exit_code == 2 and cfg is None
    assert "missing unit" in result.output and "-apple-power-interval" in result.output


def test_run_version_is_the_go_agents_version_flag(started):
    result, cfg = started("-version")
    assert result.exit_code == 0 and result.output.startswith("metal-agent ") and cfg is None


def test_a_malformed_allowlist_entry_is_refused(started):
    result, cfg = started("--inference-service-allowlist", "a/b/c")
    assert result.exit_code == 2 and cfg is None and "NAMESPACE/NAME" in result.output


# -- `metal-agent migrate`: a whole Go command line ------------------------------------------------


def test_a_go_command_line_as_the_go_binary_read_it():
    cmdline = parse_go_argv(["--port", "1", "-port=2", "--apple-power-enabled", "stop", "--port", "3"])
    assert dict(cmdline.values) == {"port": "2", "apple-power-enabled": "true"}  # the last value wins
    assert cmdline.unread == ("stop", "--port", "3")  # Go stops at the first non-flag
    assert cmdline.value("model-store") == "/tmp/llmkube-models"  # the Go default
    assert parse_go_argv(["--", "--port", "1"]).unread == ("--port", "1")


@pytest.mark.parametrize(("argv", "message"), [
    (["--no-such"], "flag provided but not defined: -no-such"),
    (["---port", "1"], "bad flag syntax"),
    (["--port"], "flag needs an argument"),
    (["--port", "x"], "invalid value 'x' for flag -port"),
])
def test_a_command_line_the_go_agent_refused(argv, message):
    with pytest.raises(GoFlagError, match=message):
        parse_go_argv(argv)


def test_translate_writes_out_the_go_defaults_that_differ_from_ours():
    # No --namespace: the Go agent watched `default`; no --apple-power-enabled: it sampled no power.
    assert translate(parse_go_argv(["--port", "9090"])).args == (
        "--namespace=default", "--no-power", "--listen=127.0.0.1:9090")
    assert translate(parse_go_argv(["--namespace", "", "--apple-power-enabled"])).args == ("--power",)
    assert translate(parse_go_argv(["--port", "1"]), skip=("namespace", "port", "apple-power-enabled")).args == ()


# -- the allowlist decides the claim ----------------------------------------------------------------


def test_an_empty_allowlist_claims_every_metal_service():
    assert claim(isvc_doc(name="chat"), model_doc(), Allowlist()) == Ours()


def test_the_allowlist_leaves_other_services_to_other_macs():
    allow = Allowlist.parse(["chat, team/coder", ""])
    assert allow.entries == ("chat", "team/coder")
    assert claim(isvc_doc(name="chat", namespace="any"), model_doc(namespace="any"), allow) == Ours()
    assert claim(isvc_doc(name="coder", namespace="team"), model_doc(namespace="team"), allow) == Ours()
    other = claim(isvc_doc(name="coder", namespace="default"), model_doc(), allow)
    assert isinstance(other, NotOurs) and "--inference-service-allowlist" in other.reason
    # evaluate (the reconciler's call) applies it before validation: another Mac's invalid spec is not ours to report.
    assert isinstance(evaluate(isvc_doc(name="x", contextSize=-1), model_doc(), allow), NotOurs)
    assert isinstance(evaluate(isvc_doc(name="chat"), model_doc(), allow), Parsed)


@pytest.mark.parametrize("entry", ["a/b/c", "/b", "a/"])
def test_malformed_allowlist_entries(entry):
    with pytest.raises(ValueError):
        Allowlist.parse([entry])
