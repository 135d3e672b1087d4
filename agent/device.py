"""What this device is: its capabilities and its measured speed (the birth's content).

`measure_profile` times the micro-benchmarks of `edgedi.models.profiling` within the
configured budget and fits the planner's per-cost-class time models
(`seconds ≈ a·MACs + b`). The fit is cached in the state directory (systemd's
`StateDirectory=`), keyed by everything that changes the numbers (thread count,
torch version, machine), so a restarted agent is announced in milliseconds instead
of re-running the benchmark. `compute.slowdown` scales the announced profile: an
emulated slower device must look slower to the planner too.

Blocking functions here run on the device's compute thread, never on the loop.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

import edgedi.models.profiling as profiling
from edgedi.agent.model_store import TORCH_RNG_LOCK, ModelStore
from edgedi.agent.pacing import step_clock
from edgedi.broker.messages import DeviceCapabilities, UnitProfile
from edgedi.models.calibration import time_model_tiles
from edgedi.planner.profiles import fit_profile
from edgedi.planner.unit_costs import fit_channel_times, fit_unit_times

__all__ = [
    "ProfileTable",
    "available_memory_bytes",
    "capabilities",
    "measure_profile",
    "measure_unit_profiles",
    "software_version",
]

logger = logging.getLogger(__name__)

ProfileTable = dict[str, tuple[float, float]]
"""Per cost class `(seconds_per_mac, seconds_fixed)`: the birth's `profile` field."""

# A cached profile older than this is measured again (software and thermal state drift).
PROFILE_CACHE_MAX_AGE_S = 7 * 24 * 3600.0


def _fresh(measured_at: float) -> bool:
    """A cached measurement's age on the wall clock (the only one that survives a
    reboot); one from the future (the clock went back since) is not trusted."""
    return 0.0 <= time.time() - measured_at <= PROFILE_CACHE_MAX_AGE_S


def software_version() -> str:
    try:
        from importlib.metadata import version

        return version("edgedi")
    except Exception:  # not installed as a distribution (a source checkout)
        return "0+unknown"


def available_memory_bytes() -> int:
    """Memory available for inference: MemAvailable on Linux, else physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def capabilities(models: tuple[str, ...], threads: int | None) -> DeviceCapabilities:
    cores = threads or os.cpu_count() or 1
    return DeviceCapabilities(
        cores=cores,
        memory_bytes=available_memory_bytes(),
        machine=f"{platform.system()}-{platform.machine()}"[:200],
        software_version=software_version()[:100],
        torch_version=str(torch.__version__)[:100],
        models=models,
    )


def _cache_key(threads: int) -> str:
    return f"{platform.machine()}-torch{torch.__version__}-threads{threads}"


def _read_cache(path: Path, key: str) -> ProfileTable | None:
    try:
        document: Any = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("key") != key:
        return None
    measured_at = document.get("measured_at")
    if not isinstance(measured_at, int | float) or not _fresh(measured_at):
        return None
    table = document.get("profile")
    if not isinstance(table, dict):
        return None
    result: ProfileTable = {}
    for name, pair in table.items():
        if (
            not isinstance(name, str)
            or not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(v, int | float) and v >= 0 for v in pair)
        ):
            return None
        result[name] = (float(pair[0]), float(pair[1]))
    return result or None


def _write_cache(path: Path, key: str, table: ProfileTable) -> None:
    document = {
        "key": key,
        "measured_at": time.time(),
        "profile": {name: list(pair) for name, pair in table.items()},
    }
    _write_json(path, document, "the profile")


def _write_json(path: Path, document: dict[str, Any], what: str) -> None:
    """Replace `path` atomically with `document` (a cache: failing only warns)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(document, indent=1))
        temporary.replace(path)
    except OSError as error:
        logger.warning("could not cache %s in %s: %s", what, path, error)


def store_profile(state_dir: Path, table: ProfileTable, threads: int) -> None:
    """Leave `table` where an agent with `threads` torch threads reads its cached profile.

    For launchers that measured the device better than the start-up benchmark can
    (e.g. `edgedi.agent.local_cluster`, which times the real model in a CPU quota).
    """
    _write_cache(state_dir / "profile.json", _cache_key(threads), table)


def measure_profile(
    budget_s: float,
    threads: int,
    *,
    state_dir: Path | None = None,
    slowdown: float = 1.0,
) -> ProfileTable:
    """The fitted time models of this device (blocking; run it on the compute thread)."""
    key = _cache_key(threads)
    cache = state_dir / "profile.json" if state_dir is not None else None
    table = _read_cache(cache, key) if cache is not None else None
    if table is not None:
        logger.info("using the cached device profile from %s", cache)
    else:
        started = time.perf_counter()
        with TORCH_RNG_LOCK:  # the benchmark's inputs come from the global generator
            samples = profiling.run_profile(budget_s, threads=threads)
        fitted = fit_profile(samples)
        table = {
            name: (model.seconds_per_mac, model.seconds_fixed) for name, model in fitted.items()
        }
        logger.info("profiled %d cases in %.1f s", len(samples), time.perf_counter() - started)
        if cache is not None:
            _write_cache(cache, key, table)
    return {name: (a * slowdown, b * slowdown) for name, (a, b) in table.items()}


def _unit_cache_key(threads: int, digest: str) -> str:
    # v2: units timed without the per-tile conversion, which is timed apart;
    # v3: channel tiles timed too.
    return f"{_cache_key(threads)}-{digest}-v3"


def _read_unit_cache(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def measure_unit_profiles(
    store: ModelStore,
    threads: int,
    *,
    state_dir: Path | None = None,
    slowdown: float = 1.0,
) -> dict[str, UnitProfile]:
    """Per held model, what its tiles cost on this device (blocking: compute thread).

    Cached in the state directory per model, keyed by the architecture digest and
    the thread count, torch version and machine, so a restart re-announces at once.
    `slowdown` scales the times as the emulated device runs them.
    """
    cache = state_dir / "unit-profiles.json" if state_dir is not None else None
    document = _read_unit_cache(cache) if cache is not None else {}
    changed = False
    result: dict[str, UnitProfile] = {}
    # Paced (agent.pacing): timed by the clock that paces the steps, so agents
    # calibrating at once on shared cores do not time each other.
    clock = step_clock(slowdown)
    for name in store.held:
        held = store.get(name)
        key = _unit_cache_key(threads, held.digest)
        if clock is not time.perf_counter:
            key += "-cpu"
        entry = document.get(name)
        profile: UnitProfile | None = None
        if (
            isinstance(entry, dict)
            and entry.get("key") == key
            and isinstance(entry.get("measured_at"), int | float)
            and _fresh(entry["measured_at"])
        ):
            try:
                profile = UnitProfile.model_validate(entry.get("profile"), strict=False)
            except ValueError:
                profile = None
        if profile is None:
            started = time.perf_counter()
            with TORCH_RNG_LOCK:
                timing = time_model_tiles(held.model, clock=clock)
            fitted = fit_unit_times(
                held.spec, timing.tiles, timing.tail_seconds, timing.copy_seconds_per_byte
            )
            channel_models = fit_channel_times(held.spec, timing.channel_tiles)
            profile = UnitProfile(
                digest=held.digest,
                units=tuple((m.seconds_per_mac, m.seconds_fixed) for m in fitted.units),
                tail_seconds=fitted.tail_s,
                copy_seconds_per_byte=fitted.copy_s_per_byte,
                channel_units=(
                    tuple(
                        None if m is None else (m.seconds_per_mac, m.seconds_fixed)
                        for m in channel_models
                    )
                    if any(m is not None for m in channel_models)
                    else None
                ),
            )
            logger.info(
                "timed %d tiles of %s in %.1f s",
                len(timing.tiles),
                name,
                time.perf_counter() - started,
            )
            document[name] = {
                "key": key,
                "measured_at": time.time(),
                "profile": profile.model_dump(mode="json"),
            }
            changed = True
        result[name] = profile.model_copy(
            update={
                "units": tuple((a * slowdown, b * slowdown) for a, b in profile.units),
                "tail_seconds": profile.tail_seconds * slowdown,
                "copy_seconds_per_byte": profile.copy_seconds_per_byte * slowdown,
                "channel_units": None
                if profile.channel_units is None
                else tuple(
                    None if m is None else (m[0] * slowdown, m[1] * slowdown)
                    for m in profile.channel_units
                ),
            }
        )
    if changed and cache is not None:
        _write_json(cache, document, "the tile timings")
    return result
