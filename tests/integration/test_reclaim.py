"""Owners taking their machines back, and machines outside their availability window.

`deepmarket lender reclaim` makes the worker leave after its next proved checkpoint without a
slash, and then pauses the machine. The coordinator fills the slot with another machine and
the job completes. `deepmarket lender resume` lends the machine again. A machine whose
window excludes the current hour is never assigned.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from market_support import (
    BUDGET,
    FAULT_EPOCHS,
    JOB_CANCELLED,
    JOB_COMPLETED,
    JOB_QUEUED,
    MACHINE_ACTIVE,
    MACHINE_PAUSED,
    MarketTest,
    checkpoint_cids,
    coordinator_log,
    daemon_log,
    job_events,
    job_logs,
    log_tails,
    machines_locked_by,
    market_shortfall,
    upload_digits_bundle,
    wait_until,
)

from deepmarket.localnet import LocalMarketplace
from deepmarket.market.machines import DAYS, HOURS_PER_WEEK, hour_of_week, is_available, parse_windows
from deepmarket.training import digits

WORKERS = 3
CLI_TIMEOUT_S = 120
STATUS_TIMEOUT_S = 120
WAIT_CYCLES_S = 10  # about ten coordinator poll intervals


def windows_excluding(timestamp: int, hours: int = 2) -> str:
    """Return a window string open every hour of the week except `hours` hours from `timestamp`'s hour on.

    Two hours by default, so the window stays closed while a test runs across the hour.
    """
    closed = {(hour_of_week(timestamp) + offset) % HOURS_PER_WEEK for offset in range(hours)}
    parts = []
    for day_index, day in enumerate(DAYS):
        start = None
        for hour in range(25):
            is_open = hour < 24 and day_index * 24 + hour not in closed
            if is_open and start is None:
                start = hour
            elif not is_open and start is not None:
                parts.append(f"{day} {start}-{hour}")
                start = None
    return ", ".join(parts)


def run_cli(net: LocalMarketplace, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m deepmarket ARGV`` with the marketplace's environment, as an owner would."""
    return subprocess.run([sys.executable, "-m", "deepmarket", *argv], env=net.env(), capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, check=False)


@pytest.mark.integration
def test_reclaimed_machine_leaves_without_slash(market: MarketTest, demo_inputs: digits.DemoInputs) -> None:
    client, net = market.client, market.net
    # Registered first, so the lowest machine id: matching would prefer it if it ignored windows.
    [closed] = market.start_lenders(1, windows=windows_excluding(int(time.time())))
    lenders = market.start_lenders(WORKERS + 1)
    bundle_cid = upload_digits_bundle(net.store, demo_inputs)
    balances_before = net.balances()
    borrower_credit_before = client.withdrawable(market.borrower.address)

    job_id = market.submit_job(bundle_cid, workers=WORKERS)
    market.wait_for_assignment(job_id)
    owner = market.lender_in_slot(job_id, 1)
    market.wait_for_checkpoint(job_id, 1, owner.machine_id)
    stake_before = client.get_machine(owner.machine_id)["stake"]
    reclaim = run_cli(net, "lender", "reclaim", "--work-dir", str(net.root / owner.name))
    assert reclaim.returncode == 0, reclaim.stderr
    assert "request written" in reclaim.stdout

    job = market.wait_for_status(job_id, JOB_COMPLETED)
    logs = log_tails(net, market.daemon_names())

    # The owner's machine left once, unslashed, and was paused; another machine took its slot.
    left = job_logs(client, "WorkerLeft", job_id)
    assert [log["args"]["machineId"] for log in left] == [owner.machine_id], logs
    assert left[0]["args"]["slot"] == 1
    assert job_events(client, "WorkerFaulted", job_id) == []
    assert client.get_machine(owner.machine_id)["stake"] == stake_before
    wait_until(net, lambda: client.get_machine(owner.machine_id)["status"] == MACHINE_PAUSED, STATUS_TIMEOUT_S,
               f"machine {owner.machine_id} to be paused", market.daemon_names())
    assert f"machine paused for its owner: machine {owner.machine_id}" in daemon_log(net, owner.name)
    initial = list(job_events(client, "JobAssigned", job_id)[0]["machineIds"])
    [spare] = [lender for lender in lenders if lender.machine_id not in initial]
    replaced = job_events(client, "WorkerReplaced", job_id)
    assert len(replaced) == 1, logs
    assert replaced[0]["oldMachineId"] == owner.machine_id
    assert replaced[0]["newMachineId"] == spare.machine_id
    assert [w["machine_id"] for w in client.get_workers(job_id)][1] == spare.machine_id

    # The machine outside its window was never assigned, neither at first nor as the replacement.
    assigned = {event["machineId"] for event in job_events(client, "WorkerAssigned", job_id)}
    assert closed.machine_id not in assigned
    assert assigned == {lender.machine_id for lender in lenders}

    # The owner proved checkpoints up to its leave and none after; the job proved every checkpoint.
    owner_proofs = [log for log in job_logs(client, "ProofRecorded", job_id)
                    if log["args"]["machineId"] == owner.machine_id]
    assert owner_proofs, f"{owner.name} proved nothing before leaving\n{logs}"
    assert all(log["blockNumber"] <= left[0]["blockNumber"] for log in owner_proofs)
    assert max(log["args"]["checkpointIndex"] for log in owner_proofs) < FAULT_EPOCHS
    proofs = job_events(client, "ProofRecorded", job_id)
    cids = checkpoint_cids(proofs)
    assert sorted(cids) == list(range(1, FAULT_EPOCHS + 1)), logs
    for index, found in cids.items():
        assert len(found) == 1, f"checkpoint {index} has CIDs {found}"
    for machine_id in (w["machine_id"] for w in client.get_workers(job_id)):
        assert FAULT_EPOCHS in [p["checkpointIndex"] for p in proofs if p["machineId"] == machine_id]

    # Everyone who worked, the owner included, withdraws exactly what its proofs paid.
    completed = job_events(client, "JobCompleted", job_id)
    assert len(completed) == 1
    assert job["paid"] == sum(p["payment"] for p in proofs)
    assert completed[0]["refund"] == BUDGET - job["paid"]
    assert client.withdrawable(market.borrower.address) - borrower_credit_before == BUDGET - job["paid"]
    wait_until(net, lambda: all(client.withdrawable(lender.account.address) == 0 for lender in lenders), 120,
               "lenders to claim their payouts", market.daemon_names())
    balances_after = net.balances()
    for lender in [closed, *lenders]:
        earned = balances_after[lender.name] - balances_before[lender.name]
        assert earned == sum(p["payment"] for p in proofs if p["lender"] == lender.account.address), lender.name
    assert sum(balances_after.values()) == sum(balances_before.values())
    assert machines_locked_by(client, job_id) == []
    assert market_shortfall(client) == 0

    # `deepmarket lender resume` lends the machine again.
    resume = run_cli(net, "lender", "resume", "--work-dir", str(net.root / owner.name))
    assert resume.returncode == 0, resume.stderr
    wait_until(net, lambda: client.get_machine(owner.machine_id)["status"] == MACHINE_ACTIVE, STATUS_TIMEOUT_S,
               f"machine {owner.machine_id} to be active again", market.daemon_names())
    assert f"machine resumed by the owner: machine {owner.machine_id}" in daemon_log(net, owner.name)


@pytest.mark.integration
def test_machine_outside_window_not_assigned(market: MarketTest, demo_inputs: digits.DemoInputs) -> None:
    client, net = market.client, market.net
    now = int(time.time())
    windows = windows_excluding(now)
    assert not is_available(parse_windows(windows), now)
    assert is_available(parse_windows(windows), now + 3 * 3600)
    [lender] = market.start_lenders(1, windows=windows)
    assert not client.registry.functions.isAvailable(lender.machine_id, client.latest_timestamp()).call()
    bundle_cid = upload_digits_bundle(net.store, demo_inputs)

    job_id = market.submit_job(bundle_cid, workers=1)
    waiting = f"job {job_id} waits: no 1 machines qualify now"
    wait_until(net, lambda: waiting in coordinator_log(net), 180, f"the coordinator to log {waiting!r}")
    time.sleep(WAIT_CYCLES_S)
    logs = log_tails(net, market.daemon_names())

    assert client.get_job(job_id)["status"] == JOB_QUEUED, logs
    assert job_events(client, "JobAssigned", job_id) == []
    assert job_events(client, "WorkerAssigned", job_id) == []
    wait_line = next(line for line in coordinator_log(net).splitlines() if waiting in line)
    assert f"machine {lender.machine_id}: outside its availability window" in wait_line
    assert client.get_machine(lender.machine_id)["locked_by"] == 0

    assert client.cancel_job(market.borrower, job_id) == BUDGET
    assert client.get_job(job_id)["status"] == JOB_CANCELLED
