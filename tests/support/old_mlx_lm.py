"""An older mlx-lm's `mlx_lm.server` in a throw-away venv, for the version-dialect tests.

Why: the agent learns which options the installed mlx_lm.server accepts and
passes only those (`core.mlx_dialect`); only a real older release proves it.
0.30.5 is the last release before `--decode-concurrency` (0.30.6), and lacks
`--prompt-cache-size`, `--prefill-step-size` (0.31.0) and `--kv-bits` (0.32.0).

Cheap for a cold CI: the venv holds only the mlx-lm wheel (~370 kB) and the
MLX of its time (`MLX_OF`, ~11 MB: old mlx-lm cannot run on today's MLX), all
installed with `--no-deps`; transformers and the rest come from the test venv
through a `.pth` line that adds its site-packages after the venv's own, so the
old packages shadow the new ones and nothing else is downloaded. Cached under
`~/.cache/metal-agent/mlx-lm-<version>-py<X.Y>` (a warm run reuses it; `make
dev` builds it). Run as a script to build it: `python tests/support/old_mlx_lm.py`.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

OLD_VERSION = "0.30.5"
#: The MLX of the release's time: mlx-lm before 0.31.3 decodes on a stream made in the main thread,
#: which MLX 0.31+ keeps per thread ("There is no Stream(cpu, 0) in current thread" at the first
#: request), so the test venv's MLX cannot run it. mlx 0.30.4 (its floor) is ~11 MB with its CPU build.
MLX_OF = {"0.30.5": ("mlx==0.30.4", "mlx-cpu==0.30.4" if sys.platform == "linux" else "mlx-metal==0.30.4")}


def cache_root() -> Path:
    return Path(os.environ.get("METAL_AGENT_CACHE") or os.path.expanduser("~/.cache/metal-agent"))


def venv_dir(version: str = OLD_VERSION) -> Path:
    return cache_root() / f"mlx-lm-{version}-py{sys.version_info.major}.{sys.version_info.minor}"


def ensure(version: str = OLD_VERSION) -> Path:
    """The old release's `mlx_lm.server` script, building its venv first if needed (blocking)."""
    final = venv_dir(version)
    script = final / "bin" / "mlx_lm.server"
    if os.access(script, os.X_OK):
        return script
    work = final.with_name(final.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    # The venv's interpreter is this one's base interpreter; pip runs from the test venv.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(work)], check=True)
    python = work / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-input", f"mlx-lm=={version}", *MLX_OF[version]], check=True)
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    shared = [p for p in site.getsitepackages() if p.startswith(sys.prefix)]
    # `import` lines of a .pth run at start-up; addsitedir appends (after the venv's own
    # site-packages) and processes the test venv's own .pth files too.
    Path(own, "zz_test_venv.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in shared))
    # Scripts name the venv's path in their #! line: build under the temporary name, then fix them.
    for entry in (work / "bin").iterdir():
        if entry.is_file() and not entry.is_symlink():
            text = entry.read_bytes()
            if text.startswith(b"#!"):
                entry.write_bytes(text.replace(str(work).encode(), str(final).encode()))
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    return script


if __name__ == "__main__":
    print(ensure(sys.argv[1] if len(sys.argv) > 1 else OLD_VERSION))
