"""A coordinator killed with SIGKILL at two points of one job's life, and started again each time.

The first kill comes right after it assigned the job, before any worker reported ready. The
second comes while it settles the job, as soon as the chief proved the last checkpoint.

The restarted coordinator continues from its SQLite state and the chain: the job completes
with one assignment, every receipt recorded once and one completion.
"""

from __future__ import annotations

import dataclasses
import signal
from collections import Counter
from collections.abc import Iterator

import pytest
from market_support import (
    BUDGET,
    JOB_COMPLETED,
    JOB_RUNNING,
    MarketTest,
    job_events,
    log_tails,
    machines_locked_by,
    market_shortfall,
    upload_digits_bundle,
    wait_until,
)

from deepmarket.localnet import LocalMarketplace
from deepmarket.training import digits

EPOCHS = 4
WORKERS = 2
ASSIGNMENT_TIMEOUT_S = 300
FINAL_PROOF_TIMEOUT_S = 600
POLL_S = 0.2  # how often the test looks for the event that triggers a kill


@pytest.fixture
def coordinator_restored(market: MarketTest) -> Iterator[LocalMarketplace]:
    """Yield the marketplace, and start its coordinator again afterwards if the test left it stopped."""
    yield market.net
    if "coordinator" not in market.net.processes:
        market.net.start_coordinator()


def kill_coordinator(net: LocalMarketplace) -> None:
    process = net.processes["coordinator"]
    net.stop_process("coordinator", sig=signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.integration
def test_coordinator_killed_at_assignment_and_settlement(market: MarketTest, demo_inputs: digits.DemoInputs,
                                                         coordinator_restored: LocalMarketplace) -> None:
    client, net = market.client, market.net
    lenders = market.start_lenders(WORKERS)
    config = dataclasses.replace(digits.DEMO_CONFIG, epochs=EPOCHS)
    bundle_cid = upload_digits_bundle(net.store, demo_inputs, config)
    borrower_credit_before = client.withdrawable(market.borrower.address)

    # First crash: as soon as the assignment is on chain. TensorFlow takes seconds to start,
    # so no worker can have reported ready yet.
    job_id = market.submit_job(bundle_cid, workers=WORKERS)
    wait_until(net, lambda: job_events(client, "JobAssigned", job_id) != [], ASSIGNMENT_TIMEOUT_S,
               f"job {job_id} to be assigned", market.daemon_names(), interval_s=POLL_S)
    kill_coordinator(net)
    assert job_events(client, "WorkerReady", job_id) == []
    net.start_coordinator()

    # Second crash: as soon as the chief proved the last checkpoint, before the job is settled.
    chief = job_events(client, "JobAssigned", job_id)[0]["machineIds"][0]

    def chief_proved_last() -> bool:
        return any(p["machineId"] == chief and p["checkpointIndex"] == EPOCHS
                   for p in job_events(client, "ProofRecorded", job_id))

    wait_until(net, chief_proved_last, FINAL_PROOF_TIMEOUT_S, f"the chief of job {job_id} to prove checkpoint "
               f"{EPOCHS}", market.daemon_names(), interval_s=POLL_S)
    kill_coordinator(net)
    assert client.get_job(job_id)["status"] == JOB_RUNNING
    net.start_coordinator()

    job = market.wait_for_status(job_id, JOB_COMPLETED)
    logs = log_tails(net, market.daemon_names())

    # One assignment, in round 1, on the test's two machines; no worker was faulted or replaced.
    assigned_events = job_events(client, "JobAssigned", job_id)
    assert [event["round"] for event in assigned_events] == [1], logs
    assert job["round"] == 1
    assert sorted(assigned_events[0]["machineIds"]) == sorted(lender.machine_id for lender in lenders)
    assert len(job_events(client, "WorkerAssigned", job_id)) == WORKERS
    assert job_events(client, "WorkerFaulted", job_id) == []
    assert job_events(client, "WorkerReplaced", job_id) == []
    assert job_events(client, "JobFailed", job_id) == []

    # Every receipt was recorded once, and every worker proved every checkpoint.
    proofs = job_events(client, "ProofRecorded", job_id)
    triples = Counter((p["jobId"], p["machineId"], p["checkpointIndex"]) for p in proofs)
    assert [triple for triple, count in triples.items() if count > 1] == []
    for machine_id in assigned_events[0]["machineIds"]:
        indexes = [p["checkpointIndex"] for p in proofs if p["machineId"] == machine_id]
        assert indexes == list(range(1, EPOCHS + 1)), f"machine {machine_id}\n{logs}"

    # One completion, which refunded the unpaid budget.
    completed = job_events(client, "JobCompleted", job_id)
    assert len(completed) == 1
    assert job["paid"] == sum(p["payment"] for p in proofs)
    assert completed[0]["refund"] == BUDGET - job["paid"]
    assert client.withdrawable(market.borrower.address) - borrower_credit_before == BUDGET - job["paid"]
    assert machines_locked_by(client, job_id) == []
    assert market_shortfall(client) == 0
