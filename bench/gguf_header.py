"""CPU time of the agent's GGUF header read on hostile and honest headers.

Every shape runs in its own child process (so one that never ends can be
stopped and counted as missed) through the agent's own path,
`core.engines.llama_server.read_header`, over an in-memory model file: the
header, then zeros (what tensor data looks like to a parser). CPU time is the
child's process time around that one call.

    .venv/bin/python bench/gguf_header.py [--timeout 60] [--label after] [--only NAME]

Goals (issue 20): the 20,000-element nested-array header with a 64 KiB key
parses in under 50 ms; no header of up to 128 MiB costs more than 1 s of CPU.
Prints a table, writes bench/results/gguf_header.json, exits 1 if a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import gguf_forge  # noqa: E402

MiB = 1 << 20
ISSUE_CASE = "issue 20: 20,000 nested arrays, 64 KiB key"
ISSUE_GOAL_S = 0.050
ANY_GOAL_S = 1.0
SIZES = (8 * MiB, 128 * MiB)


class BytesModel:
    """A `ModelReader` over bytes in memory, followed by `tail` zero bytes."""

    where = "<memory>"

    def __init__(self, data: bytes, tail: int) -> None:
        self.data = data + bytes(tail)  # built before the clock starts; a read is then one copy, as from a file
        self.total = len(self.data)

    def explain(self, err: OSError) -> str:
        return str(err)

    def names(self) -> list[str]:
        return [""]

    def size(self, name: str) -> int:
        return self.total

    def read(self, name: str, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]


def honest_vocab() -> bytes:
    """A header shaped like a big real one: 262,144 tokens, scores, types, 514,906 merges."""
    f = gguf_forge
    tokens = [b"tok%d" % i for i in range(262_144)]
    merges = [b"m%d n%d" % (i, i) for i in range(514_906)]
    return f.header([
        *f.llama_header(layers=32, embd=4096, heads=32, kv_heads=8),
        f.kv("tokenizer.ggml.tokens", f.ARRAY, f.array_head(f.STRING, len(tokens)) + b"".join(map(f.string, tokens))),
        f.kv("tokenizer.ggml.scores", f.ARRAY, f.array_head(f.F32, len(tokens)) + b"\x00" * 4 * len(tokens)),
        f.kv("tokenizer.ggml.token_type", f.ARRAY, f.array_head(f.I32, len(tokens)) + b"\x01\x00\x00\x00" * len(tokens)),
        f.kv("tokenizer.ggml.merges", f.ARRAY, f.array_head(f.STRING, len(merges)) + b"".join(map(f.string, merges))),
        f.kv("tokenizer.chat_template", f.STRING, f.string("{{ x }}" * 10_000)),
    ])


def build(name: str, size: int) -> bytes:
    if name == ISSUE_CASE:
        return gguf_forge.nested_key_attack(20_000, 65_535)
    if name == "honest: 262k vocab + 515k merges":
        return honest_vocab()
    return gguf_forge.SHAPES[name](size)


def cases() -> list[tuple[str, int]]:
    out = [(ISSUE_CASE, 0), ("honest: 262k vocab + 515k merges", 0)]
    out += [(name, size) for name in gguf_forge.SHAPES for size in SIZES]
    return out


def child(name: str, size: int) -> None:
    from metal_agent.core.engines.llama_server import read_header
    from metal_agent.core.gguf_header import GGUFError

    data = build(name, size)
    model = BytesModel(data, tail=len(data) + 64 * MiB)
    started = time.process_time()
    header, _ = read_header(model)
    cpu = time.process_time() - started
    outcome = f"error: {header.message}" if isinstance(header, GGUFError) else f"parsed {len(header.metadata)} keys"
    print(json.dumps({"cpu_s": cpu, "bytes": len(data), "outcome": outcome[:160]}))


def run(name: str, size: int, timeout: float) -> dict:
    row = {"case": name, "size_mib": size // MiB if size else None}
    try:
        done = subprocess.run([sys.executable, __file__, "--child", name, str(size)], capture_output=True,
                              text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**row, "cpu_s": None, "bytes": None, "outcome": f"did not finish in {timeout:.0f} s (stopped)"}
    if done.returncode != 0:
        return {**row, "cpu_s": None, "bytes": None, "outcome": f"crashed: {done.stderr.strip()[-300:]}"}
    return {**row, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, default=60.0, help="wall seconds per case before it is stopped")
    ap.add_argument("--label", default="current")
    ap.add_argument("--only", default=None, help="run the cases whose name contains this")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0

    rows, missed = [], []
    print(f"{'case':<44} {'size':>8} {'CPU s':>9} {'goal':>7}  outcome")
    for name, size in cases():
        if args.only and args.only not in name:
            continue
        row = run(name, size, args.timeout)
        goal = ISSUE_GOAL_S if name == ISSUE_CASE else ANY_GOAL_S
        row["goal_s"] = goal
        row["met"] = row["cpu_s"] is not None and row["cpu_s"] < goal
        if not row["met"]:
            missed.append(row)
        rows.append(row)
        shown_size = f"{size // MiB} MiB" if size else f"{(row['bytes'] or 0) / MiB:.1f} MiB"
        cpu = f"{row['cpu_s']:.3f}" if row["cpu_s"] is not None else "-"
        print(f"{name:<44} {shown_size:>8} {cpu:>9} {goal:>7.3f}  {'ok  ' if row['met'] else 'MISS'} {row['outcome']}",
              flush=True)
    out = REPO / "bench" / "results" / "gguf_header.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"label": args.label, "rows": rows, "missed": len(missed)}, indent=2))
    print(f"\n{len(rows) - len(missed)}/{len(rows)} goals met; wrote {out.relative_to(REPO)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
