"""Pure helpers: percentiles, summaries and the shape of `bench.json` (no I/O)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["BENCH_KEYS", "check_shape", "drift", "percentile", "rate_mb_s", "summary", "summary_p50"]

# Exactly the keys of bench.json (issue 7); values in ms unless the name says otherwise.
BENCH_KEYS = (
    "create_exec_kill_ms",
    "podman_run_ms",
    "exec_ms",
    "podman_exec_ms",
    "file_write_MBps",
    "file_read_MBps",
    "concurrent_create_50",
    "idle_host_mem_mb_per_sandbox",
    "pause_ms",
    "resume_ms",
    "template_cached_rebuild_s",
)


def percentile(values: Sequence[float], pct: float) -> float:
    """The `pct` percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _round(value: float) -> float:
    return round(value, 2)


def summary(values: Sequence[float]) -> dict[str, Any]:
    """`{p50, p99, n}` of samples in ms."""
    return {"p50": _round(percentile(values, 50)), "p99": _round(percentile(values, 99)), "n": len(values)}


def summary_p50(values: Sequence[float]) -> dict[str, Any]:
    return {"p50": _round(percentile(values, 50)), "n": len(values)}


def drift(values: Sequence[float]) -> float:
    """How stable the median is: |p50(first half) - p50(second half)| / p50(all), as a fraction."""
    if len(values) < 4:
        return math.nan
    half = len(values) // 2
    whole = statistics.median(values)
    return abs(statistics.median(values[:half]) - statistics.median(values[half:])) / whole if whole else math.nan


def rate_mb_s(size_bytes: int, seconds: float) -> float:
    """Throughput in MB/s, with MB = 2**20 bytes (MiB, the smaller unit)."""
    return _round(size_bytes / 2**20 / seconds)


def check_shape(result: Mapping[str, Any]) -> None:
    """bench.json must have exactly BENCH_KEYS (ValueError otherwise)."""
    if tuple(result) != BENCH_KEYS:
        raise ValueError(f"bench.json keys {list(result)} != {list(BENCH_KEYS)}")
