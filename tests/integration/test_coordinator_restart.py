"""A coordinator stopped and started again mid-job picks up from its SQLite state and the chain:
the job completes, without a second assignment and without a proof recorded twice."""

from __future__ import annotations

import dataclasses
import signal
from collections import Counter

import pytest
from market_support import (
    BUDGET,
    JOB_COMPLETED,
    JOB_RUNNING,
    MarketTest,
    coordinator_log,
    job_events,
    log_tails,
    machines_locked_by,
    market_shortfall,
    wait_until,
)

from deepmarket.bundles import upload_bundle
from deepmarket.training import digits

EPOCHS = 4  # enough that training continues while the coordinator is down
WORKERS = 2
FIRST_PROOF_TIMEOUT_S = 600


@pytest.mark.integration
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restarted_coordinator_completes_job(market: MarketTest, demo_inputs: digits.DemoInputs,
                                             stop_signal: signal.Signals) -> None:
    client, net = market.client, market.net
    lenders = market.start_lenders(WORKERS)
    config = dataclasses.replace(digits.DEMO_CONFIG, epochs=EPOCHS)
    bundle_cid = upload_bundle(net.store, demo_inputs.model_path, demo_inputs.dataset_path, config)
    borrower_credit_before = client.withdrawable(market.borrower.address)

    job_id = market.submit_job(bundle_cid, workers=WORKERS)
    # Stop it once its own state contains a proof, so the restarted coordinator resumes from that state.
    proof_seen = f"proof recorded: job {job_id} machine"
    wait_until(net, lambda: proof_seen in coordinator_log(net), FIRST_PROOF_TIMEOUT_S,
               f"the coordinator to record the first proof of job {job_id}", market.daemon_names())
    coordinator = net.processes["coordinator"]
    net.stop_process("coordinator", sig=stop_signal)
    assert coordinator.poll() is not None
    if stop_signal == signal.SIGTERM:
        assert "coordinator stopped" in net.log_tail("coordinator")
    assert client.get_job(job_id)["status"] == JOB_RUNNING
    net.start_coordinator()

    job = market.wait_for_status(job_id, JOB_COMPLETED)
    logs = log_tails(net, market.daemon_names())

    assigned_events = job_events(client, "JobAssigned", job_id)
    assert len(assigned_events) == 1, logs
    assert len(job_events(client, "WorkerAssigned", job_id)) == WORKERS
    assigned = list(assigned_events[0]["machineIds"])
    assert sorted(assigned) == sorted(lender.machine_id for lender in lenders)

    proofs = job_events(client, "ProofRecorded", job_id)
    triples = Counter((p["jobId"], p["machineId"], p["checkpointIndex"]) for p in proofs)
    assert [triple for triple, count in triples.items() if count > 1] == []
    for machine_id in assigned:
        indexes = [p["checkpointIndex"] for p in proofs if p["machineId"] == machine_id]
        assert indexes == list(range(1, EPOCHS + 1)), f"machine {machine_id}\n{logs}"

    completed = job_events(client, "JobCompleted", job_id)
    assert len(completed) == 1
    assert job["paid"] == sum(p["payment"] for p in proofs)
    assert completed[0]["refund"] == BUDGET - job["paid"]
    assert client.withdrawable(market.borrower.address) - borrower_credit_before == BUDGET - job["paid"]
    assert job_events(client, "JobFailed", job_id) == []
    assert job_events(client, "WorkerFaulted", job_id) == []
    assert machines_locked_by(client, job_id) == []
    assert market_shortfall(client) == 0
