"""JobMarket settlement: complete, fail, cancel, expire, withdraw, faults, worker replacement and leaving."""

from brownie import chain
from contract_support import (
    BUDGET,
    COORDINATOR_ROLE,
    CORES,
    MIN_STAKE,
    PROOF_TIMEOUT,
    JobStatus,
    assert_event,
    assert_no_event,
    latest_timestamp,
    mined_at,
    payment_for,
    reverts_with,
    slash_for,
)

RESULT_CID = "bafyresultmodel"
CLUSTER_CID_2 = "bafyclusterspec2"


# ------------------------------------------------------------------ completeJob


def test_complete_refunds_unused_budget(
    market, registry, token, running_job, machine, machine2, lender, borrower, coordinator, prove
):
    chain.sleep(100)
    prove(lender, running_job, machine, 1, 50 * CORES)
    payment = payment_for(50 * CORES)

    tx = market.completeJob(running_job, RESULT_CID, {"from": coordinator})

    job = market.getJob(running_job)
    assert job["status"] == JobStatus.COMPLETED
    assert job["resultCid"] == RESULT_CID
    assert (job["escrow"], job["paid"]) == (0, payment)
    assert market.withdrawable(borrower) == BUDGET - payment
    assert market.withdrawable(lender) == payment
    assert market.totalEscrowed() == 0
    assert token.balanceOf(market) == market.totalWithdrawable() == BUDGET
    assert [worker["active"] for worker in market.getWorkers(running_job)] == [False, False]
    assert registry.getMachine(machine)["lockedBy"] == 0
    assert registry.getMachine(machine2)["lockedBy"] == 0
    assert_event(
        tx,
        "JobCompleted",
        market,
        jobId=running_job,
        resultCid=RESULT_CID,
        paid=payment,
        refund=BUDGET - payment,
    )
    assert_event(tx, "MachineReleased", registry, index=0, machineId=machine, jobId=running_job)
    assert_event(tx, "MachineReleased", registry, index=1, machineId=machine2, jobId=running_job)


def test_complete_releases_only_active_workers(
    market, registry, running_job, machine, machine2, lender2, coordinator
):
    market.leaveJob(running_job, machine2, {"from": lender2})

    tx = market.completeJob(running_job, RESULT_CID, {"from": coordinator})

    assert_event(tx, "MachineReleased", registry, machineId=machine, jobId=running_job)
    assert_event(tx, "JobCompleted", market, jobId=running_job, resultCid=RESULT_CID, paid=0, refund=BUDGET)


def test_complete_rejects_queued_job(market, queued_job, coordinator):
    with reverts_with("MarketInvalidJobStatus", queued_job, JobStatus.QUEUED):
        market.completeJob(queued_job, RESULT_CID, {"from": coordinator})


def test_complete_rejects_non_coordinator(market, running_job, borrower):
    with reverts_with("AccessControlUnauthorizedAccount", borrower, COORDINATOR_ROLE):
        market.completeJob(running_job, RESULT_CID, {"from": borrower})


# ------------------------------------------------------------------ failJob


def test_fail_queued_job_refunds_budget(market, queued_job, borrower, coordinator):
    tx = market.failJob(queued_job, "invalid bundle", {"from": coordinator})

    assert market.getJob(queued_job)["status"] == JobStatus.FAILED
    assert market.withdrawable(borrower) == BUDGET
    assert market.totalEscrowed() == 0
    assert_event(tx, "JobFailed", market, jobId=queued_job, reason="invalid bundle", refund=BUDGET)


def test_fail_running_job_releases_without_slash(
    market, registry, running_job, machine, machine2, borrower, coordinator
):
    tx = market.failJob(running_job, "dataset unreachable", {"from": coordinator})

    assert registry.getMachine(machine)["stake"] == MIN_STAKE
    assert registry.getMachine(machine2)["stake"] == MIN_STAKE
    assert registry.getMachine(machine)["lockedBy"] == 0
    assert market.withdrawable(borrower) == BUDGET
    assert_no_event(tx, "StakeSlashed")
    assert_event(tx, "MachineReleased", registry, index=0, machineId=machine, jobId=running_job)
    assert_event(tx, "MachineReleased", registry, index=1, machineId=machine2, jobId=running_job)
    assert_event(tx, "JobFailed", market, jobId=running_job, reason="dataset unreachable", refund=BUDGET)


def test_fail_rejects_finished_job(market, running_job, coordinator):
    market.completeJob(running_job, RESULT_CID, {"from": coordinator})

    with reverts_with("MarketInvalidJobStatus", running_job, JobStatus.COMPLETED):
        market.failJob(running_job, "too late", {"from": coordinator})


def test_fail_rejects_non_coordinator(market, queued_job, borrower):
    with reverts_with("AccessControlUnauthorizedAccount", borrower, COORDINATOR_ROLE):
        market.failJob(queued_job, "self-fail", {"from": borrower})


# ------------------------------------------------------------------ cancelJob


def test_cancel_refunds_whole_budget(market, token, queued_job, borrower):
    tx = market.cancelJob(queued_job, {"from": borrower})

    job = market.getJob(queued_job)
    assert job["status"] == JobStatus.CANCELLED
    assert job["escrow"] == 0
    assert market.withdrawable(borrower) == BUDGET
    assert market.totalEscrowed() == 0
    assert market.totalWithdrawable() == BUDGET
    assert token.balanceOf(market) == BUDGET
    assert_event(tx, "JobCancelled", market, jobId=queued_job, refund=BUDGET)


def test_cancel_rejects_other_caller(market, queued_job, stranger, coordinator):
    for caller in (stranger, coordinator):
        with reverts_with("MarketCallerNotBorrower", queued_job, caller):
            market.cancelJob(queued_job, {"from": caller})


def test_cancel_rejects_running_job(market, running_job, borrower):
    with reverts_with("MarketInvalidJobStatus", running_job, JobStatus.RUNNING):
        market.cancelJob(running_job, {"from": borrower})


def test_cancel_rejects_second_cancel(market, queued_job, borrower):
    market.cancelJob(queued_job, {"from": borrower})

    with reverts_with("MarketInvalidJobStatus", queued_job, JobStatus.CANCELLED):
        market.cancelJob(queued_job, {"from": borrower})


def test_cancel_rejects_unknown_job(market, borrower):
    with reverts_with("MarketJobNotFound", 1):
        market.cancelJob(1, {"from": borrower})


# ------------------------------------------------------------------ expireJob


def test_expire_slashes_only_idle_workers(
    market,
    registry,
    token,
    submit_job,
    borrower,
    machine,
    machine2,
    lender,
    lender2,
    coordinator,
    stranger,
    prove,
):
    start = latest_timestamp() + 10
    deadline = start + 2 * PROOF_TIMEOUT
    job_id = submit_job(borrower, jobDeadline=deadline)
    with mined_at(start):
        market.assignJob(job_id, [machine, machine2], "bafycluster", {"from": coordinator})
    with mined_at(deadline - 100):
        prove(lender, job_id, machine, 1, 1_000)
    payment = payment_for(1_000)
    slashed = slash_for(MIN_STAKE)

    with mined_at(deadline + 1):
        tx = market.expireJob(job_id, {"from": stranger})

    assert market.getJob(job_id)["status"] == JobStatus.EXPIRED
    assert registry.getMachine(machine)["stake"] == MIN_STAKE
    assert registry.getMachine(machine2)["stake"] == MIN_STAKE - slashed
    assert registry.getMachine(machine)["lockedBy"] == 0
    assert registry.getMachine(machine2)["lockedBy"] == 0
    assert market.withdrawable(borrower) == BUDGET - payment + slashed
    assert market.withdrawable(lender) == payment
    assert market.withdrawable(lender2) == 0
    assert token.balanceOf(market) == BUDGET + slashed
    assert_event(tx, "JobExpired", market, jobId=job_id, refund=BUDGET - payment, slashed=slashed)
    assert_event(tx, "WorkerFaulted", market, jobId=job_id, machineId=machine2, slot=1, slashed=slashed)
    assert_event(tx, "StakeSlashed", registry, machineId=machine2, jobId=job_id, amount=slashed, to=market)
    assert_event(tx, "MachineReleased", registry, index=0, machineId=machine, jobId=job_id)
    assert_event(tx, "MachineReleased", registry, index=1, machineId=machine2, jobId=job_id)


def test_expire_rejects_running_job_before_timeout(market, running_job, stranger):
    last_progress = market.getJob(running_job)["lastProgressAt"]

    with mined_at(last_progress + PROOF_TIMEOUT), reverts_with("MarketJobNotExpirable", running_job):
        market.expireJob(running_job, {"from": stranger})


def test_expire_with_vacancy_waits_for_deadline(
    market, registry, submit_job, borrower, machine, machine2, lender2, coordinator, stranger
):
    deadline = latest_timestamp() + 3 * PROOF_TIMEOUT
    job_id = submit_job(borrower, jobDeadline=deadline)
    market.assignJob(job_id, [machine, machine2], "bafycluster", {"from": coordinator})
    market.leaveJob(job_id, machine2, {"from": lender2})
    last_progress = market.getJob(job_id)["lastProgressAt"]

    # A cluster with a vacancy is waiting for a replacement, not stalled.
    with mined_at(last_progress + PROOF_TIMEOUT + 1), reverts_with("MarketJobNotExpirable", job_id):
        market.expireJob(job_id, {"from": stranger})
    with mined_at(deadline + 1):
        tx = market.expireJob(job_id, {"from": stranger})

    slashed = slash_for(MIN_STAKE)
    assert registry.getMachine(machine2)["stake"] == MIN_STAKE
    assert registry.getMachine(machine)["stake"] == MIN_STAKE - slashed
    assert_event(tx, "WorkerFaulted", market, jobId=job_id, machineId=machine, slot=0, slashed=slashed)
    assert_event(tx, "JobExpired", market, jobId=job_id, refund=BUDGET, slashed=slashed)


def test_expire_rejects_finished_job(market, running_job, coordinator, stranger):
    market.completeJob(running_job, RESULT_CID, {"from": coordinator})
    chain.sleep(30 * 24 * 3600)

    with reverts_with("MarketInvalidJobStatus", running_job, JobStatus.COMPLETED):
        market.expireJob(running_job, {"from": stranger})


def test_expire_rejects_unknown_job(market, stranger):
    with reverts_with("MarketJobNotFound", 3):
        market.expireJob(3, {"from": stranger})


# ------------------------------------------------------------------ withdraw


def test_withdraw_sends_credited_amount(market, token, queued_job, borrower):
    market.cancelJob(queued_job, {"from": borrower})

    tx = market.withdraw({"from": borrower})

    assert token.balanceOf(borrower) == BUDGET
    assert market.withdrawable(borrower) == 0
    assert market.totalWithdrawable() == 0
    assert token.balanceOf(market) == 0
    assert_event(tx, "Withdrawn", market, account=borrower, amount=BUDGET)
    assert_event(tx, "Transfer", token, **{"from": market, "to": borrower, "value": BUDGET})


def test_withdraw_rejects_empty_balance(market, stranger):
    with reverts_with("MarketNothingToWithdraw", stranger):
        market.withdraw({"from": stranger})


def test_withdraw_rejects_second_withdrawal(market, queued_job, borrower):
    market.cancelJob(queued_job, {"from": borrower})
    market.withdraw({"from": borrower})

    with reverts_with("MarketNothingToWithdraw", borrower):
        market.withdraw({"from": borrower})


# ------------------------------------------------------------------ reportFault


def test_report_fault_slashes_to_borrower(
    market, registry, token, running_job, machine2, borrower, coordinator
):
    slashed = slash_for(MIN_STAKE)

    tx = market.reportFault(running_job, machine2, {"from": coordinator})

    assert registry.getMachine(machine2)["stake"] == MIN_STAKE - slashed
    assert registry.getMachine(machine2)["lockedBy"] == 0
    assert registry.totalStaked() == 2 * MIN_STAKE - slashed
    assert token.balanceOf(registry) == 2 * MIN_STAKE - slashed
    assert market.withdrawable(borrower) == slashed
    assert market.totalEscrowed() == BUDGET
    assert token.balanceOf(market) == BUDGET + slashed
    assert market.getWorkers(running_job)[1]["active"] is False
    assert market.getJob(running_job)["status"] == JobStatus.RUNNING
    assert_event(tx, "WorkerFaulted", market, jobId=running_job, machineId=machine2, slot=1, slashed=slashed)
    assert_event(
        tx, "StakeSlashed", registry, machineId=machine2, jobId=running_job, amount=slashed, to=market
    )
    assert_event(tx, "MachineReleased", registry, machineId=machine2, jobId=running_job)


def test_report_fault_keeps_proved_pay(market, running_job, machine, lender, coordinator, prove):
    chain.sleep(100)
    prove(lender, running_job, machine, 1, 10 * CORES)

    market.reportFault(running_job, machine, {"from": coordinator})

    assert market.withdrawable(lender) == payment_for(10 * CORES)


def test_report_fault_with_zero_slash_rate(market, registry, running_job, machine, admin, coordinator):
    market.setParameters(MIN_STAKE, 0, PROOF_TIMEOUT, {"from": admin})

    tx = market.reportFault(running_job, machine, {"from": coordinator})

    assert registry.getMachine(machine)["stake"] == MIN_STAKE
    assert_no_event(tx, "StakeSlashed")
    assert_event(tx, "WorkerFaulted", market, jobId=running_job, machineId=machine, slot=0, slashed=0)


def test_report_fault_rejects_inactive_worker(market, running_job, machine2, machine3, coordinator):
    with reverts_with("MarketWorkerNotActive", running_job, machine3):
        market.reportFault(running_job, machine3, {"from": coordinator})
    market.reportFault(running_job, machine2, {"from": coordinator})
    with reverts_with("MarketWorkerNotActive", running_job, machine2):
        market.reportFault(running_job, machine2, {"from": coordinator})


def test_report_fault_rejects_queued_job(market, queued_job, machine, coordinator):
    with reverts_with("MarketInvalidJobStatus", queued_job, JobStatus.QUEUED):
        market.reportFault(queued_job, machine, {"from": coordinator})


def test_report_fault_rejects_non_coordinator(market, running_job, machine, borrower):
    with reverts_with("AccessControlUnauthorizedAccount", borrower, COORDINATOR_ROLE):
        market.reportFault(running_job, machine, {"from": borrower})


# ------------------------------------------------------------------ replaceWorker


def test_replace_fills_empty_slot(
    market, registry, running_job, machine, machine2, machine3, lender3, coordinator
):
    market.reportFault(running_job, machine2, {"from": coordinator})

    tx = market.replaceWorker(running_job, 1, machine3, CLUSTER_CID_2, {"from": coordinator})

    job = market.getJob(running_job)
    assert (job["round"], job["clusterSpecCid"], job["lastProgressAt"]) == (2, CLUSTER_CID_2, tx.timestamp)
    worker = market.getWorkers(running_job)[1]
    assert (worker["machineId"], worker["lender"], worker["since"], worker["active"]) == (
        machine3,
        lender3,
        tx.timestamp,
        True,
    )
    assert market.workerMachineIds(running_job) == [machine, machine3]
    assert registry.getMachine(machine3)["lockedBy"] == running_job
    assert_event(
        tx, "WorkerReplaced", market, jobId=running_job, slot=1, oldMachineId=machine2, newMachineId=machine3
    )
    assert_event(
        tx, "WorkerAssigned", market, jobId=running_job, machineId=machine3, lender=lender3, slot=1, round=2
    )
    assert_event(
        tx,
        "JobAssigned",
        market,
        jobId=running_job,
        round=2,
        clusterSpecCid=CLUSTER_CID_2,
        machineIds=[machine, machine3],
    )
    assert_event(tx, "MachineLocked", registry, machineId=machine3, jobId=running_job)


def test_replace_accepts_departed_machine(market, running_job, machine2, lender2, coordinator):
    market.leaveJob(running_job, machine2, {"from": lender2})

    tx = market.replaceWorker(running_job, 1, machine2, CLUSTER_CID_2, {"from": coordinator})

    assert_event(
        tx, "WorkerReplaced", market, jobId=running_job, slot=1, oldMachineId=machine2, newMachineId=machine2
    )
    assert market.getWorkers(running_job)[1]["active"] is True


def test_replace_rejects_slot_out_of_range(market, running_job, machine3, coordinator):
    with reverts_with("MarketSlotOutOfRange", running_job, 2):
        market.replaceWorker(running_job, 2, machine3, CLUSTER_CID_2, {"from": coordinator})


def test_replace_rejects_occupied_slot(market, running_job, machine, machine3, coordinator):
    with reverts_with("MarketSlotOccupied", running_job, 0, machine):
        market.replaceWorker(running_job, 0, machine3, CLUSTER_CID_2, {"from": coordinator})


def test_replace_rejects_empty_cluster_spec(market, running_job, machine2, machine3, coordinator):
    market.reportFault(running_job, machine2, {"from": coordinator})

    with reverts_with("MarketInvalidRequest", "clusterSpecCid", 0):
        market.replaceWorker(running_job, 1, machine3, "", {"from": coordinator})


def test_replace_rejects_machine_in_job(market, running_job, machine, machine2, coordinator):
    market.reportFault(running_job, machine2, {"from": coordinator})

    with reverts_with("RegistryMachineLocked", machine, running_job):
        market.replaceWorker(running_job, 1, machine, CLUSTER_CID_2, {"from": coordinator})


def test_replace_rejects_paused_machine(
    market, registry, running_job, machine2, machine3, lender3, coordinator
):
    market.reportFault(running_job, machine2, {"from": coordinator})
    registry.pauseMachine(machine3, {"from": lender3})
    now = latest_timestamp() + 5

    with mined_at(now), reverts_with("MarketMachineUnavailable", machine3, now):
        market.replaceWorker(running_job, 1, machine3, CLUSTER_CID_2, {"from": coordinator})


def test_replace_rejects_job_past_deadline(
    market, submit_job, borrower, machine, machine2, machine3, coordinator
):
    deadline = latest_timestamp() + 500
    job_id = submit_job(borrower, jobDeadline=deadline)
    market.assignJob(job_id, [machine, machine2], "bafycluster", {"from": coordinator})
    market.reportFault(job_id, machine2, {"from": coordinator})

    with mined_at(deadline + 1), reverts_with("MarketJobDeadlinePassed", job_id, deadline):
        market.replaceWorker(job_id, 1, machine3, CLUSTER_CID_2, {"from": coordinator})


def test_replace_rejects_queued_job(market, queued_job, machine3, coordinator):
    with reverts_with("MarketInvalidJobStatus", queued_job, JobStatus.QUEUED):
        market.replaceWorker(queued_job, 0, machine3, CLUSTER_CID_2, {"from": coordinator})


def test_replace_rejects_paused_market(market, running_job, machine2, machine3, admin, coordinator):
    market.reportFault(running_job, machine2, {"from": coordinator})
    market.pause({"from": admin})

    with reverts_with("EnforcedPause"):
        market.replaceWorker(running_job, 1, machine3, CLUSTER_CID_2, {"from": coordinator})


def test_replace_rejects_non_coordinator(market, running_job, machine3, lender3):
    with reverts_with("AccessControlUnauthorizedAccount", lender3, COORDINATOR_ROLE):
        market.replaceWorker(running_job, 1, machine3, CLUSTER_CID_2, {"from": lender3})


# ------------------------------------------------------------------ leaveJob


def test_leave_job_releases_machine_without_slash(market, registry, token, running_job, machine2, lender2):
    tx = market.leaveJob(running_job, machine2, {"from": lender2})

    assert market.getWorkers(running_job)[1]["active"] is False
    assert registry.getMachine(machine2)["lockedBy"] == 0
    assert registry.getMachine(machine2)["stake"] == MIN_STAKE
    assert market.getJob(running_job)["status"] == JobStatus.RUNNING
    assert_event(tx, "WorkerLeft", market, jobId=running_job, machineId=machine2, slot=1)
    assert_event(tx, "MachineReleased", registry, machineId=machine2, jobId=running_job)
    assert_no_event(tx, "StakeSlashed")

    registry.retireMachine(machine2, {"from": lender2})
    assert token.balanceOf(lender2) == MIN_STAKE


def test_leave_job_rejects_other_caller(market, running_job, machine2, lender, borrower, coordinator):
    for caller in (lender, borrower, coordinator):
        with reverts_with("MarketCallerNotLender", machine2, caller):
            market.leaveJob(running_job, machine2, {"from": caller})


def test_leave_rejects_machine_outside_job(market, running_job, machine3, lender3):
    with reverts_with("MarketWorkerNotActive", running_job, machine3):
        market.leaveJob(running_job, machine3, {"from": lender3})


def test_leave_job_rejects_queued_job(market, queued_job, machine, lender):
    with reverts_with("MarketInvalidJobStatus", queued_job, JobStatus.QUEUED):
        market.leaveJob(queued_job, machine, {"from": lender})


# ------------------------------------------------------------------ restartCluster


def test_restart_cluster_starts_new_round(market, running_job, machine, machine2, coordinator):
    chain.sleep(600)

    tx = market.restartCluster(running_job, CLUSTER_CID_2, {"from": coordinator})

    job = market.getJob(running_job)
    assert (job["round"], job["clusterSpecCid"], job["lastProgressAt"]) == (2, CLUSTER_CID_2, tx.timestamp)
    assert [worker["active"] for worker in market.getWorkers(running_job)] == [True, True]
    assert_event(
        tx,
        "JobAssigned",
        market,
        jobId=running_job,
        round=2,
        clusterSpecCid=CLUSTER_CID_2,
        machineIds=[machine, machine2],
    )


def test_restart_cluster_rejects_empty_slot(market, running_job, machine2, coordinator):
    market.reportFault(running_job, machine2, {"from": coordinator})

    with reverts_with("MarketSlotEmpty", running_job, 1):
        market.restartCluster(running_job, CLUSTER_CID_2, {"from": coordinator})


def test_restart_cluster_rejects_empty_cluster_spec(market, running_job, coordinator):
    with reverts_with("MarketInvalidRequest", "clusterSpecCid", 0):
        market.restartCluster(running_job, "", {"from": coordinator})


def test_restart_cluster_rejects_job_past_deadline(
    market, submit_job, borrower, machine, machine2, coordinator
):
    deadline = latest_timestamp() + 500
    job_id = submit_job(borrower, jobDeadline=deadline)
    market.assignJob(job_id, [machine, machine2], "bafycluster", {"from": coordinator})

    with mined_at(deadline + 1), reverts_with("MarketJobDeadlinePassed", job_id, deadline):
        market.restartCluster(job_id, CLUSTER_CID_2, {"from": coordinator})


def test_restart_cluster_rejects_queued_job(market, queued_job, coordinator):
    with reverts_with("MarketInvalidJobStatus", queued_job, JobStatus.QUEUED):
        market.restartCluster(queued_job, CLUSTER_CID_2, {"from": coordinator})


def test_restart_cluster_rejects_paused_market(market, running_job, admin, coordinator):
    market.pause({"from": admin})

    with reverts_with("EnforcedPause"):
        market.restartCluster(running_job, CLUSTER_CID_2, {"from": coordinator})


def test_restart_cluster_rejects_non_coordinator(market, running_job, borrower):
    with reverts_with("AccessControlUnauthorizedAccount", borrower, COORDINATOR_ROLE):
        market.restartCluster(running_job, CLUSTER_CID_2, {"from": borrower})
