"""`metal-agent migrate` on the Go agent's published plist and a model store laid out like its own.

The Go agent keeps a model at `<store>/<Model name>/<filepath.Base(spec.source)>`
(pkg/agent/executor.go, ensureModel); ours at `<model dir>/<sha256(url)[:16]>/<file>`.
These tests build the Go layout by hand, run the real command in-process
(with the cluster's Model list given directly: the integration test reads it
from a real API server), and check the files on disk: the same inode after a
hard link, the bytes after a move across filesystems, nothing changed by a
dry run or a failure, and the written job. That our agent then finds the file
without a request is checked with the real model store against a URL where
nothing listens.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import metal_agent.cli.migrate as migrate_cli
from metal_agent.cli.main import app
from metal_agent.core.result import Parsed
from metal_agent.core.model_validation import parse_model
from metal_agent.adapters.go_migration import (
    GoJob,
    MigrationError,
    adopt,
    go_file_name,
    is_temporary,
    job_settings,
    parse_go_argv,
    plan_adoptions,
    scan_store,
)
from tests.support.manifests import model_doc
from tests.unit.test_go_flags import _tar_member, restore_logging  # noqa: F401 - a fixture

URL = "https://models.example/org/repo/resolve/main/qwen-q4.gguf"
URL_WITH_QUERY = "https://models.example/m/tiny.gguf?download=true"
HEAVY = ("kubernetes_asyncio", "aiohttp", "structlog", "prometheus_client", "psutil", "yaml", "metal_agent.app.manager")


def published_job() -> dict:
    return plistlib.loads(_tar_member("deployment/macos/com.llmkube.metal-agent.plist").encode())


def model(name: str, source: str, namespace: str = "default", **spec) -> dict:
    return model_doc(name=name, namespace=namespace, source=source, **spec)


def parsed(doc: dict):
    outcome = parse_model(doc)
    assert isinstance(outcome, Parsed), outcome
    return outcome.value


class Mac:
    """A home with the Go agent's job (the published plist, its store moved under tmp) and a Go-layout store."""

    def __init__(self, tmp_path: Path, store: Path | None = None) -> None:
        self.home = tmp_path / "home"
        self.store = store or tmp_path / "llmkube-models"
        self.plist = self.home / "Library" / "LaunchAgents" / "com.llmkube.metal-agent.plist"
        self.models_dir = tmp_path / "our-models"
        self.state = tmp_path / "state"
        self.logs = tmp_path / "logs"
        self.kubeconfig = tmp_path / "kubeconfig"
        self.kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
        self.plist.parent.mkdir(parents=True)
        self.write_job(lambda args: args)

    def write_job(self, edit) -> None:
        job = published_job()
        args = job["ProgramArguments"]
        args[args.index("--model-store") + 1] = str(self.store)
        job["ProgramArguments"] = [args[0], *edit(args[1:])]
        self.plist.write_bytes(plistlib.dumps(job))

    def store_file(self, model_name: str, file_name: str, data: bytes) -> Path:
        path = self.store / model_name / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def job(self) -> dict:
        return plistlib.loads(self.plist.read_bytes())

    def migrate(self, monkeypatch, models: list[dict] | Exception, *args: str):
        """The real command, in-process; the cluster's Models are `models` (or listing them raises it)."""
        async def list_models(kubeconfig, context, namespaces):
            if isinstance(models, Exception):
                raise models
            return [m for m in models if not namespaces or m["metadata"]["namespace"] in namespaces]

        monkeypatch.setattr(migrate_cli, "_list_models", list_models)
        monkeypatch.setenv("HOME", str(self.home))
        return CliRunner().invoke(app, [
            "migrate", "--plist", str(self.plist), "--model-dir", str(self.models_dir), "--state-dir", str(self.state),
            "--log-dir", str(self.logs), "--agent-path", sys.executable, "--kubeconfig", str(self.kubeconfig), *args])


@pytest.fixture
def mac(tmp_path: Path) -> Mac:
    return Mac(tmp_path)


def our_path(models_dir: Path, doc: dict) -> Path:
    from metal_agent.adapters.model_cache import CachePaths

    source = parsed(doc).spec.source
    return CachePaths.for_url(models_dir, source.raw, source.file_name).final


# -- the whole command ----------------------------------------------------------------------


def test_published_job_and_store_are_migrated(mac: Mac, monkeypatch):
    original = mac.store_file("qwen", "qwen-q4.gguf", b"GGUF qwen weights")
    docs = [model("qwen", URL)]
    result = mac.migrate(monkeypatch, docs)
    assert result.exit_code == 0, result.output

    target = our_path(mac.models_dir, docs[0])
    assert target.read_bytes() == b"GGUF qwen weights"
    assert os.path.samefile(target, original)  # a hard link: no bytes copied, the Go agent's copy intact
    assert f"link     default/qwen: {original} -> {target}" in result.output
    assert "adopted 1 model file(s): 1 hard-linked, 0 moved, 0 already in place" in result.output

    job = mac.job()
    assert job["Label"] == "com.llmkube.metal-agent"
    args = job["ProgramArguments"]
    assert args[:2] == [sys.executable, "run"]
    assert args[args.index("--namespace") + 1] == "default"  # the published job's
    assert args[args.index("--llama-server") + 1] == "/opt/homebrew/bin/llama-server"
    assert args[args.index("--kubeconfig") + 1] == str(mac.kubeconfig)
    assert {"--listen=127.0.0.1:9090", "--log-level=info", f"--model-dir={mac.models_dir}", "--no-power"} <= set(args)
    assert not any("model-store" in a or a == "--port" for a in args)
    assert (mac.state / "llmkube-go-agent.plist").read_bytes().startswith(b"<?xml")  # kept for a rollback
    assert plistlib.loads((mac.state / "llmkube-go-agent.plist").read_bytes())["ProgramArguments"][0] \
        == "/usr/local/bin/llmkube-metal-agent"
    assert "launchctl bootout" in result.output


def test_the_written_job_starts_our_agent_on_the_adopted_models(mac: Mac, monkeypatch, restore_logging):
    import metal_agent.app.manager as agent_module

    mac.store_file("qwen", "qwen-q4.gguf", b"w")
    assert mac.migrate(monkeypatch, [model("qwen", URL)]).exit_code == 0
    seen = []

    async def fake_run_agent(cfg):
        seen.append(cfg)

    monkeypatch.setattr(agent_module, "run_agent", fake_run_agent)
    result = CliRunner().invoke(app, mac.job()["ProgramArguments"][1:])
    assert result.exit_code == 0, result.output
    assert seen[0].paths.models == mac.models_dir and seen[0].kube.namespaces == ("default",)
    assert seen[0].kube.kubeconfig == str(mac.kubeconfig) and seen[0].http.port == 9090


def test_a_go_job_with_the_swift_mlx_server_is_told_what_runs_mlx_instead(mac: Mac, monkeypatch):
    mac.write_job(lambda args: [*args, "--runtime", "mlx-server", "--mlx-server-bin", "/opt/homebrew/bin/mlx-server"])
    result = mac.migrate(monkeypatch, [])
    assert result.exit_code == 0, result.output
    args = mac.job()["ProgramArguments"]
    assert "--default-runtime=mlx-lm" in args and not any("mlx-server" in a for a in args)  # never handed our flags
    [ignored] = [line for line in result.output.splitlines() if line.startswith("ignored")]
    assert "--mlx-server-bin=/opt/homebrew/bin/mlx-server (the Go agent's Swift mlx-server, not used" in ignored
    [note] = [line for line in result.output.splitlines() if line.startswith("note: MLX:")]
    assert "/opt/homebrew/bin/mlx-server (the Swift mlx-server) is not used" in note
    assert "pip install mlx-lm" in note and "--mlx-server PATH" in note and "RuntimeMissing" in note


def test_only_a_go_job_that_ran_mlx_gets_the_mlx_note():
    assert not any(n.startswith("MLX:") for n in job_settings(go_job([]), default_model_dir=Path("/d")).notes)
    [note] = [n for n in job_settings(go_job(["--runtime", "mlx-server"]), default_model_dir=Path("/d")).notes
              if n.startswith("MLX:")]
    assert "defilantech's mlx-server (the Swift mlx-server) is not used" in note


def test_a_dry_run_changes_nothing(mac: Mac, monkeypatch):
    original = mac.store_file("qwen", "qwen-q4.gguf", b"w")
    before = mac.plist.read_bytes()
    result = mac.migrate(monkeypatch, [model("qwen", URL)], "--dry-run")
    assert result.exit_code == 0, result.output
    assert "link     default/qwen" in result.output and "dry run: nothing was changed" in result.output
    assert mac.plist.read_bytes() == before
    assert not mac.models_dir.exists() and not mac.state.exists()
    assert os.stat(original).st_nlink == 1


def test_models_that_cannot_be_read_change_nothing(mac: Mac, monkeypatch):
    mac.store_file("qwen", "qwen-q4.gguf", b"w")
    before = mac.plist.read_bytes()
    result = mac.migrate(monkeypatch, ConnectionRefusedError("connection refused"))
    assert result.exit_code == 1
    assert "cannot read the Models (default)" in result.output and "--skip-models" in result.output
    assert "nothing was changed" in result.output
    assert mac.plist.read_bytes() == before and not mac.models_dir.exists()


def test_skip_models_migrates_only_the_job(mac: Mac, monkeypatch):
    original = mac.store_file("qwen", "qwen-q4.gguf", b"w")
    result = mac.migrate(monkeypatch, ConnectionRefusedError("not asked"), "--skip-models")
    assert result.exit_code == 0, result.output
    assert mac.job()["ProgramArguments"][1] == "run" and os.stat(original).st_nlink == 1


def test_what_no_model_names_stays_in_the_store_and_is_named(mac: Mac, monkeypatch):
    mac.store_file("qwen", "qwen-q4.gguf", b"w")
    orphan = mac.store_file("gone", "old.gguf", b"o")
    partial = mac.store_file("llama", "llama.gguf.partial", b"half")
    empty = mac.store_file("llama", "llama.gguf", b"")  # the Go agent re-downloads an empty file too
    log = mac.store_file("x", "y", b"")
    (mac.store / "vllm-swift-default-chat.log").write_text("log")
    result = mac.migrate(monkeypatch, [model("qwen", URL), model("llama", "https://h/llama.gguf")])
    assert result.exit_code == 0, result.output
    for path in (orphan, partial, empty, log, mac.store / "vllm-swift-default-chat.log"):
        assert f"left     {path}" in result.output and path.exists()
    assert not our_path(mac.models_dir, model("llama", "https://h/llama.gguf")).exists()


def test_the_go_file_name_keeps_a_query_ours_does_not(mac: Mac, monkeypatch):
    assert go_file_name(URL_WITH_QUERY) == "tiny.gguf?download=true"
    mac.store_file("tiny", "tiny.gguf?download=true", b"t")
    doc = model("tiny", URL_WITH_QUERY)
    assert mac.migrate(monkeypatch, [doc]).exit_code == 0
    target = our_path(mac.models_dir, doc)
    assert target.name == "tiny.gguf" and target.read_bytes() == b"t"


def test_a_model_already_in_our_cache_is_left_as_it_is(mac: Mac, monkeypatch):
    mac.store_file("qwen", "qwen-q4.gguf", b"go copy")
    doc = model("qwen", URL)
    target = our_path(mac.models_dir, doc)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"ours")
    result = mac.migrate(monkeypatch, [doc])
    assert result.exit_code == 0 and "in place default/qwen" in result.output
    assert target.read_bytes() == b"ours"


def test_already_migrated_is_nothing_to_do(mac: Mac, monkeypatch):
    assert mac.migrate(monkeypatch, []).exit_code == 0
    ours = mac.plist.read_bytes()
    check = CliRunner().invoke(app, ["migrate", "--check", "--plist", str(mac.plist)])
    assert check.exit_code == 1 and "already runs metal-agent" in check.output
    again = mac.migrate(monkeypatch, [])
    assert again.exit_code == 1 and mac.plist.read_bytes() == ours


def test_check_says_which_job_is_the_go_agents(mac: Mac, tmp_path: Path):
    assert CliRunner().invoke(app, ["migrate", "--check", "--plist", str(mac.plist)]).exit_code == 0
    missing = CliRunner().invoke(app, ["migrate", "--check", "--plist", str(tmp_path / "none.plist")])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_a_job_the_go_agent_would_refuse_is_not_migrated(mac: Mac, monkeypatch):
    mac.write_job(lambda args: [*args, "--port", "ninety"])
    before = mac.plist.read_bytes()
    result = mac.migrate(monkeypatch, [])
    assert result.exit_code == 1 and "would refuse its arguments" in result.output
    assert mac.plist.read_bytes() == before


def test_run_args_file_is_the_install_scripts_way(mac: Mac, monkeypatch, tmp_path: Path):
    mac.write_job(lambda args: [*args, "--apple-power-enabled", "--omlx-port", "8000"])
    out = tmp_path / "args"
    before = mac.plist.read_bytes()
    result = mac.migrate(monkeypatch, [], "--run-args-file", str(out), "--namespace", "llm")
    assert result.exit_code == 0, result.output
    # --namespace given: it replaces the Go job's.
    assert out.read_text().splitlines() == [
        "--listen=127.0.0.1:9090", "--log-level=info", "--power", f"--model-dir={mac.models_dir}",
        f"--kubeconfig={mac.kubeconfig}", "--namespace=llm", "--llama-server=/opt/homebrew/bin/llama-server"]
    assert mac.plist.read_bytes() == before  # the script writes the job
    assert "ignored (metal-agent has no use for them): --omlx-port=8000" in result.output


def test_migrate_help_loads_nothing_heavy():
    probe = ("import sys; from typer.testing import CliRunner; import metal_agent.cli.main as m; "
             "r = CliRunner().invoke(m.app, ['migrate', '--help']); assert r.exit_code == 0, r.output; "
             f"print(sorted(x for x in {HEAVY!r} if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# -- the pieces ------------------------------------------------------------------------------


def go_job(args: list[str], env: dict[str, str] | None = None) -> GoJob:
    return GoJob(Path("/x.plist"), ("/usr/local/bin/llmkube-metal-agent", *args), parse_go_argv(args), env or {})


def test_a_store_the_user_chose_stays_our_model_directory():
    kept = job_settings(go_job(["--model-store", "/Volumes/Models/llmkube"]), default_model_dir=Path("/d"))
    assert kept.model_dir == Path("/Volumes/Models/llmkube")
    moved = job_settings(go_job([]), default_model_dir=Path("/d"))  # the Go default, /tmp/llmkube-models
    assert moved.model_dir == Path("/d") and any("/tmp/llmkube-models" in n for n in moved.notes)
    assert is_temporary(Path("/private/tmp/x")) and not is_temporary(Path("/tmpfoo/x"))


def test_a_relative_store_is_where_the_go_agent_had_it():
    job = GoJob(Path("/x.plist"), ("/bin/agent", "--model-store", "models"), parse_go_argv(["--model-store", "models"]),
                {}, working_directory="/Users/me")  # the published job's WorkingDirectory is /tmp
    assert job.store == Path("/Users/me/models")


def test_the_go_jobs_kubeconfig_comes_from_its_flag_or_its_environment():
    assert job_settings(go_job([], {"KUBECONFIG": "/k1"}), default_model_dir=Path("/d")).kubeconfig == "/k1"
    assert job_settings(go_job(["-kubeconfig", "/k2"], {"KUBECONFIG": "/k1"}),
                        default_model_dir=Path("/d")).kubeconfig == "/k2"
    several = job_settings(go_job([], {"KUBECONFIG": "/a:/b"}), default_model_dir=Path("/d"))
    assert several.kubeconfig is None and any("several files" in n for n in several.notes)
    assert job_settings(go_job([], {"KUBECONFIG": "/k1"}), default_model_dir=Path("/d"),
                        kubeconfig="/mine").kubeconfig == "/mine"


def test_a_file_two_namespaces_share_is_moved_once_and_linked_for_the_other(tmp_path: Path):
    store = tmp_path / "store"
    (store / "qwen").mkdir(parents=True)
    (store / "qwen" / "qwen-q4.gguf").write_bytes(b"w")
    a, b = parsed(model("qwen", URL, "team-a")), parsed(model("qwen", URL, "team-b"))
    plan = plan_adoptions(scan_store(store), [a, b], tmp_path / "ours")
    # Same URL, same target: the second is already planned there.
    assert [x.action for x in plan.adoptions] == ["link", "link"]
    assert plan.adoptions[1].source == plan.adoptions[0].target and plan.left == ()


@pytest.fixture
def other_filesystem(tmp_path: Path):
    """A directory on another filesystem than tmp_path (tmpfs /dev/shm), or skip."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) here")
    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="go-store-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_across_filesystems_the_file_is_moved_whole(other_filesystem: Path, tmp_path: Path):
    store = other_filesystem / "store"
    (store / "qwen").mkdir(parents=True)
    source = store / "qwen" / "qwen-q4.gguf"
    data = os.urandom(3 << 20)
    source.write_bytes(data)
    plan = plan_adoptions(scan_store(store), [parsed(model("qwen", URL))], tmp_path / "ours")
    [adoption] = plan.adoptions
    assert adoption.action == "move"
    adopt(adoption)
    assert adoption.target.read_bytes() == data and not source.exists()
    assert [p.name for p in adoption.target.parent.iterdir()] == ["qwen-q4.gguf"]  # no staging file left


def test_an_unlistable_store_is_an_error(tmp_path: Path):
    store = tmp_path / "store"
    store.write_text("not a directory")
    with pytest.raises(MigrationError):
        scan_store(store)


async def test_our_model_store_finds_the_adopted_file_without_a_request(tmp_path: Path):
    """The real lookup, against a URL where nothing listens: only a file already in place can make it Ready."""
    from metal_agent.adapters.model_files import ModelFiles, ModelReady
    from tests.support.ports import free_port
    from tests.support.wait import wait_for

    url = f"http://127.0.0.1:{free_port()}/models/qwen-q4.gguf"
    store = tmp_path / "store"
    (store / "qwen").mkdir(parents=True)
    (store / "qwen" / "qwen-q4.gguf").write_bytes(b"GGUF adopted")
    doc = parsed(model("qwen", url))
    [adoption] = plan_adoptions(scan_store(store), [doc], tmp_path / "ours").adoptions
    adopt(adoption)

    ready: list[str] = []
    files = ModelFiles(tmp_path / "ours", ready.append)
    try:
        files.lookup(doc, "default/chat")
        await wait_for(lambda: ready == ["default/chat"], timeout=10, what="the lookup to finish")
        answer = files.lookup(doc, "default/chat")
        assert answer == ModelReady(adoption.target, answer.sha256) and answer.sha256
    finally:
        await files.aclose()
