"""Incremental parser for the text output of macOS ``powermetrics``.

The agent runs ``powermetrics --samplers cpu_power,gpu_power -i <ms> -n 3600``
(one run after another, for as long as it lives) and turns every sample into
four gauges (CPU, GPU, ANE and combined power, in watts) and two for the
GPU's load (how busy it was, and at what frequency). This module is
the pure half of that: it sees lines, never files or processes, so the same
code serves the live sampler, ``metal-agent power parse`` and the tests, and
it can be exercised on Linux with recorded output.

What a sample looks like (see ``docs/llmkube-compat.md`` and the recorded
M5 Max capture)::

    *** Sampled system activity (Sat Apr 25 10:34:37 2026 -0700) (1018.73ms elapsed) ***
    **** Processor usage ****
    ... per-cluster and per-CPU lines ...
    CPU Power: 164 mW
    GPU Power: 7 mW
    ANE Power: 0 mW
    Combined Power (CPU + GPU + ANE): 171 mW
    **** GPU usage ****
    ... GPU frequency and residency lines ...
    GPU Power: 7 mW

Rules, and why:

* A header line starting ``*** Sampled system activity`` opens a sample.
  Everything before the first header (machine model, OS version) is ignored.
* Only lines that *start* with ``CPU Power:``, ``GPU Power:``, ``ANE Power:``
  or ``Combined Power (CPU + GPU + ANE):`` carry values. Per-cluster lines
  (``E-Cluster Power``, ``P0-Cluster Power``, ``S-Cluster ...``) are named
  differently on every chip generation and are deliberately not read, as is
  anything else we do not recognise.
* ``GPU Power:`` appears twice per sample (the cpu_power sampler's summary and
  the end of the gpu_power section, and they can differ by a milliwatt). The
  first one wins, so the four values come from one consistent summary.
* Values are in mW; ``W`` is accepted too, decimals in either.
* The GPU's load comes from two lines of the ``**** GPU usage ****`` section
  (the gpu_power sampler), read there only::

      GPU HW active frequency: 338 MHz
      GPU HW active residency:   1.03% (338 MHz: 1.0% 486 MHz:   0% ...)

  Residency is the share of the window the GPU was active, so it is the
  GPU's busy ratio (what DCGM calls GPU utilisation on an NVIDIA card); the
  frequency is the average frequency *while active* (0 when it never woke).
  The real recordings print the ``HW`` spelling; ``GPU active ...`` without
  it is accepted too, since that is the label's only other form we know of
  (no recording of it). A sample without these lines carries None for them.
* Older macOS prints no ``Combined`` line: combined is then CPU + GPU + ANE,
  counting a missing part as 0.

When a sample is complete (the part that matters for a live gauge):

* The ``GPU Power:`` line inside the ``**** GPU usage ****`` section completes
  the sample at once. The agent always requests exactly the cpu_power and
  gpu_power samplers; powermetrics prints them in that order and the
  gpu_power section ends with its ``GPU Power:`` line, so by then every value
  we read has been printed. Waiting for the next header instead would publish
  every sample one whole interval late, and the last sample before a stall
  never.
* Failing that (a layout without that line), the next header completes the
  previous sample, provided it carried at least one power value.
* A sample still open when the stream ends is dropped by :meth:`finish`: at
  end of file there is no telling whether it was cut off mid-way, which is
  exactly what happens when powermetrics is killed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["PowerSample", "PowerParser", "parse_lines", "parse_text"]

_HEADER_PREFIX = "*** Sampled system activity"
# The date carries no parentheses; the elapsed part may be missing on odd builds.
_HEADER = re.compile(r"\*\*\* Sampled system activity \((?P<ts>[^()]*)\)(?: \((?P<ms>[0-9]+(?:\.[0-9]+)?)\s*ms elapsed\))?")
_SECTION = re.compile(r"^\*{4} (?P<name>.+?) \*{4}\s*$")
_GPU_SECTION = "GPU usage"
_NUMBER = r"(?P<value>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
_VALUE = r":\s*" + _NUMBER + r"\s*(?P<unit>mW|W)\s*$"
# The GPU load lines; the residency's per-frequency breakdown after the share is not read.
_GPU_RESIDENCY = re.compile(r"GPU (?:HW )?active residency:\s*" + _NUMBER + r"\s*%(?:\s|$)")
_GPU_FREQUENCY = re.compile(r"GPU (?:HW )?active frequency:\s*" + _NUMBER + r"\s*(?P<unit>MHz|GHz)\s*$")
# (field, line prefix, full pattern). The prefix test is cheap and rejects the
# many long residency lines before any regex runs.
_FIELDS: tuple[tuple[str, str, re.Pattern[str]], ...] = tuple(
    (field, prefix, re.compile(re.escape(prefix) + _VALUE))
    for field, prefix in (
        ("cpu", "CPU Power"),
        ("gpu", "GPU Power"),
        ("ane", "ANE Power"),
        ("combined", "Combined Power (CPU + GPU + ANE)"),
    )
)


@dataclass(frozen=True, slots=True)
class PowerSample:
    """One complete powermetrics sample, all power values in watts.

    ``timestamp`` is the date exactly as powermetrics printed it (it carries
    the Mac's own time zone; we do not reinterpret it). ``elapsed_ms`` is the
    measured length of the sample window, 0.0 if the header lacks it.
    """

    timestamp: str
    elapsed_ms: float
    cpu_w: float
    gpu_w: float
    ane_w: float
    combined_w: float
    gpu_active_ratio: float | None = None  # 0..1, None when the sample had no residency line
    gpu_active_hz: float | None = None  # None when the sample had no frequency line


@dataclass(slots=True)
class _Open:
    """The sample being read: values seen so far, in watts, None if not yet."""

    timestamp: str
    elapsed_ms: float
    section: str = ""
    cpu: float | None = None
    gpu: float | None = None
    ane: float | None = None
    combined: float | None = None
    gpu_active_ratio: float | None = None
    gpu_active_hz: float | None = None

    def has_values(self) -> bool:
        return any(v is not None for v in (self.cpu, self.gpu, self.ane, self.combined))

    def close(self) -> PowerSample:
        cpu, gpu, ane = self.cpu or 0.0, self.gpu or 0.0, self.ane or 0.0
        combined = self.combined if self.combined is not None else cpu + gpu + ane
        return PowerSample(self.timestamp, self.elapsed_ms, cpu, gpu, ane, combined,
                           self.gpu_active_ratio, self.gpu_active_hz)


def _watts(match: re.Match[str]) -> float:
    value = float(match["value"])
    return value / 1000.0 if match["unit"] == "mW" else value


class PowerParser:
    """Turns powermetrics text, one line at a time, into :class:`PowerSample`.

    Feed every line (with or without its newline); each call returns the
    samples that line completed, usually none or one. Call :meth:`finish` at
    end of stream. One parser per powermetrics process: a restarted process
    starts with a fresh parser so a half-read sample never mixes with the next.
    """

    def __init__(self) -> None:
        self._open: _Open | None = None

    def feed(self, line: str) -> list[PowerSample]:
        line = line.rstrip("\r\n")
        if line.startswith(_HEADER_PREFIX):
            done = self._close_if_valued()
            header = _HEADER.match(line)
            timestamp = header["ts"].strip() if header else ""
            elapsed = float(header["ms"]) if header and header["ms"] else 0.0
            self._open = _Open(timestamp, elapsed)
            return done
        sample = self._open
        if sample is None:
            return []
        if line.startswith("****"):
            section = _SECTION.match(line)
            if section:
                sample.section = section["name"]
            return []
        if sample.section == _GPU_SECTION and line.startswith("GPU ") and self._gpu_load(sample, line):
            return []
        for field, prefix, pattern in _FIELDS:
            if line.startswith(prefix) and (m := pattern.match(line)):
                self._set(sample, field, _watts(m))
                if field == "gpu" and sample.section == _GPU_SECTION:
                    self._open = None
                    return [sample.close()]
                break
        return []

    def finish(self) -> None:
        """End of stream: drop the sample still open, it may be cut short."""
        self._open = None

    def _close_if_valued(self) -> list[PowerSample]:
        sample, self._open = self._open, None
        return [sample.close()] if sample is not None and sample.has_values() else []

    @staticmethod
    def _gpu_load(sample: _Open, line: str) -> bool:
        """Read a GPU residency or frequency line; False if ``line`` is neither."""
        if m := _GPU_RESIDENCY.match(line):
            if sample.gpu_active_ratio is None:
                sample.gpu_active_ratio = min(float(m["value"]), 100.0) / 100.0
            return True
        if m := _GPU_FREQUENCY.match(line):
            if sample.gpu_active_hz is None:
                sample.gpu_active_hz = float(m["value"]) * (1e6 if m["unit"] == "MHz" else 1e9)
            return True
        return False

    @staticmethod
    def _set(sample: _Open, field: str, watts: float) -> None:
        if getattr(sample, field) is None:  # first occurrence wins (GPU repeats)
            setattr(sample, field, watts)


def parse_lines(lines: Iterable[str]) -> list[PowerSample]:
    """Parse a finite sequence of lines; the trailing partial sample is dropped."""
    parser = PowerParser()
    samples = [s for line in lines for s in parser.feed(line)]
    parser.finish()
    return samples


def parse_text(text: str) -> list[PowerSample]:
    """Parse a whole recorded capture (e.g. a ``powermetrics`` log file)."""
    return parse_lines(text.splitlines())
