"""Progress figures for front ends to draw: the stages of a submit, each with its total, and a rate measured over
the watcher's own sliding window of samples. Nothing here draws; ``enqueue.py`` does."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

READING, HASHING, ENQUEUEING = "reading", "hashing", "enqueueing"
BYTES, ROWS = "B", "rows"


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` in ``unit`` for one stage; each stage ends with ``done == total``."""

    stage: str
    done: int
    total: int
    unit: str

    @property
    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)


ProgressCallback = Callable[[Progress], None]


def stage_reporter(
    callback: ProgressCallback | None, stage: str, total: int, unit: str
) -> Callable[[int], None] | None:
    """A ``report(done)`` for one stage that never goes backwards or past ``total``; None without a callback."""
    if callback is None:
        return None
    last = -1

    def report(done: int) -> None:
        nonlocal last
        done = min(max(done, last, 0), total)
        if done != last:
            last = done
            callback(Progress(stage, done, total, unit))

    return report


class RateWindow:
    """Units per second over the last ``seconds`` of samples a watcher took itself.

    A rate since the run's start counts, in a watch's first seconds, everything done before the watch began (or
    the start-up burst of cached rows) as if it had just happened; this one starts with the watch and forgets
    what is older than its window.
    """

    def __init__(self, seconds: float = 30.0) -> None:
        self.seconds = seconds
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, at: float, done: int) -> float | None:
        """Record ``done`` at time ``at`` (monotonic seconds) and return the rate (see ``rate``)."""
        self.samples.append((at, done))
        while len(self.samples) > 2 and self.samples[1][0] <= at - self.seconds:
            self.samples.popleft()  # the oldest kept sample is the last one at or before the window's start
        return self.rate()

    def rate(self) -> float | None:
        """None until two samples are apart in time."""
        if len(self.samples) < 2:
            return None
        (first_at, first), (last_at, last) = self.samples[0], self.samples[-1]
        if last_at <= first_at:
            return None
        return max(0.0, (last - first) / (last_at - first_at))
