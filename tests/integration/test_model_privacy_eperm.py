"""A model file the kernel refuses to open: the agent's condition says why and what to do.

On a Mac, TCC answers EPERM for ~/Downloads & co. under launchd; Linux has
no TCC, but the same code path runs on a real PermissionError from the
kernel: a file in a directory the agent's user may not search (EACCES).
As root (CI) the lookup runs in a forked child that has become `nobody`,
for whom root's directories are closed; as anyone else the directory is
made unreadable for this very user. Nothing here fakes the error.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from metal_agent.adapters.local_models import read_gguf_header
from metal_agent.adapters.model_files import ModelFiles, ModelReady
from metal_agent.core.api import Model, ModelSource, ModelSpec, ObjectMeta, SourceKind
from metal_agent.core.status import Blocker

pytestmark = pytest.mark.integration


def as_agent_user(fn: Callable[[], dict]) -> dict:
    """Run `fn` as a user without root's powers and return its JSON-able result.

    Root: fork, become `nobody`, run, report through a pipe (the interpreter
    is already loaded, so it need not be reachable by `nobody`). Others: run here.
    """
    if os.geteuid() != 0:
        return fn()
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            with os.fdopen(write_end, "w") as out:
                json.dump(fn(), out)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child running as nobody failed"
    return json.loads(data)


@pytest.fixture
def home(monkeypatch) -> Iterator[Path]:
    """A home whose folders root owns: searchable by all (0755) unless a test closes one."""
    top = Path(tempfile.mkdtemp(prefix="metal-agent-tcc-"))
    top.chmod(0o755)
    home = top / "home"
    home.mkdir()
    home.chmod(0o755)
    monkeypatch.setenv("HOME", str(home))  # Path.home(): where the agent user's ~/Downloads is
    try:
        yield home
    finally:
        for directory, _, _ in os.walk(top):
            os.chmod(directory, 0o755)
        shutil.rmtree(top)


def model_in(home: Path, folder: str, *, closed_dir: bool = True) -> Path:
    """A GGUF at ~/<folder>/qwen.gguf that the agent user may not read: the folder is closed
    (0700, or 0o000 for a non-root user, who owns it), or else the file itself is (0600)."""
    directory = home / folder
    directory.mkdir(parents=True)
    path = directory / "qwen.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    if closed_dir:
        directory.chmod(0o700 if os.geteuid() == 0 else 0o000)
    else:
        directory.chmod(0o755)
        path.chmod(0o600 if os.geteuid() == 0 else 0o000)
    return path


def lookup(path: Path, cache: Path) -> dict:
    """What the reconciler gets for a file:// Model at `path`, and what the memory estimate reads."""
    model = Model(ObjectMeta("llm", "qwen"), ModelSpec(source=ModelSource(f"file://{path}", SourceKind.FILE)))
    found = ModelFiles(cache).lookup(model)
    header, _ = read_gguf_header(path)
    return {"type": type(found).__name__, "reason": getattr(found, "reason", None),
            "message": getattr(found, "message", None), "header": getattr(header, "message", None)}


@pytest.mark.parametrize("folder", ["Downloads", "Documents", "Desktop"])
def test_protected_folder_names_tcc_and_both_fixes(home: Path, tmp_path: Path, folder: str):
    path = model_in(home, folder)
    result = as_agent_user(lambda: lookup(path, tmp_path / "cache"))
    assert result["type"] == Blocker.__name__ and result["reason"] == "ModelUnreadable"
    message = result["message"]
    assert message.startswith(f"model file {path}: Permission denied: ~/{folder} is protected by "
                              "macOS privacy protection (TCC)")
    assert f"move the model out of ~/{folder}" in message and "Full Disk Access" in message
    assert "the agent's Python (" in message and "llama-server" in message
    # The memory estimate reads the header: the same explanation there.
    assert f"cannot read {path}: Permission denied: ~/{folder} is protected" in result["header"]


def test_a_file_the_agent_cannot_open_is_caught_before_llama_server(home: Path, tmp_path: Path):
    """stat() works (the folder is open), open() does not: the lookup must not call it ready."""
    path = model_in(home, "Downloads", closed_dir=False)
    result = as_agent_user(lambda: lookup(path, tmp_path / "cache"))
    assert result["type"] == Blocker.__name__
    assert "~/Downloads is protected by macOS privacy protection (TCC)" in result["message"]


def test_elsewhere_it_is_a_plain_permission_problem(home: Path, tmp_path: Path):
    path = model_in(home, "models")
    result = as_agent_user(lambda: lookup(path, tmp_path / "cache"))
    assert result["type"] == Blocker.__name__
    assert result["message"] == f"model file {path} is not readable by the agent's user: Permission denied"
    assert "TCC" not in result["message"]


def test_readable_model_in_downloads_is_ready(home: Path, tmp_path: Path):
    """Being in ~/Downloads is not an error in itself: only a refused open is."""
    directory = home / "Downloads"
    directory.mkdir()
    directory.chmod(0o755)
    path = directory / "qwen.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    path.chmod(0o644)
    result = as_agent_user(lambda: lookup(path, tmp_path / "cache"))
    assert result["type"] == ModelReady.__name__
