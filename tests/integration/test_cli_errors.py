"""`metal-agent run` refuses bad configuration with one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metal_agent", "run", "--no-power", *args],
                          capture_output=True, text=True, timeout=60)


def assert_clear_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr


def test_missing_llama_server(tmp_path):
    result = run("--llama-server", str(tmp_path / "nope"), "--host-ip", "127.0.0.1", "--no-register")
    assert_clear_error(result, "llama-server not found", "brew install llama.cpp")


def test_unloadable_kubeconfig(llama_server_bin, tmp_path):
    bad = tmp_path / "kubeconfig"
    bad.write_text("this: is: not: a kubeconfig")
    result = run("--llama-server", str(llama_server_bin), "--kubeconfig", str(bad), "--host-ip", "127.0.0.1",
                 "--no-register", "--state-dir", str(tmp_path / "s"), "--log-dir", str(tmp_path / "l"),
                 "--model-dir", str(tmp_path / "m"))
    assert_clear_error(result, "cannot load kubeconfig", str(bad))


def test_busy_listen_address(llama_server_bin, control_plane, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("--llama-server", str(llama_server_bin), "--kubeconfig", str(control_plane.agent_kubeconfig),
                     "--host-ip", "127.0.0.1", "--no-register", "--listen", f"127.0.0.1:{port}",
                     "--state-dir", str(tmp_path / "s"), "--log-dir", str(tmp_path / "l"),
                     "--model-dir", str(tmp_path / "m"))
    assert_clear_error(result, f"cannot listen on 127.0.0.1:{port}", "--listen")


@pytest.mark.parametrize("address", ["127.0.0.1", "not-an-ip", "169.254.0.9"])
def test_unregistrable_host_ip(address):
    result = run("--host-ip", address)
    assert_clear_error(result, "--host-ip")
