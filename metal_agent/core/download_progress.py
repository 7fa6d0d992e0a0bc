"""What a running download is doing, said for a service's status and the byte gauges (pure).

Why its own module: one file's download (`adapters.downloads`) and a whole
MLX snapshot (`adapters.snapshots`) report progress the same way: bytes
done of how many, a smoothed rate, the retry being waited for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: The rate is measured over windows of at least this many seconds.
RATE_WINDOW_S = 1.0


def human_size(n: float, unit_of: float | None = None) -> str:
    ref = n if unit_of is None else unit_of
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if ref >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


@dataclass
class Progress:
    """What a download is doing, for `ModelPending.message` and the byte gauges."""

    phase: str = "starting"  # starting, checking, hashing, connecting, downloading, retrying
    done: int = 0
    total: int | None = None
    rate: float = 0.0  # bytes/s, smoothed
    error: str | None = None
    attempt: int = 0
    retry_in: float | None = None
    _mark: tuple[float, int] = field(default=(0.0, 0), repr=False)

    def advance(self, done: int, now: float) -> None:
        t0, d0 = self._mark
        self.done = done
        if not t0:
            self._mark = (now, done)
        elif now - t0 >= RATE_WINDOW_S:
            current = (done - d0) / (now - t0)
            self.rate = current if not self.rate else 0.5 * self.rate + 0.5 * current
            self._mark = (now, done)

    def reset_rate(self) -> None:
        self.rate, self._mark = 0.0, (0.0, 0)

    def amount(self) -> str:
        if self.total:
            unit = human_size(self.total)
            return f"{human_size(self.done, self.total).split()[0]}/{unit}"
        return human_size(self.done)

    def message(self, where: str) -> str:
        if self.phase == "checking":
            return "checking the cached model file"
        if self.phase == "hashing":
            return f"verifying the {human_size(self.done)} already downloaded before resuming"
        if self.phase == "retrying":
            return (f"download from {where} failed (attempt {self.attempt}): {self.error}; "
                    f"retrying in {self.retry_in:.0f} s, {self.amount()} kept")
        if self.phase == "downloading":
            rate = f" at {human_size(self.rate)}/s" if self.rate else ""
            return f"downloading {self.amount()}{rate} from {where}"
        return f"connecting to {where}"
