"""Match a job to machines: the same rules the JobMarket contract enforces in ``assignJob``,
applied off-chain first so the coordinator only sends assignments that will succeed, plus
an ordering policy (cheapest first, then fastest) and a fair-share order for queued jobs."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from deepmarket.market.machines import is_available

logger = logging.getLogger(__name__)

MACHINE_ACTIVE = 1


@dataclass(frozen=True)
class JobNeeds:
    """The parts of an on-chain job that matching looks at."""

    job_id: int
    borrower: str
    workers: int
    min_cores: int
    min_memory_mib: int
    max_price_per_core_hour: int


def rejection_reason(machine: dict[str, Any], needs: JobNeeds, now: int, min_stake: int) -> str | None:
    """Why `machine` cannot serve `needs` at unix time `now`, or None if it can."""
    if machine["status"] != MACHINE_ACTIVE:
        return "not active"
    if machine["locked_by"]:
        return f"busy with job {machine['locked_by']}"
    if not is_available(machine["availability_mask"], now):
        return "outside its availability window"
    if machine["lender"].lower() == needs.borrower.lower():
        return "owned by the borrower"
    if machine["cores"] < needs.min_cores or machine["memory_mib"] < needs.min_memory_mib:
        return f"too small ({machine['cores']} cores, {machine['memory_mib']} MiB)"
    if machine["price_per_core_hour"] > needs.max_price_per_core_hour:
        return "above the price cap"
    if machine["stake"] < min_stake:
        return "stake below the minimum"
    return None


def select_machines(needs: JobNeeds, machines: Iterable[dict[str, Any]], now: int, min_stake: int,
                    count: int | None = None, exclude: Iterable[int] = ()) -> list[int] | None:
    """Pick `count` (default: all the job's workers) machines for the job, or None if too few qualify.

    At most one machine per lender is picked, so one owner's failure takes out at most one worker.
    """
    wanted = needs.workers if count is None else count
    excluded = set(exclude)
    eligible = [m for m in machines
                if m["machine_id"] not in excluded and rejection_reason(m, needs, now, min_stake) is None]
    eligible.sort(key=lambda m: (m["price_per_core_hour"], -m["benchmark_score"], m["machine_id"]))
    chosen: list[int] = []
    lenders: set[str] = set()
    for machine in eligible:
        if machine["lender"] in lenders:
            continue
        chosen.append(machine["machine_id"])
        lenders.add(machine["lender"])
        if len(chosen) == wanted:
            return chosen
    return None


def fair_share_order(jobs: Iterable[JobNeeds], lent: dict[str, int], borrowed: dict[str, int]) -> list[JobNeeds]:
    """Order queued jobs so that borrowers who lent more than they borrowed go first.

    The key is the borrower's net core-seconds (lent minus borrowed); ties keep submission order.
    """
    return sorted(jobs, key=lambda j: (-(lent.get(j.borrower, 0) - borrowed.get(j.borrower, 0)), j.job_id))
