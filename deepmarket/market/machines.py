"""Machine specs: what a lender offers, read from the host, and weekly availability windows.

A window string lists UTC day ranges and hour ranges, e.g. ``"mon-fri 18-24, sat-sun 0-24"``
or ``"always"``. Hours are half-open: ``18-24`` covers 18:00 to 23:59. The result is the
168-bit mask the registry stores, bit ``h`` = hour-of-week ``h`` counted from Monday 00:00 UTC.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import psutil

from deepmarket.errors import ConfigError

logger = logging.getLogger(__name__)

HOURS_PER_WEEK = 168
ALWAYS = (1 << HOURS_PER_WEEK) - 1
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class MachineSpec:
    """Machine description a lender declares. The field order matches MachineRegistry.MachineSpec."""

    cores: int
    memory_mib: int
    gpus: int
    benchmark_score: int
    price_per_core_hour: int  # credit base units
    availability_mask: int
    endpoint: str  # host:port of this machine's TensorFlow server

    def as_tuple(self) -> tuple[Any, ...]:
        return (self.cores, self.memory_mib, self.gpus, self.benchmark_score, self.price_per_core_hour,
                self.availability_mask, self.endpoint)


def host_resources() -> tuple[int, int]:
    """Cores and memory (MiB) of this host, as a lender would offer them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory_mib = psutil.virtual_memory().total // (1024 * 1024)
    return cores, int(memory_mib)


def parse_windows(text: str) -> int:
    """Turn a window string such as ``"mon-fri 18-24, sun 0-24"`` into a 168-bit mask."""
    text = text.strip().lower()
    if text in ("always", "*"):
        return ALWAYS
    if text in ("never", ""):
        return 0
    mask = 0
    for part in text.split(","):
        pieces = part.split()
        if len(pieces) != 2:
            raise ConfigError(f"availability window {part.strip()!r} is invalid: write it as "
                              f"'<day>[-<day>] <start>-<end>', e.g. 'mon-fri 18-24'")
        days, hours = pieces
        try:
            day_range, (start, end) = _day_range(days), _hour_range(hours)
        except ConfigError as exc:
            raise ConfigError(f"availability window {part.strip()!r}: {exc}") from exc
        for day in day_range:
            for hour in range(start, end):
                mask |= 1 << (day * 24 + hour)
    return mask


def hour_of_week(timestamp: int) -> int:
    """Hour of the week in UTC (0 = Monday 00:00), as MachineRegistry computes it."""
    return (timestamp // 3600 + 72) % HOURS_PER_WEEK


def is_available(mask: int, timestamp: int) -> bool:
    return bool((mask >> hour_of_week(timestamp)) & 1)


def _day_range(text: str) -> range:
    first, _, last = text.partition("-")
    try:
        start = DAYS.index(first[:3])
        end = DAYS.index(last[:3]) if last else start
    except ValueError as exc:
        raise ConfigError(f"day range {text!r} is invalid: use mon, tue, wed, thu, fri, sat, sun") from exc
    if end < start:
        raise ConfigError(f"day range {text!r} runs backwards: write it as two ranges, e.g. 'sat-sun'")
    return range(start, end + 1)


def _hour_range(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    try:
        start, end = int(first), int(last)
    except ValueError as exc:
        raise ConfigError(f"hour range {text!r} is invalid: write it as '<start>-<end>' in 0..24") from exc
    if not 0 <= start < end <= 24:
        raise ConfigError(f"hour range {text!r} is invalid: need 0 <= start < end <= 24")
    return start, end
