"""Stand-in for ``sudo -n /usr/bin/powermetrics`` in the power sampler tests.

powermetrics exists only on macOS (and needs root), and the tests run on
Linux, so the sampler is pointed at this script through its
``executable_override_for_tests`` seam. What it prints is not invented: it
replays the samples of a real recorded capture (the M5 Max one in
``../shared/fixtures/powermetrics``), one sample per interval like the real
tool, whose first sample also arrives one interval after start. Then it
stalls, exits, or loops, as the test asks.

Usage (the sampler appends the real powermetrics arguments after ``--``)::

    fake_powermetrics.py --capture FILE [options] -- --samplers cpu_power,gpu_power -i MS

The arguments after ``--`` must be exactly what the sampler is meant to pass
to powermetrics; anything else exits 64, so a test that sees samples also
proves the sampler ran the right command line.

Options:
  --after stall|exit|loop  after the samples: hang until killed, exit, or start over
  --samples N              replay only the first N complete samples
  --exit-code N            exit status for --after exit (default 1)
  --stderr TEXT            written to stderr before exiting; "{start}" is replaced
                           by this process's start number
  --partial                before exiting, print the next sample up to its power
                           summary only (as if killed mid-sample)
  --starts-file FILE       append one line (wall-clock time) per start
  --long-line-bytes N      add a junk line of N bytes to every sample
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXPECTED = ["--samplers", "cpu_power,gpu_power", "-i"]
# The real recording, relative to ../shared (see the `shared_dir` fixture).
M5_CAPTURE = "fixtures/powermetrics/m5max-mac17_6-cpu_gpu_power-1000ms.txt"
M5_COMBINED_W = [0.171, 0.428, 0.458, 0.356, 0.679, 0.734, 0.489]


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


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("fake_powermetrics: missing '--' before the powermetrics arguments", file=sys.stderr)
        return 64
    split = argv.index("--")
    own, pm_args = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(prog="fake_powermetrics")
    parser.add_argument("--capture", type=Path, required=True)
    parser.add_argument("--after", choices=["stall", "exit", "loop"], default="stall")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--exit-code", type=int, default=1)
    parser.add_argument("--stderr", default="")
    parser.add_argument("--partial", action="store_true")
    parser.add_argument("--starts-file", type=Path)
    parser.add_argument("--long-line-bytes", type=int, default=0)
    opts = parser.parse_args(own)

    if len(pm_args) != 4 or pm_args[:3] != EXPECTED or not pm_args[3].isdigit():
        print(f"fake_powermetrics: unexpected powermetrics arguments {pm_args!r}", file=sys.stderr)
        return 64
    interval = int(pm_args[3]) / 1000.0

    start = 1
    if opts.starts_file:
        with opts.starts_file.open("a") as f:
            f.write(f"{time.time()}\n")
        start = len(opts.starts_file.read_text().splitlines())

    preamble, all_blocks, _ = split_capture(opts.capture.read_text())
    blocks = all_blocks if opts.samples is None else all_blocks[: opts.samples]
    if opts.long_line_bytes:
        junk = "CPU 99 active residency: " + "9" * opts.long_line_bytes + "\n"
        blocks = [b.replace("\n", "\n" + junk, 1) for b in blocks]

    out = sys.stdout
    out.write(preamble)
    out.flush()
    while True:
        for block in blocks:
            time.sleep(interval)  # pacing like the real tool, not synchronisation
            out.write(block)
            out.flush()
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
