"""macOS memory numbers straight from libSystem, through ctypes: no subprocess.

One reading is one ``host_statistics64(HOST_VM_INFO64)`` call (what
``vm_stat`` itself calls) plus one ``sysctlbyname("kern.memorystatus_vm_pressure_level")``:
microseconds, where forking ``vm_stat`` every few seconds cost a process
start each time. RAM size (``hw.memsize``) and the page size
(``host_page_size``, as ``vm_stat`` uses) do not change and are read once.
What the numbers mean is decided in :mod:`metal_agent.core.pressure`; this
module only makes the calls.

Used only on darwin. The library path is a constructor argument so that the
calling code (argument types, buffer sizes, error paths) can be exercised on
Linux against a stand-in library built from the same struct definition; no
configuration reaches it.
"""

from __future__ import annotations

import ctypes
import errno
import os

import structlog

from metal_agent.core.pressure import (
    HOST_VM_INFO64,
    HOST_VM_INFO64_COUNT,
    HOST_VM_INFO64_REV0_COUNT,
    KERNEL_PRESSURE_LEVELS,
    MemoryReading,
    VmStatistics64,
    memory_from_vm_statistics,
)

__all__ = ["LIBSYSTEM", "PRESSURE_SYSCTL", "DarwinMemory"]

log = structlog.get_logger(__name__)

LIBSYSTEM = "/usr/lib/libSystem.B.dylib"
PRESSURE_SYSCTL = "kern.memorystatus_vm_pressure_level"
MEMSIZE_SYSCTL = "hw.memsize"
KERN_SUCCESS = 0

_mach_port_t = ctypes.c_uint32
_kern_return_t = ctypes.c_int
_vm_size_t = ctypes.c_size_t  # uintptr_t


class DarwinMemory:
    """libSystem's memory calls, bound once; :meth:`read` is one reading."""

    def __init__(self, library: str = LIBSYSTEM) -> None:
        lib = ctypes.CDLL(library, use_errno=True)
        lib.sysctlbyname.argtypes = [
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.c_void_p,
            ctypes.c_size_t,
        ]
        lib.sysctlbyname.restype = ctypes.c_int
        lib.mach_host_self.argtypes = []
        lib.mach_host_self.restype = _mach_port_t
        lib.host_page_size.argtypes = [_mach_port_t, ctypes.POINTER(_vm_size_t)]
        lib.host_page_size.restype = _kern_return_t
        lib.host_statistics64.argtypes = [
            _mach_port_t,
            ctypes.c_int,
            ctypes.POINTER(VmStatistics64),
            ctypes.POINTER(ctypes.c_uint32),
        ]
        lib.host_statistics64.restype = _kern_return_t
        self._lib = lib
        # Every mach_host_self() call adds a reference to the send right: take one, keep it.
        self._host = lib.mach_host_self()
        self.page_size = self._host_page_size()
        self.total_bytes = self.sysctl_uint64(MEMSIZE_SYSCTL)
        self._unknown_levels: set[int] = set()
        self._level_error: str | None = None

    def read(self) -> MemoryReading:
        """Total, available and wired bytes and the kernel's pressure level, now."""
        stats = self.vm_statistics()
        raw: int | None
        try:
            raw = self.sysctl_int(PRESSURE_SYSCTL)
            self._level_error = None
        except OSError as err:
            raw = None
            if str(err) != self._level_error:  # once per distinct failure, not every few seconds
                self._level_error = str(err)
                log.warning("cannot read the kernel's memory pressure level; judging by available memory", error=str(err))
        if raw is not None and raw not in KERNEL_PRESSURE_LEVELS and raw not in self._unknown_levels:
            self._unknown_levels.add(raw)
            log.warning("unknown kernel memory pressure level; judging by available memory", sysctl=PRESSURE_SYSCTL, value=raw)
        return memory_from_vm_statistics(stats, page_size=self.page_size, total_bytes=self.total_bytes, pressure_level=raw)

    def vm_statistics(self) -> VmStatistics64:
        """One ``host_statistics64(mach_host_self(), HOST_VM_INFO64, ...)``."""
        stats = VmStatistics64()
        count = ctypes.c_uint32(HOST_VM_INFO64_COUNT)
        kr = self._lib.host_statistics64(self._host, HOST_VM_INFO64, ctypes.byref(stats), ctypes.byref(count))
        if kr != KERN_SUCCESS:
            raise OSError(errno.EIO, f"host_statistics64(HOST_VM_INFO64) failed: kern_return_t {kr}")
        if count.value < HOST_VM_INFO64_REV0_COUNT:
            raise OSError(errno.EIO, f"host_statistics64 returned {count.value} words, fewer than vm_statistics64 rev0")
        return stats

    def sysctl_int(self, name: str) -> int:
        return self._sysctl(name, ctypes.c_int())

    def sysctl_uint64(self, name: str) -> int:
        return self._sysctl(name, ctypes.c_uint64())

    def _sysctl(self, name: str, value: ctypes.c_int | ctypes.c_uint64) -> int:
        size = ctypes.c_size_t(ctypes.sizeof(value))
        if self._lib.sysctlbyname(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"sysctlbyname({name}): {os.strerror(err)}")
        if size.value != ctypes.sizeof(value):
            raise OSError(errno.EINVAL, f"sysctlbyname({name}) returned {size.value} bytes, expected {ctypes.sizeof(value)}")
        return value.value

    def _host_page_size(self) -> int:
        size = _vm_size_t()
        kr = self._lib.host_page_size(self._host, ctypes.byref(size))
        if kr != KERN_SUCCESS or not size.value:
            raise OSError(errno.EIO, f"host_page_size failed: kern_return_t {kr}")
        return size.value
