"""Where published systems cut a network into fused segments."""

from __future__ import annotations

from edgedi.models.units import Unit


def stage_blocks(units: tuple[Unit, ...]) -> list[tuple[int, int]]:
    """Stages ending with their down-sampling unit (a pool or a strided unit).

    VGG: [conv, conv, pool], [conv, conv, pool], ...; ResNet: [stem], [pool], [blocks of
    a stage up to and including the next stage's strided block], ...
    """
    blocks = []
    start = 0
    for position, unit in enumerate(units):
        if unit.out_shape[1] < unit.in_shape[1] or position == len(units) - 1:
            blocks.append((start, position))
            start = position + 1
    return blocks


def between_pools(units: tuple[Unit, ...]) -> list[tuple[int, int, bool]]:
    """Runs of non-pool units (fused, distributed) and the pools alone (`True`: a pool)."""
    blocks: list[tuple[int, int, bool]] = []
    start = 0
    for position, unit in enumerate(units):
        if unit.kind == "pool":
            if start < position:
                blocks.append((start, position - 1, False))
            blocks.append((position, position, True))
            start = position + 1
    if start < len(units):
        blocks.append((start, len(units) - 1, False))
    return blocks
