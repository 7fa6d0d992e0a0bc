"""`metal-agent fleet`'s table (cli/fleet.py), from the agent's `/v1/fleet` answer."""

from __future__ import annotations

from metal_agent.cli.fleet import columns, fleet_rows

VIEW = {
    "member": "mini", "cordoned": False,
    "members": [
        {"member": "mini", "alive": True, "cordoned": False, "chip": "Apple M4", "free_bytes": 3 << 30,
         "budget_bytes": 16 << 30, "holds": ["ml/chat#0"], "ready": ["ml/chat#0"]},
        {"member": "studio", "alive": False, "cordoned": False, "chip": "", "free_bytes": 0, "budget_bytes": 0,
         "holds": ["ml/big#0", "ml/big#1"], "ready": []},
        {"member": "laptop", "alive": True, "cordoned": True, "chip": "Apple M5 Max", "free_bytes": 40 << 30,
         "budget_bytes": 48 << 30, "holds": [], "ready": []},
    ],
}


def test_rows_say_health_holdings_and_memory():
    rows = fleet_rows(VIEW)
    assert rows[0] == ["MEMBER", "HEALTH", "CHIP", "FREE", "BUDGET", "HOLDS", "READY"]
    mini, studio, laptop = rows[1:]
    assert mini[:2] == ["mini (this Mac)", "ok"] and mini[5:] == ["ml/chat#0", "1"]
    assert studio[1] == "expired" and studio[2] == "-" and studio[5] == "ml/big#0, ml/big#1"
    assert laptop[1] == "cordoned" and laptop[5] == "-"
    assert fleet_rows({**VIEW, "members": [{**VIEW["members"][0], "alive": False}]})[1][1] == "fenced"


def test_columns_line_up():
    lines = columns([["A", "BB"], ["ccc", "d"]]).splitlines()
    assert lines == ["A    BB", "ccc  d"]
