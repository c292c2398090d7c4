"""A lender daemon killed with SIGKILL mid-job and started again with the same work dir.

Its worker died with it, so the restarted daemon finds its machine still assigned, leaves
the job (no slash) and logs why. The coordinator then puts a spare machine into the empty
slot, and the job completes.
"""

from __future__ import annotations

import signal

import pytest
from market_support import (
    BUDGET,
    FAULT_EPOCHS,
    JOB_COMPLETED,
    PRICE_PER_CORE_HOUR,
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

from deepmarket.training import digits

WORKERS = 3
LEAVE_TIMEOUT_S = 180


@pytest.mark.integration
def test_restarted_lender_leaves_old_assignment(market: MarketTest, demo_inputs: digits.DemoInputs) -> None:
    client, net = market.client, market.net
    lenders = market.start_lenders(WORKERS + 1)
    bundle_cid = upload_digits_bundle(net.store, demo_inputs)
    borrower_credit_before = client.withdrawable(market.borrower.address)

    job_id = market.submit_job(bundle_cid, workers=WORKERS)
    market.wait_for_assignment(job_id)
    restarted = market.lender_in_slot(job_id, 1)
    market.wait_for_checkpoint(job_id, 1, restarted.machine_id)
    machine = client.get_machine(restarted.machine_id)
    stake_before = machine["stake"]
    tf_port = int(machine["endpoint"].rsplit(":", 1)[1])

    # The coordinator is stopped while the lender restarts. Otherwise it would fault the silent
    # machine loss_grace_s (12 s) after its peers report the broken cluster, and the restarted
    # daemon, which takes several seconds to start, would find its machine already released.
    # It starts again once the peers reported too, so that its first step reads the left worker
    # and the stopped ones of the same round together. It must then fill the slot, because
    # restartCluster rejects a cluster with an empty slot.
    peers = [machine_id for machine_id in job_events(client, "JobAssigned", job_id)[0]["machineIds"]
             if machine_id != restarted.machine_id]

    def left_and_peers_stopped() -> bool:
        stopped = {event["machineId"] for event in job_events(client, "WorkerStopped", job_id)}
        return job_events(client, "WorkerLeft", job_id) != [] and stopped >= set(peers)

    net.stop_process("coordinator")
    try:
        net.stop_process(restarted.name, sig=signal.SIGKILL)  # the daemon and its TensorFlow worker
        net.start_lender(restarted.name, price=PRICE_PER_CORE_HOUR, tf_port=tf_port)
        wait_until(net, left_and_peers_stopped, LEAVE_TIMEOUT_S,
                   f"the restarted {restarted.name} to leave job {job_id} and its peers to report stopping",
                   market.daemon_names())
    finally:
        net.start_coordinator()
    lost_line = (f"worker lost: machine {restarted.machine_id} was serving job {job_id} before this daemon "
                 f"started; leaving the job")
    assert lost_line in daemon_log(net, restarted.name)

    job = market.wait_for_status(job_id, JOB_COMPLETED)
    logs = log_tails(net, market.daemon_names())

    # The restarted machine left once, without a slash, and the spare took its slot.
    left = job_logs(client, "WorkerLeft", job_id)
    assert [log["args"]["machineId"] for log in left] == [restarted.machine_id], logs
    assert job_events(client, "WorkerFaulted", job_id) == []
    assert client.get_machine(restarted.machine_id)["stake"] == stake_before
    initial = list(job_events(client, "JobAssigned", job_id)[0]["machineIds"])
    [spare] = [lender for lender in lenders if lender.machine_id not in initial]
    replaced = job_events(client, "WorkerReplaced", job_id)
    assert len(replaced) == 1, logs
    assert replaced[0]["oldMachineId"] == restarted.machine_id
    assert replaced[0]["newMachineId"] == spare.machine_id
    assert job["round"] == 2, logs
    assert [event["round"] for event in job_events(client, "JobAssigned", job_id)] == [1, 2]

    # The restarted lender proved nothing after leaving; every checkpoint was proved with one CID.
    restarted_proofs = [log for log in job_logs(client, "ProofRecorded", job_id)
                        if log["args"]["machineId"] == restarted.machine_id]
    assert all(log["blockNumber"] < left[0]["blockNumber"] for log in restarted_proofs)
    proofs = job_events(client, "ProofRecorded", job_id)
    cids = checkpoint_cids(proofs)
    assert sorted(cids) == list(range(1, FAULT_EPOCHS + 1)), logs
    for index, found in cids.items():
        assert len(found) == 1, f"checkpoint {index} has CIDs {found}"
    for machine_id in (w["machine_id"] for w in client.get_workers(job_id)):
        assert FAULT_EPOCHS in [p["checkpointIndex"] for p in proofs if p["machineId"] == machine_id]

    # The restarted daemon serves on: its machine is active and free, and it claims its pay.
    completed = job_events(client, "JobCompleted", job_id)
    assert len(completed) == 1
    assert completed[0]["refund"] == BUDGET - job["paid"]
    assert client.withdrawable(market.borrower.address) - borrower_credit_before == BUDGET - job["paid"]
    wait_until(net, lambda: client.withdrawable(restarted.account.address) == 0, 120,
               f"the restarted {restarted.name} to claim its payout", market.daemon_names())
    assert client.get_machine(restarted.machine_id)["locked_by"] == 0
    assert machines_locked_by(client, job_id) == []
    assert market_shortfall(client) == 0
