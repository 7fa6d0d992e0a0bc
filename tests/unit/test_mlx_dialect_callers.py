"""Every caller of `evaluate` that decides about a service judges it against the installed mlx-lm,
as the reconciler does: the fleet's demand (a Mac must not bid for what it would refuse), the
start-up sweep, and `metal-agent render` (which probes the server as the agent does)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from typer.testing import CliRunner

from metal_agent.cli.main import app
from metal_agent.controller.cleanup import Sweep
from metal_agent.core.launch import LaunchSettings
from metal_agent.core.spec_policy import SpecPolicy
from metal_agent.fleet.demand import Demand
from metal_agent.fleet.settings import FleetSettings
from tests.support.fleet_fakes import FakeModelFiles, Store
from tests.support.manifests import isvc_doc, model_doc
from tests.unit.test_mlx_dialect import HELP_0_30_5, OLD, SOURCE

CURRENT = LaunchSettings(llama_server="llama-server", mlx_server=("/venv/bin/python3", "/venv/bin/mlx_lm.server"))
OLD_MLX = replace(CURRENT, mlx_dialect=OLD)
SAMPLE = Path(__file__).resolve().parents[2] / "manifests" / "samples" / "mlx.yaml"


def stores(source: str = SOURCE, **spec) -> tuple[Store, Store]:
    isvcs, models = Store(), Store()
    isvcs["default/chat"] = isvc_doc(**spec)
    models["default/tiny"] = model_doc(format="mlx", source=source)
    return isvcs, models


def demand(launch: LaunchSettings | None, **spec) -> Demand:
    isvcs, models = stores(**spec)
    return Demand(FleetSettings(member="a", launch=launch), isvcs=isvcs, models=models, model_files=FakeModelFiles())


def test_a_mac_whose_mlx_lm_is_too_old_does_not_count_the_service_as_demand():
    assert [w.key for w, _ in demand(CURRENT, parallelSlots=2).wanted_services()] == ["default/chat"]
    assert demand(None, parallelSlots=2).wanted_services() != []  # not probed: a current server assumed
    assert demand(OLD_MLX, parallelSlots=2).wanted_services() == []
    assert demand(OLD_MLX, parallelSlots=1).replicas_now("default/chat") == 1  # what it can run, it bids for


class _NoRecords:
    def has_record(self, key: str) -> bool:
        return False


def sweep(tmp_path: Path, launch: LaunchSettings | None, **spec) -> Sweep:
    isvcs, models = stores(str(tmp_path / "Qwen3-4B-4bit"), **spec)  # in the model roots: not refused for that
    return Sweep(isvcs=isvcs, models=models, processes=_NoRecords(), publisher=None, managed={"default/chat": object()},
                 default_engine="llama-server", policy=SpecPolicy(model_roots=(str(tmp_path),)), launch=launch)


def test_the_sweep_keeps_a_process_the_reconcile_keeps_when_the_installed_mlx_lm_refuses_the_new_spec(tmp_path):
    # Scaled to zero with a spec this mlx-lm cannot run: the reconcile (which knows the server) finds it
    # invalid and keeps the running process on its last valid spec; the sweep must not stop it.
    assert sweep(tmp_path, OLD_MLX, replicas=0, parallelSlots=2).wanted("default/chat") is True
    assert sweep(tmp_path, CURRENT, replicas=0, parallelSlots=2).wanted("default/chat") is False


def old_server(tmp_path: Path) -> Path:
    """A stand-in for an mlx_lm.server of mlx-lm 0.30.5: its --help is that release's."""
    script = tmp_path / "mlx_lm.server"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{HELP_0_30_5}EOF\n")
    script.chmod(0o755)
    return script


def test_render_refuses_what_the_probed_mlx_lm_is_too_old_for(tmp_path):
    result = CliRunner().invoke(app, ["render", "-f", str(SAMPLE), "--mlx-server", str(old_server(tmp_path))])
    assert result.exit_code == 2
    assert "spec.parallelSlots" in result.stderr and "needs mlx-lm 0.30.6" in result.stderr


def test_render_prints_the_command_line_the_probed_mlx_lm_can_parse(tmp_path):
    doc = SAMPLE.read_text().replace("parallelSlots: 2", "parallelSlots: 1")
    assert doc != SAMPLE.read_text()
    (tmp_path / "one-slot.yaml").write_text(doc)
    script = old_server(tmp_path)
    result = CliRunner().invoke(app, ["render", "-f", str(tmp_path / "one-slot.yaml"), "--mlx-server", str(script)])
    assert result.exit_code == 0, result.output
    argv = json.loads(result.stdout)
    assert argv[0] == "/bin/sh" and "--model" in argv  # the probed interpreter, not python3
    assert not {"--decode-concurrency", "--prompt-cache-size", "--prefill-step-size"} & set(argv)
