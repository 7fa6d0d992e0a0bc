"""Stand-in for ``sudo -n /usr/bin/powermetrics`` in the power sampler tests.

powermetrics exists only on macOS (and needs root), and the tests run on
Linux, so the sampler is pointed at this script through its
``executable_override_for_tests`` seam. What it prints is not invented: it
replays the samples of a real recorded capture (the M5 Max one in
``../shared/fixtures/powermetrics``), one sample per interval like the real
tool, whose first sample also arrives one interval after start. Then it
stalls, exits, or loops, as the test asks.

Usage (the sampler appends the real powermetrics arguments after ``--``)::

    fake_powermetrics.py --capture FILE [options] -- --samplers cpu_power,gpu_power -i MS -n COUNT

The arguments after ``--`` must be exactly what the sampler is meant to pass
to powermetrics; anything else exits 64, so a test that sees samples also
proves the sampler ran the right command line. Like the real tool with
``-n COUNT``, it exits 0 once it has printed COUNT samples, whatever
``--after`` says.

Like a C program (and unlike Python by default) it keeps SIGPIPE's default
action, so a write to a pipe whose reader has gone kills it with SIGPIPE:
that is how the sampler ends a powermetrics it may not signal.

Options:
  --after stall|exit|loop  after the samples: hang (see --stall-seconds), exit, or start over
  --stall-seconds S        with --after stall: hang S seconds, then replay again
                           (default: hang until killed)
  --samples N              replay only the first N complete samples
  --exit-code N            exit status for --after exit (default 1)
  --stderr TEXT            written to stderr before exiting; "{start}" is replaced
                           by this process's start number
  --partial                before exiting, print the next sample up to its power
                           summary only (as if killed mid-sample)
  --starts-file FILE       append one line (wall-clock time) per start
  --pids-file FILE         append this process's pid per start
  --long-line-bytes N      add a junk line of N bytes to every sample
  --ignore-sigterm         ignore SIGTERM (a process the agent's signal cannot end)
  --options-file FILE      read further options from FILE (shell words) at each
                           start: how a test steers a stand-in that real sudo
                           runs with its pinned arguments
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EXPECTED = ["--samplers", "cpu_power,gpu_power", "-i"]
# The real recording, relative to ../shared (see the `shared_dir` fixture).
M5_CAPTURE = "fixtures/powermetrics/m5max-mac17_6-cpu_gpu_power-1000ms.txt"
M5_COMBINED_W = [0.171, 0.428, 0.458, 0.356, 0.679, 0.734, 0.489]


@contextmanager
def exclusive_stand_in_slot(timeout: float = 600.0) -> Iterator[None]:
    """Hold the machine-wide right to install a stand-in ``/usr/bin/powermetrics``.

    The privileged tests of several modules (and several test runs sharing a
    machine) each install and remove one; without this they would replace or
    delete each other's mid-test. The holder must still check that the path is
    free (a real powermetrics, or one left behind by a crash, is never touched).
    """
    lock = Path(tempfile.gettempdir()) / "metal-agent-powermetrics-stand-in.lock"
    with lock.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another test holds {lock} for more than {timeout:.0f}s") from None
                time.sleep(0.2)  # polling a lock another process holds, not timing a test
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stand_in_script(capture: Path, options_file: Path) -> str:
    """A shell script to install as ``/usr/bin/powermetrics`` for tests that run real sudo.

    sudo runs it as root with the pinned arguments only (and a scrubbed
    environment), so the test steers it through ``options_file``.
    """
    words = " ".join(
        shlex.quote(w) for w in (sys.executable, str(Path(__file__).resolve()), "--capture", str(capture))
    )
    return (
        "#!/bin/sh\n"
        "# metal-agent test stand-in for powermetrics (Linux has none): replays a real M5 Max capture.\n"
        "# Safe to delete.\n"
        f'exec {words} --options-file {shlex.quote(str(options_file))} -- "$@"\n'
    )


def command(capture: Path, *options: str) -> list[str]:
    """The stand-in as the sampler's ``executable_override_for_tests``.

    The sampler appends the real powermetrics arguments after the ``--``.
    """
    return [sys.executable, str(Path(__file__).resolve()), "--capture", str(capture), *options, "--"]


def split_capture(text: str) -> tuple[str, list[str], str]:
    """(preamble, complete sample blocks, cut-off last block) of a capture."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("*** Sampled system activity")]
    if not starts:
        raise SystemExit("capture has no samples")
    blocks = ["".join(lines[a:b]) for a, b in zip(starts, starts[1:] + [len(lines)])]
    # A recording ends where it was stopped: its last block is cut off.
    return "".join(lines[: starts[0]]), blocks[:-1], blocks[-1]


def up_to_power_summary(block: str) -> str:
    lines = block.splitlines(keepends=True)
    end = next(i for i, line in enumerate(lines) if line.startswith("Combined Power"))
    return "".join(lines[: end + 1])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fake_powermetrics")
    parser.add_argument("--capture", type=Path, required=True)
    parser.add_argument("--after", choices=["stall", "exit", "loop"], default="stall")
    parser.add_argument("--stall-seconds", type=float, default=None)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--exit-code", type=int, default=1)
    parser.add_argument("--stderr", default="")
    parser.add_argument("--partial", action="store_true")
    parser.add_argument("--starts-file", type=Path)
    parser.add_argument("--pids-file", type=Path)
    parser.add_argument("--long-line-bytes", type=int, default=0)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--options-file", type=Path)
    return parser


def _pm_args_ok(pm_args: list[str]) -> bool:
    return (
        len(pm_args) == 6
        and pm_args[:3] == EXPECTED
        and pm_args[3].isdigit()
        and pm_args[4] == "-n"
        and pm_args[5].isdigit()
        and int(pm_args[5]) > 0
    )


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # die of a closed pipe like a C tool
    if "--" not in argv:
        print("fake_powermetrics: missing '--' before the powermetrics arguments", file=sys.stderr)
        return 64
    split = argv.index("--")
    own, pm_args = argv[:split], argv[split + 1 :]
    opts = _parser().parse_args(own)
    if opts.options_file:
        opts = _parser().parse_args([*own, *shlex.split(opts.options_file.read_text())])

    if not _pm_args_ok(pm_args):
        print(f"fake_powermetrics: unexpected powermetrics arguments {pm_args!r}", file=sys.stderr)
        return 64
    interval = int(pm_args[3]) / 1000.0
    count = int(pm_args[5])
    if opts.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    start = 1
    if opts.starts_file:
        with opts.starts_file.open("a") as f:
            f.write(f"{time.time()}\n")
        start = len(opts.starts_file.read_text().splitlines())
    if opts.pids_file:
        with opts.pids_file.open("a") as f:
            f.write(f"{os.getpid()}\n")

    preamble, all_blocks, _ = split_capture(opts.capture.read_text())
    blocks = all_blocks if opts.samples is None else all_blocks[: opts.samples]
    if opts.long_line_bytes:
        junk = "CPU 99 active residency: " + "9" * opts.long_line_bytes + "\n"
        blocks = [b.replace("\n", "\n" + junk, 1) for b in blocks]

    out = sys.stdout
    out.write(preamble)
    out.flush()
    printed = 0
    while True:
        for block in blocks:
            time.sleep(interval)  # pacing like the real tool, not synchronisation
            out.write(block)
            out.flush()
            printed += 1
            if printed >= count:
                return 0  # powermetrics -n COUNT: done
        if opts.after == "stall" and opts.stall_seconds is not None and blocks:
            time.sleep(opts.stall_seconds)  # e.g. a Mac asleep; then it writes again
            continue
        if opts.after != "loop" or not blocks:
            break

    if opts.after == "stall":
        while True:
            time.sleep(3600)
    if opts.partial:
        out.write(up_to_power_summary(all_blocks[len(blocks) % len(all_blocks)]))
        out.flush()
    if opts.stderr:
        print(opts.stderr.replace("{start}", str(start)), file=sys.stderr)
    return opts.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
