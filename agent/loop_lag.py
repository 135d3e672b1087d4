"""How long this process's own event loop could not run, lately.

Silence is judged against a clock: a device is gone when its last heartbeat is
older than `SILENT_AFTER_S`. When *our* loop was held up (a slow handler, the
machine swapping, a debugger), the heartbeats of the others sat unread in the
socket; judging them by the wall clock would declare every device gone at once.
So the membership clock runs slow by the recent stalls: `LoopLag.judged(now)` is
`now` minus the loop's lag over the last `window_s` seconds, and never later than
the moment the receive loop last caught up with its queue (`backlog_since`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

__all__ = ["LoopLag"]

_PERIOD_S = 0.05
# Lateness below this is scheduling noise, not a stall.
_NOISE_S = 0.02


class LoopLag:
    """Measures the loop's lateness; `run()` is the measuring task."""

    def __init__(
        self,
        window_s: float,
        *,
        period_s: float = _PERIOD_S,
        behind_since: Callable[[], float | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.period_s = period_s
        self._behind_since = behind_since
        self._clock = clock
        self._stalls: deque[tuple[float, float]] = deque()
        self._awake_at: float | None = None
        self.worst_s = 0.0
        """The longest single stall seen (for diagnostics)."""

    async def run(self) -> None:
        while True:
            before = self._clock()
            self._awake_at = before
            await asyncio.sleep(self.period_s)
            self.record(self._clock() - before - self.period_s, at=self._clock())

    def record(self, lag_s: float, *, at: float) -> None:
        """The loop woke `lag_s` seconds late at `at` (called by `run`, and by tests)."""
        if lag_s <= _NOISE_S:
            return
        self._stalls.append((at, lag_s))
        self.worst_s = max(self.worst_s, lag_s)

    def recent(self, now: float) -> float:
        """Seconds the loop was stalled in the last `window_s` seconds, including a
        stall that has just ended but that `run` has not woken to record yet."""
        while self._stalls and self._stalls[0][0] < now - self.window_s:
            self._stalls.popleft()
        total = sum(lag for _, lag in self._stalls)
        if self._awake_at is not None:
            ongoing = now - self._awake_at - self.period_s
            if ongoing > _NOISE_S:
                total += ongoing
        return total

    def judged(self, now: float | None = None) -> float:
        """The time to judge silence at: `now` less recent stalls, and no later than
        when the receive loop last had nothing waiting (what came after that, we
        have not read yet)."""
        now = self._clock() if now is None else now
        judged = now - self.recent(now)
        behind = self._behind_since() if self._behind_since is not None else None
        if behind is not None:
            judged = min(judged, behind)
        return judged
