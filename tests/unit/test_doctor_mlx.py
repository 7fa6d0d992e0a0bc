"""doctor's mlx_lm.server check: found and versioned, optional when absent, a failure when a given path is wrong."""

from __future__ import annotations

import sys
from importlib.metadata import version

from metal_agent.cli.doctor_base import Status
from metal_agent.cli.doctor_mlx import check_mlx_server


async def test_the_venvs_mlx_lm_server_is_found_with_its_version(tmp_path):
    script = tmp_path / "mlx_lm.server"
    script.write_text(f"#!{sys.executable}\nprint('never run by doctor')\n")
    script.chmod(0o755)
    result = await check_mlx_server(str(script))
    assert result.status is Status.OK
    assert result.detail == f"{sys.executable} {script} (mlx-lm {version('mlx-lm')})"


async def test_a_given_path_that_does_not_work_fails_with_the_fix(tmp_path):
    result = await check_mlx_server(str(tmp_path / "nope"))
    assert result.status is Status.FAIL and "not found or not executable" in result.detail
    assert "pip install mlx-lm" in result.fix


async def test_without_one_mlx_is_optional(monkeypatch):
    monkeypatch.setattr("metal_agent.adapters.mlx_binary.find_mlx_server", lambda explicit=None: None)
    result = await check_mlx_server(None)
    assert result.status is Status.SKIP and "MLX Models wait" in result.detail
