"""JobMarket.assignJob: cluster assignment and every rule a machine must pass."""

from contract_support import (
    COORDINATOR_ROLE,
    CORES,
    MARKET_ROLE,
    MEMORY_MIB,
    MIN_STAKE,
    PRICE_PER_CORE_HOUR,
    PROOF_TIMEOUT,
    SLASH_BPS,
    JobStatus,
    assert_event,
    availability_mask,
    hour_of_week,
    job_request,
    latest_timestamp,
    mined_at,
    request_tuple,
    reverts_with,
)

CLUSTER_CID = "bafyclusterspec1"


def test_assign_locks_machines_and_starts_job(
    market, registry, queued_job, machine, machine2, lender, lender2, coordinator
):
    tx = market.assignJob(queued_job, [machine, machine2], CLUSTER_CID, {"from": coordinator})

    job = market.getJob(queued_job)
    assert job["status"] == JobStatus.RUNNING
    assert job["round"] == 1
    assert job["clusterSpecCid"] == CLUSTER_CID
    assert job["lastProgressAt"] == tx.timestamp
    workers = market.getWorkers(queued_job)
    assert [tuple(worker) for worker in workers] == [
        (machine, lender, PRICE_PER_CORE_HOUR, CORES, tx.timestamp, True),
        (machine2, lender2, PRICE_PER_CORE_HOUR, CORES, tx.timestamp, True),
    ]
    assert market.workerMachineIds(queued_job) == [machine, machine2]
    assert registry.getMachine(machine)["lockedBy"] == queued_job
    assert registry.getMachine(machine2)["lockedBy"] == queued_job
    assert_event(
        tx,
        "WorkerAssigned",
        market,
        index=0,
        jobId=queued_job,
        machineId=machine,
        lender=lender,
        slot=0,
        round=1,
    )
    assert_event(
        tx,
        "WorkerAssigned",
        market,
        index=1,
        jobId=queued_job,
        machineId=machine2,
        lender=lender2,
        slot=1,
        round=1,
    )
    assert_event(
        tx,
        "JobAssigned",
        market,
        jobId=queued_job,
        round=1,
        clusterSpecCid=CLUSTER_CID,
        machineIds=[machine, machine2],
    )
    assert_event(tx, "MachineLocked", registry, index=0, machineId=machine, jobId=queued_job)
    assert_event(tx, "MachineLocked", registry, index=1, machineId=machine2, jobId=queued_job)


def test_assign_rejects_non_coordinator(market, queued_job, machine, machine2, borrower, admin):
    for caller in (borrower, admin):
        with reverts_with("AccessControlUnauthorizedAccount", caller, COORDINATOR_ROLE):
            market.assignJob(queued_job, [machine, machine2], CLUSTER_CID, {"from": caller})

    assert market.getJob(queued_job)["status"] == JobStatus.QUEUED


def test_assign_rejects_wrong_worker_count(market, queued_job, machine, machine2, machine3, coordinator):
    with reverts_with("MarketWrongWorkerCount", queued_job, 2, 1):
        market.assignJob(queued_job, [machine], CLUSTER_CID, {"from": coordinator})
    with reverts_with("MarketWrongWorkerCount", queued_job, 2, 3):
        market.assignJob(queued_job, [machine, machine2, machine3], CLUSTER_CID, {"from": coordinator})


def test_assign_rejects_empty_cluster_spec(market, queued_job, machine, machine2, coordinator):
    with reverts_with("MarketInvalidRequest", "clusterSpecCid", 0):
        market.assignJob(queued_job, [machine, machine2], "", {"from": coordinator})


def test_assign_rejects_unknown_job(market, machine, coordinator):
    with reverts_with("MarketJobNotFound", 77):
        market.assignJob(77, [machine], CLUSTER_CID, {"from": coordinator})


def test_assign_rejects_running_job(market, running_job, machine3, coordinator):
    with reverts_with("MarketInvalidJobStatus", running_job, JobStatus.RUNNING):
        market.assignJob(running_job, [machine3, machine3], CLUSTER_CID, {"from": coordinator})


def test_assign_rejects_cancelled_job(market, queued_job, machine, machine2, borrower, coordinator):
    market.cancelJob(queued_job, {"from": borrower})

    with reverts_with("MarketInvalidJobStatus", queued_job, JobStatus.CANCELLED):
        market.assignJob(queued_job, [machine, machine2], CLUSTER_CID, {"from": coordinator})


def test_assign_accepts_job_at_its_deadline(market, submit_job, borrower, machine, machine2, coordinator):
    deadline = latest_timestamp() + 1_000
    job_id = submit_job(borrower, jobDeadline=deadline)

    with mined_at(deadline):
        market.assignJob(job_id, [machine, machine2], CLUSTER_CID, {"from": coordinator})

    assert market.getJob(job_id)["status"] == JobStatus.RUNNING


def test_assign_rejects_job_past_deadline(market, submit_job, borrower, machine, machine2, coordinator):
    deadline = latest_timestamp() + 1_000
    job_id = submit_job(borrower, jobDeadline=deadline)

    with mined_at(deadline + 1), reverts_with("MarketJobDeadlinePassed", job_id, deadline):
        market.assignJob(job_id, [machine, machine2], CLUSTER_CID, {"from": coordinator})


def test_assign_rejects_machine_outside_window(
    market, submit_job, register_machine, borrower, lender, machine2, coordinator
):
    window_start = (latest_timestamp() // 3_600 + 2) * 3_600  # an hour boundary one to two hours ahead
    windowed = register_machine(lender, availabilityMask=availability_mask(hour_of_week(window_start)))
    job_id = submit_job(borrower)

    with mined_at(window_start - 1), reverts_with("MarketMachineUnavailable", windowed, window_start - 1):
        market.assignJob(job_id, [windowed, machine2], CLUSTER_CID, {"from": coordinator})
    with mined_at(window_start):
        market.assignJob(job_id, [windowed, machine2], CLUSTER_CID, {"from": coordinator})

    assert market.getWorkers(job_id)[0]["machineId"] == windowed


def test_assign_rejects_machine_after_window_closes(
    market, submit_job, register_machine, borrower, lender, machine2, coordinator
):
    window_start = (latest_timestamp() // 3_600 + 2) * 3_600
    windowed = register_machine(lender, availabilityMask=availability_mask(hour_of_week(window_start)))
    job_id = submit_job(borrower)
    window_end = window_start + 3_600

    with mined_at(window_end), reverts_with("MarketMachineUnavailable", windowed, window_end):
        market.assignJob(job_id, [windowed, machine2], CLUSTER_CID, {"from": coordinator})


def test_assign_rejects_paused_machine(market, registry, queued_job, machine, machine2, lender, coordinator):
    registry.pauseMachine(machine, {"from": lender})
    now = latest_timestamp() + 5

    with mined_at(now), reverts_with("MarketMachineUnavailable", machine, now):
        market.assignJob(queued_job, [machine2, machine], CLUSTER_CID, {"from": coordinator})


def test_assign_rejects_retired_machine(market, registry, queued_job, machine, machine2, lender, coordinator):
    registry.retireMachine(machine, {"from": lender})
    now = latest_timestamp() + 5

    with mined_at(now), reverts_with("MarketMachineUnavailable", machine, now):
        market.assignJob(queued_job, [machine, machine2], CLUSTER_CID, {"from": coordinator})


def test_assign_rejects_unknown_machine(market, queued_job, machine, coordinator):
    with reverts_with("RegistryMachineNotFound", 999):
        market.assignJob(queued_job, [machine, 999], CLUSTER_CID, {"from": coordinator})


def test_assign_rejects_borrowers_own_machine(
    market, submit_job, register_machine, lender, machine2, coordinator
):
    job_id = submit_job(lender)  # the lender borrows and offers its own machine to itself
    own = register_machine(lender)

    with reverts_with("MarketMachineOwnedByBorrower", own, lender):
        market.assignJob(job_id, [machine2, own], CLUSTER_CID, {"from": coordinator})


def test_assign_rejects_too_few_cores(market, register_machine, queued_job, lender, machine2, coordinator):
    small = register_machine(lender, cores=3)

    with reverts_with("MarketMachineTooSmall", small, 3, MEMORY_MIB):
        market.assignJob(queued_job, [small, machine2], CLUSTER_CID, {"from": coordinator})


def test_assign_rejects_too_little_memory(
    market, register_machine, queued_job, lender, machine2, coordinator
):
    small = register_machine(lender, memoryMib=8_191)

    with reverts_with("MarketMachineTooSmall", small, CORES, 8_191):
        market.assignJob(queued_job, [small, machine2], CLUSTER_CID, {"from": coordinator})


def test_assign_rejects_price_above_cap(market, register_machine, queued_job, lender, machine2, coordinator):
    pricey = register_machine(lender, pricePerCoreHour=PRICE_PER_CORE_HOUR + 1)

    with reverts_with("MarketPriceAboveCap", pricey, PRICE_PER_CORE_HOUR + 1, PRICE_PER_CORE_HOUR):
        market.assignJob(queued_job, [pricey, machine2], CLUSTER_CID, {"from": coordinator})


def test_assign_rejects_stake_below_minimum(
    market, register_machine, queued_job, lender, machine2, coordinator
):
    thin = register_machine(lender, stake=MIN_STAKE - 1)

    with reverts_with("MarketStakeTooLow", thin, MIN_STAKE - 1, MIN_STAKE):
        market.assignJob(queued_job, [machine2, thin], CLUSTER_CID, {"from": coordinator})


def test_assign_rejects_stake_withdrawn_below_minimum(
    market, registry, queued_job, machine, machine2, lender, coordinator
):
    registry.withdrawStake(machine, 1, {"from": lender})

    with reverts_with("MarketStakeTooLow", machine, MIN_STAKE - 1, MIN_STAKE):
        market.assignJob(queued_job, [machine, machine2], CLUSTER_CID, {"from": coordinator})


def test_assign_rejects_busy_machine(
    market, running_job, submit_job, borrower2, machine, machine3, coordinator
):
    other_job = submit_job(borrower2)

    with reverts_with("RegistryMachineLocked", machine, running_job):
        market.assignJob(other_job, [machine3, machine], CLUSTER_CID, {"from": coordinator})


def test_assign_rejects_same_machine_twice(market, queued_job, machine, coordinator):
    with reverts_with("RegistryMachineLocked", machine, queued_job):
        market.assignJob(queued_job, [machine, machine], CLUSTER_CID, {"from": coordinator})


def test_assign_rejects_paused_market(market, queued_job, machine, machine2, admin, coordinator):
    market.pause({"from": admin})

    with reverts_with("EnforcedPause"):
        market.assignJob(queued_job, [machine, machine2], CLUSTER_CID, {"from": coordinator})


def test_assign_needs_market_role_on_registry(
    JobMarket, token, registry, fund, machine, machine2, admin, borrower, coordinator
):
    unregistered = JobMarket.deploy(
        token, registry, admin, MIN_STAKE, SLASH_BPS, PROOF_TIMEOUT, {"from": admin}
    )
    unregistered.grantRole(COORDINATOR_ROLE, coordinator, {"from": admin})
    fund(borrower, 10, spender=unregistered)
    tx = unregistered.submitJob(request_tuple(job_request(budget=10)), {"from": borrower})
    job_id = tx.events["JobSubmitted"]["jobId"]

    with reverts_with("AccessControlUnauthorizedAccount", unregistered, MARKET_ROLE):
        unregistered.assignJob(job_id, [machine, machine2], CLUSTER_CID, {"from": coordinator})


# ------------------------------------------------------------------ cluster formation signals


def test_report_ready_emits_current_round(market, running_job, machine2, lender2):
    tx = market.reportReady(running_job, machine2, {"from": lender2})

    assert_event(tx, "WorkerReady", market, jobId=running_job, machineId=machine2, round=1)


def test_report_stopped_emits_current_round(market, running_job, machine, lender, coordinator):
    market.restartCluster(running_job, "bafyclusterspec2", {"from": coordinator})

    tx = market.reportStopped(running_job, machine, {"from": lender})

    assert_event(tx, "WorkerStopped", market, jobId=running_job, machineId=machine, round=2)


def test_worker_signals_reject_other_caller(market, running_job, machine, lender2, coordinator):
    for signal in (market.reportReady, market.reportStopped):
        for caller in (lender2, coordinator):
            with reverts_with("MarketCallerNotLender", machine, caller):
                signal(running_job, machine, {"from": caller})


def test_worker_signals_reject_machine_outside_job(market, running_job, machine3, lender3):
    for signal in (market.reportReady, market.reportStopped):
        with reverts_with("MarketWorkerNotActive", running_job, machine3):
            signal(running_job, machine3, {"from": lender3})


def test_worker_signals_reject_queued_job(market, queued_job, machine, lender):
    for signal in (market.reportReady, market.reportStopped):
        with reverts_with("MarketInvalidJobStatus", queued_job, JobStatus.QUEUED):
            signal(queued_job, machine, {"from": lender})
