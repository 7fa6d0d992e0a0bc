"""Stand-ins for caffeinate, pmset and sysctl: macOS commands that cannot run on Linux.

Each is a small executable written into a test's directory and handed to the
agent (hidden `--caffeinate`, `--pmset`, `--sysctl`) or to a doctor check. What
they print is not invented: pmset replays the transcribed macOS output in
`tests/fixtures/macos/` (each file names its public source), and sysctl prints
the values a test sets in its `values.json` (sysctl -n prints one integer).

The caffeinate stand-in does what `caffeinate -i -w PID` does that the agent
relies on: it refuses any other arguments (exit 64, so a test that sees it
running also proves the agent's pinned argv) and exits when PID exits. With
`FAKE_CAFFEINATE_IGNORE_W=1` in its environment it ignores -w, the only way to
leave one behind after its agent is gone (which real caffeinate never does),
so a test can show the next agent ends it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "macos"

_CAFFEINATE = """#!{python}
import os, signal, sys, time
args = sys.argv[1:]
if len(args) != 3 or args[:2] != ["-i", "-w"] or not args[2].isdigit():
    sys.exit(64)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
watched = int(args[2])
while True:
    if not os.environ.get("FAKE_CAFFEINATE_IGNORE_W"):
        try:
            os.kill(watched, 0)
        except ProcessLookupError:
            sys.exit(0)
    time.sleep(0.05)
"""

_PMSET = """#!{python}
import json, sys
from pathlib import Path
here = Path(__file__).resolve().parent
config = json.loads((here / "pmset.json").read_text())
args = sys.argv[1:]
if args == ["-g", "therm"]:
    name = config["therm"]
elif args == ["-g", "assertions"]:
    name = config["assertions"]
else:
    sys.exit(64)
text = "".join(l for l in Path(name).read_text().splitlines(keepends=True) if not l.startswith("#"))
sys.stdout.write(text.replace("{{pid}}", str(config.get("pid", 0))))
"""

_SYSCTL = """#!{python}
import json, sys
from pathlib import Path
values = json.loads((Path(__file__).resolve().parent / "sysctl.json").read_text())
args = sys.argv[1:]
if len(args) != 2 or args[0] != "-n" or args[1] not in values:
    sys.stderr.write("sysctl: unknown oid\\n")
    sys.exit(1)
print(values[args[1]])
"""


def _write(path: Path, body: str) -> Path:
    path.write_text(body.format(python=sys.executable))
    path.chmod(0o755)
    return path


def caffeinate(directory: Path) -> Path:
    return _write(directory / "caffeinate", _CAFFEINATE)


def pmset(directory: Path, *, therm: str = "pmset-therm-apple-silicon.txt",
          assertions: str = "pmset-assertions-caffeinate.txt", pid: int = 0) -> Path:
    """A pmset replaying fixtures; call again (same directory) to change what it replays."""
    (directory / "pmset.json").write_text(json.dumps(
        {"therm": str(FIXTURES / therm), "assertions": str(FIXTURES / assertions), "pid": pid}))
    return _write(directory / "pmset", _PMSET)


def sysctl(directory: Path, *, wired_limit_mb: int | None = 0, memsize: int | None = 34359738368) -> Path:
    """A sysctl knowing these values (None: an unknown oid, as on an Intel Mac or Linux)."""
    values = {k: v for k, v in (("iogpu.wired_limit_mb", wired_limit_mb), ("hw.memsize", memsize)) if v is not None}
    (directory / "sysctl.json").write_text(json.dumps(values))
    return _write(directory / "sysctl", _SYSCTL)


def running_caffeinates(stand_in: Path) -> list[psutil.Process]:
    """Every live process of this caffeinate stand-in (zombies excluded): `<python> <stand-in> ARGS...`,
    not the agent whose own command line names it (`--caffeinate <stand-in>`)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline[1:2] == [str(stand_in)] and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found
