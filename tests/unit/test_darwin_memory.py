"""macOS memory readings: real published macOS numbers through the pure decoding, and the ctypes
calls through a compiled stand-in for libSystem.

What runs here, on Linux:
- the decoding of ``vm_statistics64`` and the pressure-level mapping, fed with real ``vm_stat``
  and ``sysctl kern.memorystatus_vm_pressure_level`` output published in public issues and Q&A
  (tests/fixtures/darwin_memory/, each file names its source);
- the struct layout, checked three ways: against the arithmetic of xnu's header, against bytes
  packed independently with ``struct``, and against the offsets a C compiler gives the same
  struct (copied from xnu into tests/fixtures/darwin_memory/libsystem_standin.c);
- the adapter's ctypes code (argument and return types, the in/out count, errno and
  kern_return_t failures, one host port for the process) against that C stand-in, compiled
  here with ``cc`` (a stated prerequisite of the test suite) because glibc has no
  ``sysctlbyname`` and Linux has no Mach calls to exercise it against.

What could not run on Linux, and is taken on trust from Apple's published source and from the
captures: the real libSystem; that the real ``host_statistics64`` fills the struct as xnu's
header says; that the real sysctl copies out a 4-byte int; the page size a translated
(Rosetta) process would see. The first run on a Mac is the test of those.
"""

from __future__ import annotations

import ctypes
import errno
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from metal_agent.adapters import memory_watchdog
from metal_agent.adapters.darwin_memory import DarwinMemory
from metal_agent.adapters.memory_watchdog import MemoryWatchdog
from metal_agent.core.api import Priority
from metal_agent.core.pressure import (
    HOST_VM_INFO64_COUNT,
    HOST_VM_INFO64_REV0_COUNT,
    VM_STAT_LABELS,
    Evict,
    Level,
    LevelChanged,
    MemoryReading,
    PressureState,
    ServiceMemory,
    Unblock,
    VmStat,
    VmStatistics64,
    classify,
    kernel_pressure_level,
    memory_from_vm_statistics,
    parse_vm_stat,
    step,
)
from metal_agent.memory.guard import MemoryGuard

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "darwin_memory"
GiB = 1 << 30
M_SERIES_RAM = 17179869184  # "The system has 17179869184 (1048576 pages ...)" in the same capture


def capture(name: str) -> str:
    """A fixture without its source comments."""
    return "".join(ln for ln in (FIXTURES / name).read_text().splitlines(keepends=True) if not ln.startswith("#"))


def vm_stat(name: str) -> VmStat:
    parsed = parse_vm_stat(capture(name))
    assert parsed is not None
    return parsed


APPLE_SILICON = "vm_stat-apple-silicon-16gb-swapping.txt"
INTEL = "vm_stat-intel-4k-idle.txt"


def sysctl_levels() -> list[int]:
    return [int(line.split(": ")[1]) for line in capture("sysctl-memorystatus_vm_pressure_level.txt").splitlines()]


# -- the pure decoding, with real numbers -----------------------------------------------------


def test_a_swapping_16gb_apple_silicon_mac_reads_as_published() -> None:
    """available = free (speculative included) + inactive + purgeable; wired as printed.

    The same capture shows why the level must not come from this share: the Mac is swapping
    (millions of swapouts), yet 18 % of its RAM counts as available, which the share thresholds
    call Normal."""
    parsed = vm_stat(APPLE_SILICON)
    reading = memory_from_vm_statistics(
        parsed.statistics64(), page_size=parsed.page_size, total_bytes=M_SERIES_RAM, pressure_level=None
    )

    free, inactive, speculative, purgeable, wired = 4229, 184925, 681, 24, 198107
    assert parsed.page_size == 16384
    assert reading.available_bytes == (free + speculative + inactive + purgeable) * 16384 == 3_110_649_856
    assert reading.wired_bytes == wired * 16384 == 3_245_785_088
    assert reading.total_bytes == M_SERIES_RAM and reading.kernel_level is None
    # LLMKube's vm_stat formula (their issue 578) gives the same bytes ...
    assert reading.available_bytes == sum(
        parsed.pages[k] for k in ("Pages free", "Pages inactive", "Pages speculative", "Pages purgeable")
    ) * 16384
    # ... psutil's `available` (free_count + inactive_count) misses only the purgeable pages.
    stats = parsed.statistics64()
    assert reading.available_bytes - (stats.free_count + stats.inactive_count) * 16384 == purgeable * 16384
    assert 0.18 < reading.available_bytes / M_SERIES_RAM < 0.19
    assert classify(Level.NORMAL, reading.available_bytes, reading.total_bytes) is Level.NORMAL


def test_an_idle_intel_mac_with_4k_pages_reads_as_published() -> None:
    parsed = vm_stat(INTEL)
    reading = memory_from_vm_statistics(parsed.statistics64(), page_size=parsed.page_size, total_bytes=32 * GiB,
                                        pressure_level=1)

    assert parsed.page_size == 4096
    assert reading.available_bytes == (6127229 + 430715 + 628646 + 11820) * 4096
    assert reading.wired_bytes == 715958 * 4096
    assert reading.kernel_level is Level.NORMAL


def test_vm_stat_lines_map_back_to_every_field_of_the_struct() -> None:
    """vm_stat prints 22 of the 24 fields (not lookups and hits); "Pages free" is the only computed one."""
    parsed = vm_stat(APPLE_SILICON)
    stats = parsed.statistics64()

    assert set(parsed.pages) == set(VM_STAT_LABELS)
    assert {f for f, _ in VmStatistics64._fields_} - set(VM_STAT_LABELS.values()) == {"lookups", "hits"}
    assert stats.free_count == 4229 + 681
    assert stats.faults == 6085905557 and stats.compressions == 1066060384  # 64-bit counters kept whole
    with pytest.raises(ValueError, match="unknown vm_stat line"):
        parse_vm_stat("Mach Virtual Memory Statistics: (page size of 16384 bytes)\nPages frozen: 3.\n").statistics64()


def test_kernel_levels_from_real_sysctl_output() -> None:
    """1/2/4 are NOTE_MEMORYSTATUS_PRESSURE_NORMAL/WARN/CRITICAL; xnu's internal 0..4 enumeration
    (which code often compares against by mistake) is never what the sysctl returns."""
    assert [kernel_pressure_level(v) for v in sysctl_levels()] == [Level.NORMAL] + [Level.CRITICAL] * 3
    assert kernel_pressure_level(2) is Level.WARNING  # from xnu's source; no public capture of it found
    for not_a_dispatch_level in (0, 3, 8, -1, None):
        assert kernel_pressure_level(not_a_dispatch_level) is None


def test_the_kernel_level_decides_and_the_share_applies_only_without_it() -> None:
    plenty = dict(total_bytes=100, available_bytes=60)
    scarce = dict(total_bytes=100, available_bytes=3)
    # Our services hold 30 of the 40 in use: the pressure is theirs (the friendly-fire guard lets it through).
    a, b = ServiceMemory("ns/a", Priority.LOW, 15, 1.0), ServiceMemory("ns/b", Priority.HIGH, 15, 2.0)

    state, actions = step(PressureState(), MemoryReading(**plenty, kernel_level=Level.CRITICAL), [a, b])
    assert actions == (LevelChanged(Level.NORMAL, Level.CRITICAL), Evict("ns/a"))

    state, actions = step(state, MemoryReading(**scarce, kernel_level=Level.NORMAL), [b])
    assert actions == (LevelChanged(Level.CRITICAL, Level.NORMAL), Unblock(frozenset({"ns/a"})))

    state, actions = step(state, MemoryReading(**scarce), [b])  # no kernel level: 3 % is Critical
    assert state.level is Level.CRITICAL


# -- the struct layout ----------------------------------------------------------------------------


def test_the_struct_layout_is_xnus() -> None:
    """natural_t is 32 bits and the counters 64; on the 64-bit ABIs that gives 152 bytes, 38 words."""
    offsets = {name: getattr(VmStatistics64, name).offset for name, _ in VmStatistics64._fields_}

    assert ctypes.sizeof(VmStatistics64) == 152 and ctypes.alignment(VmStatistics64) == 8
    assert HOST_VM_INFO64_COUNT == 38 and HOST_VM_INFO64_REV0_COUNT == 24
    assert (offsets["free_count"], offsets["wire_count"], offsets["zero_fill_count"]) == (0, 12, 16)
    assert (offsets["purges"], offsets["purgeable_count"], offsets["speculative_count"]) == (80, 88, 92)
    assert (offsets["decompressions"], offsets["compressor_page_count"]) == (96, 128)
    assert offsets["total_uncompressed_pages_in_compressor"] == 144


def test_bytes_packed_independently_decode_to_the_capture() -> None:
    """What host_statistics64 writes is raw memory: bytes packed with `struct` (not ctypes) from the
    capture must decode to the same reading (little-endian, as on arm64 and x86_64)."""
    p = vm_stat(APPLE_SILICON).pages
    raw = struct.pack(
        "<4I9Q2I4Q4IQ",
        p["Pages free"] + p["Pages speculative"], p["Pages active"], p["Pages inactive"], p["Pages wired down"],
        p["Pages zero filled"], p["Pages reactivated"], p["Pageins"], p["Pageouts"], p["Translation faults"],
        p["Pages copy-on-write"], 0, 0, p["Pages purged"],
        p["Pages purgeable"], p["Pages speculative"],
        p["Decompressions"], p["Compressions"], p["Swapins"], p["Swapouts"],
        p["Pages occupied by compressor"], p["Pages throttled"], p["File-backed pages"], p["Anonymous pages"],
        p["Pages stored in compressor"],
    )
    stats = VmStatistics64.from_buffer_copy(raw)

    assert len(raw) == ctypes.sizeof(VmStatistics64)
    assert bytes(stats) == bytes(vm_stat(APPLE_SILICON).statistics64())
    reading = memory_from_vm_statistics(stats, page_size=16384, total_bytes=M_SERIES_RAM, pressure_level=4)
    assert reading == MemoryReading(M_SERIES_RAM, 3_110_649_856, 3_245_785_088, Level.CRITICAL)


# -- the ctypes calls, against a compiled stand-in for libSystem ----------------------------------


@pytest.fixture(scope="module")
def standin_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc")
    if cc is None:
        pytest.fail("a C compiler (cc) is required: the test suite's prerequisites include a C toolchain", pytrace=False)
    out = tmp_path_factory.mktemp("libsystem") / "libsystem_standin.so"
    result = subprocess.run(
        [cc, "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(FIXTURES / "libsystem_standin.c")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def libsystem(standin_build: Path, tmp_path: Path) -> tuple[str, ctypes.CDLL]:
    """A fresh copy per test (dlopen shares one copy per path, and the stand-in keeps state)."""
    path = tmp_path / "libSystem.B.so"
    shutil.copyfile(standin_build, path)
    control = ctypes.CDLL(str(path))
    control.standin_set.argtypes = [ctypes.c_char_p, ctypes.c_uint64]
    control.standin_offsetof.argtypes = [ctypes.c_char_p]
    control.standin_offsetof.restype = ctypes.c_long
    control.standin_sizeof.restype = ctypes.c_size_t
    control.standin_fail_statistics.argtypes = [ctypes.c_int]
    return str(path), control


def load(control: ctypes.CDLL, parsed: VmStat, *, memsize: int, level: int | None) -> None:
    """Make the stand-in answer with a capture: set each field by its C name, as the kernel would."""
    stats = parsed.statistics64()
    for name, _ in VmStatistics64._fields_:
        assert control.standin_set(name.encode(), getattr(stats, name)) == 0, name
    assert control.standin_set(b"page_size", parsed.page_size) == 0
    assert control.standin_set(b"hw.memsize", memsize) == 0
    if level is None:
        control.standin_forget_pressure_level()
    else:
        assert control.standin_set(b"kern.memorystatus_vm_pressure_level", level) == 0


def test_the_c_compiler_lays_the_struct_out_as_ctypes_does(libsystem) -> None:
    _, control = libsystem
    for name, _ in VmStatistics64._fields_:
        assert control.standin_offsetof(name.encode()) == getattr(VmStatistics64, name).offset, name
    assert control.standin_sizeof() == ctypes.sizeof(VmStatistics64)
    assert (control.standin_count(), control.standin_rev0_count()) == (HOST_VM_INFO64_COUNT, HOST_VM_INFO64_REV0_COUNT)


def test_a_reading_through_the_libsystem_calls(libsystem) -> None:
    path, control = libsystem
    load(control, vm_stat(APPLE_SILICON), memsize=M_SERIES_RAM, level=sysctl_levels()[1])
    memory = DarwinMemory(path)

    readings = [memory.read() for _ in range(3)]
    stats = memory.vm_statistics()

    assert readings == [MemoryReading(M_SERIES_RAM, 3_110_649_856, 3_245_785_088, Level.CRITICAL)] * 3
    assert bytes(stats) == bytes(vm_stat(APPLE_SILICON).statistics64())  # every byte, 64-bit counters included
    assert (memory.page_size, memory.total_bytes) == (16384, M_SERIES_RAM)
    assert control.standin_host_self_calls() == 1, "one host port for the process, not one reference per reading"
    assert control.standin_statistics_calls() == 4  # one host_statistics64 per reading


def test_failures_of_the_calls_are_errors_or_fall_back_and_are_logged_once(libsystem) -> None:
    path, control = libsystem
    load(control, vm_stat(INTEL), memsize=32 * GiB, level=None)
    memory = DarwinMemory(path)

    with pytest.raises(OSError) as unknown:
        memory.sysctl_int("kern.no_such_sysctl")
    assert unknown.value.errno == errno.ENOENT and "kern.no_such_sysctl" in str(unknown.value)

    with capture_logs() as logs:
        without_level = [memory.read(), memory.read()]  # no such sysctl: the share decides
        control.standin_set(b"kern.memorystatus_vm_pressure_level", 3)  # not a dispatch value
        unknown_level = [memory.read(), memory.read()]
    assert [r.kernel_level for r in without_level + unknown_level] == [None] * 4
    assert without_level[0].available_bytes == (6127229 + 430715 + 628646 + 11820) * 4096
    assert [e["event"] for e in logs] == [
        "cannot read the kernel's memory pressure level; judging by available memory",
        "unknown kernel memory pressure level; judging by available memory",
    ]

    control.standin_fail_statistics(5)  # KERN_FAILURE
    with pytest.raises(OSError, match="kern_return_t 5"):
        memory.read()


async def test_the_watchdog_acts_on_the_kernel_level_read_through_ctypes(libsystem) -> None:
    """The whole macOS path short of the real kernel: ctypes reader, decoding, state machine, gauges."""
    path, control = libsystem
    load(control, vm_stat(APPLE_SILICON), memsize=M_SERIES_RAM, level=4)
    memory = DarwinMemory(path)
    # 10 GiB of ours in the capture's ~13 GiB in use: the pressure is ours to relieve.
    running = {"ns/batch": ServiceMemory("ns/batch", Priority.BATCH, 5 << 30, 1.0),
               "ns/chat": ServiceMemory("ns/chat", Priority.HIGH, 5 << 30, 2.0)}
    evicted: list[str] = []

    async def read() -> MemoryReading:
        return memory.read()

    def evict(key: str) -> None:
        evicted.append(key)
        running.pop(key)

    registry = CollectorRegistry()
    dog = MemoryWatchdog(registry, services=lambda: list(running.values()), evict=evict, unblock=lambda keys: None,
                         reader=read, eviction_enabled=True)
    await dog.tick()
    gauge = lambda name: registry.get_sample_value(f"llmkube_metal_agent_{name}")  # noqa: E731

    assert evicted == ["ns/batch"] and dog.level is Level.CRITICAL  # at 18 % available: the kernel decided
    assert gauge("system_memory_available_bytes") == 3_110_649_856
    assert gauge("system_memory_wired_bytes") == 3_245_785_088
    assert gauge("memory_pressure_level") == 2
    in_use = M_SERIES_RAM - 3_110_649_856
    assert gauge("memory_own_share_ratio") == pytest.approx((10 << 30) / in_use)

    control.standin_set(b"kern.memorystatus_vm_pressure_level", sysctl_levels()[0])
    await dog.tick()
    assert dog.level is Level.NORMAL and not dog.is_blocked("ns/batch")

    control.standin_fail_statistics(5)
    with capture_logs() as logs:
        await dog.tick()  # a failed reading skips one check; the watchdog keeps going
    assert logs[0]["event"] == "cannot read system memory; skipping this check"
    assert dog.level is Level.NORMAL


def test_on_darwin_the_watchdog_and_admission_read_the_same_libsystem_numbers(libsystem, monkeypatch) -> None:
    """Admission's RAM and the watchdog's reading come from one source. Being on darwin is the one
    thing faked here (sys.platform); the numbers come through the ctypes path above."""
    path, control = libsystem
    load(control, vm_stat(APPLE_SILICON), memsize=M_SERIES_RAM, level=2)
    memory = DarwinMemory(path)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(memory_watchdog, "_darwin_memory", lambda: memory)

    reading = memory_watchdog.read_system_memory()
    guard = MemoryGuard(None, CollectorRegistry())  # type: ignore[arg-type] - no model is checked here

    assert reading == MemoryReading(M_SERIES_RAM, 3_110_649_856, 3_245_785_088, Level.WARNING)
    assert guard.total_ram() == M_SERIES_RAM != psutil.virtual_memory().total  # not this Linux machine's


def test_on_darwin_a_libsystem_that_cannot_be_bound_falls_back_to_psutil_and_says_so_once(monkeypatch) -> None:
    """On Linux the real /usr/lib/libSystem.B.dylib does not exist, so binding it fails exactly as a
    broken binding on a Mac would; the reading must then still come (psutil's), with one error."""
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(memory_watchdog, "_darwin_failure", [])
    memory_watchdog._darwin_memory.cache_clear()
    try:
        with capture_logs() as logs:
            readings = [memory_watchdog.read_system_memory() for _ in range(2)]
    finally:
        memory_watchdog._darwin_memory.cache_clear()

    assert readings[0].total_bytes == psutil.virtual_memory().total and readings[0].kernel_level is None
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("cannot read memory through libSystem; using psutil's figures", "error")
    ]
    assert "libSystem" in logs[0]["error"]
