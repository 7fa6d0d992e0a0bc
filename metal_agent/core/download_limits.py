"""How much a download may write, and how much disk it must leave. Pure rules, no I/O.

A Model's source is a stranger's URL, and the server behind it decides how
many bytes come back. Left alone, one Model fills the Mac's disk (the
agent's state, the owner's files, swap). So the size of every download is
known before the first byte is written, and bounded:

* The size comes from the response (Content-Length, or the total of a
  Content-Range) or from a listing that names it (a hub snapshot). A body
  of unknown size is accepted only when the Model pins its sha256: then the
  bytes are bounded by the cap and must hash to the pinned digest.
* No file is larger than the owner's cap (`--max-download-size`).
* The body is cut at the first byte past what was announced.
* Before writing, the file must fit with the owner's free-space margin
  (`--download-free-margin`) to spare; while writing, free space is read
  again every `check_every` bytes and the download stops (its partial file
  removed) when the margin is reached.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30

DEFAULT_MAX_SIZE = 256 * GiB  # above the largest single GGUF files published (the hub caps files at 50 GB)
DEFAULT_FREE_MARGIN = 5 * GiB  # room for logs, state and the system when a model fills the volume
DEFAULT_CHECK_EVERY = 64 << 20  # one statvfs per 64 MiB written

REASON_TOO_LARGE = "ModelTooLarge"
REASON_SIZE_UNKNOWN = "ModelSizeUnknown"
REASON_DISK = "InsufficientDisk"


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Refusal:
    reason: str
    message: str


@dataclass(frozen=True)
class DownloadLimits:
    """The owner's bounds on downloads (agent flags)."""

    max_size: int = DEFAULT_MAX_SIZE
    free_margin: int = DEFAULT_FREE_MARGIN
    check_every: int = DEFAULT_CHECK_EVERY

    def file_limit(self, where: str, announced: int | None, declared: int | None,
                   pinned_sha256: bool) -> int | Refusal:
        """The most bytes the file at `where` may have, or why it is not downloaded.

        `announced`: the size the server gave (Content-Length or Content-Range total);
        `declared`: a size known beforehand (a hub listing); `pinned_sha256`: the Model gives one.
        """
        known = [n for n in (announced, declared) if n is not None]
        if not known and not pinned_sha256:
            return Refusal(REASON_SIZE_UNKNOWN,
                           f"{where} did not say how large the file is (no Content-Length) and the Model pins no "
                           "sha256; set spec.sha256, or serve the file with a Content-Length")
        biggest = max(known, default=0)
        if biggest > self.max_size:
            return Refusal(REASON_TOO_LARGE,
                           f"{where} offers {_size(biggest)}, more than this Mac's limit of {_size(self.max_size)} "
                           "per model file (--max-download-size)")
        return min([*known, self.max_size])

    def space_refusal(self, directory: str, free: int, still_needed: int) -> Refusal | None:
        """None if `still_needed` more bytes fit in `free` with the margin to spare."""
        if free - still_needed >= self.free_margin:
            return None
        return Refusal(REASON_DISK, self.disk_message(directory, free, still_needed))

    def disk_message(self, directory: str, free: int, still_needed: int | None) -> str:
        need = f"{_size(still_needed)} more and " if still_needed else ""
        return (f"not enough disk space in {directory}: the download needs {need}{_size(self.free_margin)} kept free "
                f"(--download-free-margin), {_size(max(free, 0))} is free; the partial file was removed")
