"""Log lines that a flood cannot multiply: at most one per key and interval.

A peer can send thousands of bad messages a second; each is refused, counted and
logged, but the log gets one line per kind of trouble every `interval_seconds`,
saying how many similar lines were held back since.
"""

from __future__ import annotations

import logging
import time

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """At most one line per key and interval, with the count of those suppressed."""

    def __init__(
        self, logger: logging.Logger, interval_seconds: float = 10.0, max_keys: int = 256
    ) -> None:
        self._logger = logger
        self._interval = interval_seconds
        self._max_keys = max_keys
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(
        self, level: int, key: str, message: str, *args: object, exc_info: bool = False
    ) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        if len(self._last) >= self._max_keys:  # keys chosen by a peer must not pile up
            self._last.clear()
            self._suppressed.clear()
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += " (%d similar suppressed)"
            args = (*args, suppressed)
        self._logger.log(level, message, *args, exc_info=exc_info)

    def warning(self, key: str, message: str, *args: object) -> None:
        self.log(logging.WARNING, key, message, *args)
