"""A small progress bar for terminals, with no dependencies.

    bar = ProgressBar(total=24, label="images")
    for ...:
        bar.write(f"result line {k}")   # printed above the bar
        bar.advance()
    bar.close()

On a terminal the bar is one line redrawn in place (`\\r`), and `write` clears it,
prints the line and draws it again below, so result lines and the bar never mix.
Anywhere else (a pipe, a CI log, a test capturing output) there is no bar at all:
`write` prints plain lines and `advance` prints nothing, so logs stay readable
and free of control characters.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

__all__ = ["ProgressBar", "render_bar"]

# Redrawing faster than this only costs terminal bandwidth; nobody sees it.
_MIN_REDRAW_S = 0.05


def render_bar(done: int, total: int, width: int, *, suffix: str = "") -> str:
    """`[#####.....]  5/10  50%` followed by `suffix`, fitted into `width` characters."""
    total = max(total, 1)
    done = min(max(done, 0), total)
    counter = f" {done:>{len(str(total))}}/{total} {100 * done // total:3d}%"
    text_suffix = f"  {suffix}" if suffix else ""
    room = width - len(counter) - len(text_suffix) - 2
    if room < 5:  # a very narrow terminal: drop the suffix before the bar
        text_suffix = ""
        room = width - len(counter) - 2
    room = max(room, 0)
    filled = room * done // total
    bar = f"[{'#' * filled}{'.' * (room - filled)}]" if room else ""
    return (bar + counter + text_suffix)[:width]


class ProgressBar:
    """Progress of `total` items; a live bar on a TTY, plain lines elsewhere."""

    def __init__(
        self,
        total: int,
        *,
        label: str = "",
        stream: TextIO | None = None,
        live: bool | None = None,
    ) -> None:
        self.total = total
        self.done = 0
        self.label = label
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty()) if live is None and isatty is not None else bool(live)
        self._started = time.monotonic()
        self._drawn = False
        self._last_draw = 0.0
        self._closed = False

    def _width(self) -> int:
        return max(20, shutil.get_terminal_size((80, 24)).columns - 1)

    def _suffix(self) -> str:
        elapsed = time.monotonic() - self._started
        rate = self.done / elapsed if elapsed > 0 and self.done else 0.0
        parts = [part for part in (self.label, f"{rate:.1f}/s" if rate else "") if part]
        return " ".join(parts)

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[2K")  # carriage return, erase the whole line
            self._drawn = False

    def _draw(self, force: bool = False) -> None:
        if not self.live or self._closed:
            return
        now = time.monotonic()
        if not force and self._drawn and now - self._last_draw < _MIN_REDRAW_S:
            return
        self._clear()
        self.stream.write(render_bar(self.done, self.total, self._width(), suffix=self._suffix()))
        self.stream.flush()
        self._drawn = True
        self._last_draw = now

    def write(self, line: str) -> None:
        """Print `line` (above the bar on a terminal)."""
        self._clear()
        self.stream.write(line + "\n")
        self.stream.flush()
        self._draw(force=True)

    def advance(self, count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        self._draw(force=self.done == self.total)

    def close(self) -> None:
        """Remove the bar (the result lines stay); safe to call twice."""
        if self._closed:
            return
        self._clear()
        self.stream.flush()
        self._closed = True

    def __enter__(self) -> ProgressBar:
        self._draw(force=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
