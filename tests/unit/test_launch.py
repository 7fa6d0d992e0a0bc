"""The one launch type: the agent's settings name each engine's command, and refuse programming errors."""

from __future__ import annotations

from dataclasses import replace

import pytest

from metal_agent.core.engine_name import EngineName
from metal_agent.core.launch import Instance, LaunchSettings

SETTINGS = LaunchSettings(llama_server="/opt/homebrew/bin/llama-server", mlx_server=("/venv/bin/python3", "/venv/bin/mlx_lm.server"))


def test_each_engine_has_its_command_and_a_missing_one_is_empty():
    assert SETTINGS.command(EngineName.LLAMA_SERVER) == ("/opt/homebrew/bin/llama-server",)
    assert SETTINGS.command(EngineName.MLX_LM) == ("/venv/bin/python3", "/venv/bin/mlx_lm.server")
    assert LaunchSettings(llama_server="llama-server").command(EngineName.MLX_LM) == ()


def test_an_address_move_keeps_everything_else():
    moved = replace(SETTINGS, host="100.64.0.2", register_address="100.64.0.2")
    assert (moved.host, moved.register_address) == ("100.64.0.2", "100.64.0.2")
    assert replace(moved, host=SETTINGS.host, register_address=None) == SETTINGS


@pytest.mark.parametrize("bad", [
    {"llama_server": ""}, {"mlx_server": ("/venv/bin/python3", "mlx\x00server")}, {"host": ""}, {"threads": 0},
], ids=["no-binary", "nul-in-mlx-command", "no-host", "threads-0"])
def test_settings_refuse_programming_errors(bad):
    with pytest.raises(ValueError):
        replace(SETTINGS, **bad)


@pytest.mark.parametrize("bad", [
    {"port": 0}, {"port": 65536}, {"model_path": ""}, {"draft_model_path": ""}, {"draft_model_path": "/d\x00"},
], ids=["port-0", "port-too-big", "no-model", "empty-draft", "nul-in-draft"])
def test_an_instance_refuses_programming_errors(bad):
    with pytest.raises(ValueError):
        Instance(**({"model_path": "/m.gguf", "port": 8080} | bad))
