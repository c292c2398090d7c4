"""A job's life on the local marketplace, with real daemons: trained and paid, or waiting and cancelled."""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from pathlib import Path

import pytest
from market_support import (
    BUDGET,
    JOB_CANCELLED,
    JOB_COMPLETED,
    JOB_QUEUED,
    MarketTest,
    coordinator_log,
    job_events,
    log_tails,
    machines_locked_by,
    market_shortfall,
    wait_until,
)

from deepmarket.bundles import upload_bundle
from deepmarket.market import operations
from deepmarket.results import download_result, fetch_result_manifest
from deepmarket.training import digits

MIN_ACCURACY = 0.85
WAIT_CYCLES_S = 10  # about ten coordinator poll intervals


@pytest.mark.integration
def test_job_completes_and_pays_lenders(market: MarketTest, demo_inputs: digits.DemoInputs,
                                        tmp_path: Path) -> None:
    client, store, net = market.client, market.net.store, market.net
    epochs, workers = 3, 2
    lenders = market.start_lenders(3)
    config = dataclasses.replace(digits.DEMO_CONFIG, epochs=epochs)
    bundle_cid = upload_bundle(store, demo_inputs.model_path, demo_inputs.dataset_path, config)
    balances_before = net.balances()
    borrower_credit_before = client.withdrawable(market.borrower.address)

    job_id = market.submit_job(bundle_cid, workers=workers)
    job = market.wait_for_status(job_id, JOB_COMPLETED)
    logs = log_tails(net, market.daemon_names())

    # Who ran it: one JobAssigned, two of the three machines, all released.
    assigned_events = job_events(client, "JobAssigned", job_id)
    assert len(assigned_events) == 1, logs
    assigned = list(assigned_events[0]["machineIds"])
    assert len(assigned) == workers
    assert set(assigned) <= {lender.machine_id for lender in lenders}
    assert [w["machine_id"] for w in client.get_workers(job_id)] == assigned
    assert machines_locked_by(client, job_id) == []

    # Every worker proved every checkpoint once, and all workers proved the chief's CID.
    proofs = job_events(client, "ProofRecorded", job_id)
    for machine_id in assigned:
        indexes = [p["checkpointIndex"] for p in proofs if p["machineId"] == machine_id]
        assert indexes == list(range(1, epochs + 1)), f"machine {machine_id}\n{logs}"
    assert len(proofs) == workers * epochs
    checkpoint_cids = {}
    for index in range(1, epochs + 1):
        cids = {p["checkpointCid"] for p in proofs if p["checkpointIndex"] == index}
        assert len(cids) == 1, f"checkpoint {index} has CIDs {cids}"
        checkpoint_cids[index] = cids.pop()

    # The result names the chief's last checkpoint and trains a usable model.
    result = fetch_result_manifest(client, store, job_id)
    assert result["format"] == "deepmarket-result/1"
    assert result["epochs"] == epochs
    assert result["checkpoint_cids"] == [checkpoint_cids[i] for i in range(1, epochs + 1)]
    assert result["weights_cid"] == store.get_json(checkpoint_cids[epochs])["weights_cid"]
    model_path = download_result(client, store, job_id, tmp_path / "trained-model.keras")
    accuracy = digits.evaluate(model_path, demo_inputs.dataset_path)
    assert accuracy >= MIN_ACCURACY

    # Payments: the job's paid total is the sum of the proofs, each assigned lender got a share.
    paid_by_lender: dict[str, int] = defaultdict(int)
    for proof in proofs:
        paid_by_lender[proof["lender"]] += proof["payment"]
    assert job["paid"] == sum(paid_by_lender.values())
    assert job["escrow"] == 0
    completed = job_events(client, "JobCompleted", job_id)
    assert len(completed) == 1
    assert completed[0]["paid"] == job["paid"]
    assert completed[0]["refund"] == BUDGET - job["paid"]
    assert client.withdrawable(market.borrower.address) - borrower_credit_before == BUDGET - job["paid"]
    for lender in lenders:
        expected = paid_by_lender[lender.account.address]
        if lender.machine_id in assigned:
            assert expected > 0, f"{lender.name} (machine {lender.machine_id}) was not paid\n{logs}"
        else:
            assert expected == 0

    # Lenders claim their payments on their own once the job ends. The borrower claims the refund.
    wait_until(net, lambda: all(client.withdrawable(lender.account.address) == 0 for lender in lenders), 120,
               "lenders to claim their payouts", market.daemon_names())
    refund = operations.claim_payout(client, market.borrower)
    assert refund == borrower_credit_before + BUDGET - job["paid"]
    balances_after = net.balances()
    for lender in lenders:
        earned = balances_after[lender.name] - balances_before[lender.name]
        assert earned == paid_by_lender[lender.account.address], lender.name
    assert balances_after["borrower"] - balances_before["borrower"] == -job["paid"] + borrower_credit_before
    assert sum(balances_after.values()) == sum(balances_before.values())
    assert sum(balances_after.values()) == client.token.functions.totalSupply().call()
    assert market_shortfall(client) == 0


@pytest.mark.integration
def test_unmatched_job_waits_until_cancelled(market: MarketTest, demo_inputs: digits.DemoInputs) -> None:
    client, net = market.client, market.net
    lenders = market.start_lenders(2, cores=1)
    config = dataclasses.replace(digits.DEMO_CONFIG, epochs=2)
    bundle_cid = upload_bundle(net.store, demo_inputs.model_path, demo_inputs.dataset_path, config)
    borrower_credit_before = client.withdrawable(market.borrower.address)

    # Both machines offer 1 core, and the job requires 64 per machine.
    job_id = market.submit_job(bundle_cid, workers=2, min_cores=64)
    waiting = f"job {job_id} waits: no 2 machines qualify now"
    wait_until(net, lambda: waiting in coordinator_log(net), 180, f"the coordinator to log {waiting!r}")
    time.sleep(WAIT_CYCLES_S)
    logs = log_tails(net, market.daemon_names())

    assert client.get_job(job_id)["status"] == JOB_QUEUED, logs
    assert job_events(client, "JobAssigned", job_id) == []
    wait_line = next(line for line in coordinator_log(net).splitlines() if waiting in line)
    for lender in lenders:
        assert f"machine {lender.machine_id}: too small (1 cores, 2048 MiB)" in wait_line

    refund = client.cancel_job(market.borrower, job_id)
    job = client.get_job(job_id)

    assert refund == BUDGET
    assert job["status"] == JOB_CANCELLED
    assert job["paid"] == 0
    assert job["escrow"] == 0
    assert client.withdrawable(market.borrower.address) - borrower_credit_before == BUDGET
    assert len(job_events(client, "JobCancelled", job_id)) == 1
    assert job_events(client, "ProofRecorded", job_id) == []
    assert job_events(client, "WorkerAssigned", job_id) == []
    assert machines_locked_by(client, job_id) == []
    assert market_shortfall(client) == 0
    wait_until(net, lambda: f"job cancelled: job {job_id}" in coordinator_log(net), 60,
               "the coordinator to see the cancellation")
