"""Where `make dev` cached the real parts a bench runs (kube-apiserver, etcd, llama-server, …).

Benches never build: each asks the build script for its cached output with
METAL_AGENT_NO_BUILD set, and stops with a clear line when `make dev` has not run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cached(script: str) -> Path:
    """The cached output of `scripts/<script>` (exit with a message if it was never built)."""
    out = subprocess.run(["bash", str(REPO / "scripts" / script)], env=dict(os.environ, METAL_AGENT_NO_BUILD="1"),
                         capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(f"{script}: nothing cached; run `make dev` first")
    return Path(out.stdout.strip())
