"""A lender lost mid-job, killed or frozen, while a spare lender is registered.

The surviving workers report their broken cluster, the coordinator faults the silent
machine (slashing part of its stake to the borrower), puts the spare into its slot and
restarts the cluster from the last proved checkpoint. The lost lender keeps what it proved
and earns nothing after.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest
from market_support import (
    BPS,
    BUDGET,
    FAULT_EPOCHS,
    JOB_COMPLETED,
    MarketTest,
    checkpoint_cids,
    daemon_log,
    job_events,
    job_logs,
    log_tails,
    machines_locked_by,
    market_shortfall,
    upload_digits_bundle,
    wait_until,
)

from deepmarket.results import download_result
from deepmarket.training import digits

WORKERS = 3
MIN_ACCURACY = 0.85
CLAIM_TIMEOUT_S = 120


@pytest.mark.integration
@pytest.mark.parametrize(("fault", "slot"), [("kill", 1), ("freeze", 0)], ids=["killed-worker", "frozen-chief"])
def test_lost_lender_replaced_by_spare(market: MarketTest, demo_inputs: digits.DemoInputs, tmp_path: Path,
                                       fault: str, slot: int) -> None:
    client, net = market.client, market.net
    lenders = market.start_lenders(WORKERS + 1)
    bundle_cid = upload_digits_bundle(net.store, demo_inputs)
    slash_bps = int(client.market.functions.slashBps().call())
    balances_before = net.balances()
    borrower_credit_before = client.withdrawable(market.borrower.address)

    job_id = market.submit_job(bundle_cid, workers=WORKERS)
    market.wait_for_assignment(job_id)
    lost = market.lender_in_slot(job_id, slot)
    market.wait_for_checkpoint(job_id, 1, lost.machine_id)
    stake_before = client.get_machine(lost.machine_id)["stake"]
    if fault == "kill":
        net.stop_process(lost.name, sig=signal.SIGKILL)  # the daemon and its TensorFlow worker
    else:
        net.signal_process(lost.name, signal.SIGSTOP)

    job = market.wait_for_status(job_id, JOB_COMPLETED)
    logs = log_tails(net, market.daemon_names())

    # The lost machine was faulted once, and the spare took its slot in a second round.
    initial = list(job_events(client, "JobAssigned", job_id)[0]["machineIds"])
    [spare] = [lender for lender in lenders if lender.machine_id not in initial]
    faulted = job_logs(client, "WorkerFaulted", job_id)
    assert [log["args"]["machineId"] for log in faulted] == [lost.machine_id], logs
    replaced = job_events(client, "WorkerReplaced", job_id)
    assert len(replaced) == 1, logs
    assert replaced[0]["slot"] == slot
    assert replaced[0]["oldMachineId"] == lost.machine_id
    assert replaced[0]["newMachineId"] == spare.machine_id
    assert job["round"] == 2, logs
    assert [event["round"] for event in job_events(client, "JobAssigned", job_id)] == [1, 2]
    final_cluster = [w["machine_id"] for w in client.get_workers(job_id)]
    assert final_cluster[slot] == spare.machine_id
    assert lost.machine_id not in final_cluster

    # Every checkpoint was proved with one CID, and the final cluster proved the last one.
    proofs = job_events(client, "ProofRecorded", job_id)
    cids = checkpoint_cids(proofs)
    assert sorted(cids) == list(range(1, FAULT_EPOCHS + 1)), logs
    for index, found in cids.items():
        assert len(found) == 1, f"checkpoint {index} has CIDs {found}"
    triples = Counter((p["machineId"], p["checkpointIndex"]) for p in proofs)
    assert [triple for triple, count in triples.items() if count > 1] == []
    for machine_id in final_cluster:
        indexes = [p["checkpointIndex"] for p in proofs if p["machineId"] == machine_id]
        assert FAULT_EPOCHS in indexes, f"machine {machine_id}\n{logs}"
    model_path = download_result(client, net.store, job_id, tmp_path / "trained-model.keras")
    assert digits.evaluate(model_path, demo_inputs.dataset_path) >= MIN_ACCURACY

    # The lost lender was paid for its proofs, all recorded before the fault, and no more.
    lost_proofs = [log for log in job_logs(client, "ProofRecorded", job_id)
                   if log["args"]["machineId"] == lost.machine_id]
    lost_paid = sum(log["args"]["payment"] for log in lost_proofs)
    assert lost_proofs, f"{lost.name} proved nothing before the fault\n{logs}"
    assert all(log["blockNumber"] < faulted[0]["blockNumber"] for log in lost_proofs)
    assert max(log["args"]["checkpointIndex"] for log in lost_proofs) < FAULT_EPOCHS
    assert client.withdrawable(lost.account.address) == lost_paid

    # Its stake dropped by slashBps, and the slash went to the borrower with the refund.
    slashed = stake_before * slash_bps // BPS
    assert slashed > 0
    assert faulted[0]["args"]["slashed"] == slashed
    assert client.get_machine(lost.machine_id)["stake"] == stake_before - slashed
    completed = job_events(client, "JobCompleted", job_id)
    assert len(completed) == 1
    assert job["paid"] == sum(p["payment"] for p in proofs)
    assert completed[0]["refund"] == BUDGET - job["paid"]
    assert client.withdrawable(market.borrower.address) - borrower_credit_before == BUDGET - job["paid"] + slashed
    assert machines_locked_by(client, job_id) == []

    if fault == "freeze":
        # Resumed, the frozen daemon learns of its fault and claims its pay, but proves nothing more.
        net.signal_process(lost.name, signal.SIGCONT)
        faulted_line = f"worker faulted by the coordinator: job {job_id} machine {lost.machine_id}"
        wait_until(net, lambda: faulted_line in daemon_log(net, lost.name), CLAIM_TIMEOUT_S,
                   f"{lost.name} to log {faulted_line!r}", market.daemon_names())

    # The running lenders withdraw their pay once the job ends; a killed lender's pay stays owed.
    running = [lender for lender in lenders if lender.name in net.processes]
    wait_until(net, lambda: all(client.withdrawable(lender.account.address) == 0 for lender in running),
               CLAIM_TIMEOUT_S, "running lenders to claim their payouts", market.daemon_names())
    lost_proofs_after = [p for p in job_events(client, "ProofRecorded", job_id) if p["machineId"] == lost.machine_id]
    assert len(lost_proofs_after) == len(lost_proofs)
    balances_after = net.balances()
    lost_earned = balances_after[lost.name] - balances_before[lost.name] + client.withdrawable(lost.account.address)
    assert lost_earned == lost_paid
    for lender in lenders:
        earned = balances_after[lender.name] - balances_before[lender.name]
        if lender in running:
            assert earned == sum(p["payment"] for p in proofs if p["lender"] == lender.account.address)
    assert sum(balances_after.values()) == sum(balances_before.values())
    assert market_shortfall(client) == 0
