"""What each synchronisation point of a traced job cost beyond computing.

A traced job's critical path runs from step to step: a row segment is one step, from
the moment the previous segment's last tile finished computing to the moment its own
last tile did; a segment with exchanges inside (an attention gate's partials, a
channel segment's partial sums: it has gate spans) is one step per exchange, from one
to the next. A step less the longest computing of any device in it is what that
synchronisation point cost: the messages, the receiving loops, the devices' imbalance
and their waits for a quota period. `edgedi demo` reports the medians (and `--json`
every step's cost, as `sync`).
Pure: no I/O.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from edgedi.broker.messages import JobSpan

__all__ = ["SyncCosts", "sync_costs"]


@dataclass(frozen=True)
class SyncCosts:
    boundaries_ms: tuple[float, ...]
    """One per segment boundary on the critical path."""
    exchanges_ms: tuple[float, ...]
    """One per exchange within a segment (gate rounds, channel units)."""

    @property
    def boundary_ms(self) -> float | None:
        return statistics.median(self.boundaries_ms) if self.boundaries_ms else None

    @property
    def exchange_ms(self) -> float | None:
        return statistics.median(self.exchanges_ms) if self.exchanges_ms else None


def sync_costs(spans: Sequence[JobSpan]) -> SyncCosts:
    """The synchronisation costs of one traced job (see the module docstring)."""
    compute: dict[int, dict[str, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    exchanging: set[int] = set()
    for span in spans:
        if span.segment is None:
            continue
        if span.what == "compute":
            compute[span.segment][span.device].append((span.start_ms, span.end_ms))
        elif span.what == "gate":
            exchanging.add(span.segment)
    boundaries: list[float] = []
    exchanges: list[float] = []
    segments = sorted(compute)
    if not segments:
        return SyncCosts((), ())
    previous = min(start for steps in compute[segments[0]].values() for start, _ in steps)
    for position, segment in enumerate(segments):
        devices = {device: sorted(steps) for device, steps in compute[segment].items()}
        if segment in exchanging:
            # Every device computes the same number of steps, one between exchanges.
            for step in range(min(len(steps) for steps in devices.values())):
                end = max(steps[step][1] for steps in devices.values())
                longest = max(steps[step][1] - steps[step][0] for steps in devices.values())
                if step > 0:
                    exchanges.append(end - previous - longest)
                elif position > 0:
                    boundaries.append(end - previous - longest)
                previous = end
            continue
        end = max(stop for steps in devices.values() for _, stop in steps)
        longest = max(sum(stop - start for start, stop in steps) for steps in devices.values())
        if position > 0:
            boundaries.append(end - previous - longest)
        previous = end
    return SyncCosts(tuple(boundaries), tuple(exchanges))
