"""Attacks on the market and the defences that stop them.

Each test drives the attack to the point where one defence must hold, so removing that
defence makes the test fail (a different error, or a transaction that goes through).
"""

import pytest
from brownie import chain
from contract_support import (
    BUDGET,
    CORES,
    MIN_STAKE,
    PROOF_TIMEOUT,
    SLASH_BPS,
    JobStatus,
    assert_event,
    high_s_twin,
    job_request,
    latest_timestamp,
    mined_at,
    payment_for,
    recover_signer,
    request_tuple,
    reverts_with,
    slash_for,
    split_signature,
)

# ------------------------------------------------------------------ reentrancy


def test_withdraw_blocks_reentrant_token_callback(
    ReentrantToken, MachineRegistry, JobMarket, WithdrawAttacker, admin, stranger
):
    hooked_token = ReentrantToken.deploy({"from": admin})
    hooked_registry = MachineRegistry.deploy(hooked_token, admin, {"from": admin})
    hooked_market = JobMarket.deploy(
        hooked_token, hooked_registry, admin, MIN_STAKE, SLASH_BPS, PROOF_TIMEOUT, {"from": admin}
    )
    attacker = WithdrawAttacker.deploy(hooked_market, {"from": stranger})
    hooked_token.mint(attacker, BUDGET, {"from": admin})
    attacker.submitAndCancel(request_tuple(job_request()), {"from": stranger})
    assert hooked_market.withdrawable(attacker) == BUDGET
    hooked_token.setHook(attacker, {"from": stranger})

    # withdraw() pays, the token calls the attacker back, and it calls withdraw() again.
    with reverts_with("ReentrancyGuardReentrantCall"):
        attacker.attack({"from": stranger})

    assert hooked_market.withdrawable(attacker) == BUDGET
    assert hooked_market.totalWithdrawable() == BUDGET
    assert hooked_token.balanceOf(hooked_market) == BUDGET
    assert hooked_token.balanceOf(attacker) == 0
    assert attacker.reentries() == 0


# ------------------------------------------------------------------ signed orders


@pytest.fixture
def funded_borrower(market, fund, borrower):
    """`borrower` with allowance for two budgets, so only signature checks can stop a second job."""
    fund(borrower, 2 * BUDGET, spender=market)
    return borrower


def test_signed_order_rejects_replay(market, token, sign_order, funded_borrower, relayer):
    order, signature, _ = sign_order(funded_borrower, job_request())
    market.submitJobWithSignature(order, signature, {"from": relayer})

    with reverts_with("InvalidAccountNonce", funded_borrower, 1):
        market.submitJobWithSignature(order, signature, {"from": relayer})

    assert market.jobCount() == 1
    assert token.balanceOf(funded_borrower) == BUDGET


def test_signed_order_rejects_other_chain_id(market, sign_order, funded_borrower, relayer):
    order, signature, _ = sign_order(funded_borrower, job_request(), chain_id=1)
    recovered = recover_signer(market.hashJobOrder(order), signature)
    assert recovered != funded_borrower.address

    with reverts_with("MarketInvalidSigner", funded_borrower, recovered):
        market.submitJobWithSignature(order, signature, {"from": relayer})


def test_signed_order_rejects_other_market(
    JobMarket, market, token, registry, fund, sign_order, funded_borrower, admin, relayer
):
    other_market = JobMarket.deploy(
        token, registry, admin, MIN_STAKE, SLASH_BPS, PROOF_TIMEOUT, {"from": admin}
    )
    fund(funded_borrower, BUDGET, spender=other_market)
    order, signature, _ = sign_order(funded_borrower, job_request(), verifying_contract=other_market)
    recovered = recover_signer(market.hashJobOrder(order), signature)

    with reverts_with("MarketInvalidSigner", funded_borrower, recovered):
        market.submitJobWithSignature(order, signature, {"from": relayer})

    # The signature is good where it was meant to go.
    other_market.submitJobWithSignature(order, signature, {"from": relayer})
    assert other_market.jobCount() == 1


def test_signed_order_rejects_high_s_twin(market, sign_order, funded_borrower, relayer):
    order, signature, digest = sign_order(funded_borrower, job_request())
    twin = high_s_twin(signature)
    # ecrecover alone accepts the twin for the same signer; only the low-s rule rejects it.
    assert recover_signer(digest, twin) == funded_borrower.address
    _, twin_s, _ = split_signature(twin)

    with reverts_with("ECDSAInvalidSignatureS", twin_s.to_bytes(32, "big")):
        market.submitJobWithSignature(order, twin, {"from": relayer})


def test_signed_order_rejects_expired_deadline(market, sign_order, funded_borrower, relayer):
    deadline = latest_timestamp() + 100
    order, signature, _ = sign_order(funded_borrower, job_request(), deadline=deadline)

    with mined_at(deadline + 1), reverts_with("MarketOrderExpired", deadline, deadline + 1):
        market.submitJobWithSignature(order, signature, {"from": relayer})


def test_signed_order_accepted_at_its_deadline(market, sign_order, funded_borrower, relayer):
    deadline = latest_timestamp() + 100
    order, signature, _ = sign_order(funded_borrower, job_request(), deadline=deadline)

    with mined_at(deadline):
        market.submitJobWithSignature(order, signature, {"from": relayer})

    assert market.jobCount() == 1


# ------------------------------------------------------------------ work receipts


def test_receipt_rejects_replay(market, running_job, machine, lender, sign_receipt, relayer):
    chain.sleep(100)
    receipt, signature, _ = sign_receipt(lender, running_job, machine, 1, 10 * CORES)
    market.recordProof(receipt, signature, {"from": relayer})
    chain.sleep(100)

    with reverts_with("MarketStaleCheckpoint", running_job, machine, 1, 1):
        market.recordProof(receipt, signature, {"from": relayer})

    assert market.withdrawable(lender) == payment_for(10 * CORES)


def test_receipt_rejects_out_of_order_index(market, running_job, machine, lender, sign_receipt, relayer):
    chain.sleep(100)
    third = sign_receipt(lender, running_job, machine, 3, 10 * CORES)
    second = sign_receipt(lender, running_job, machine, 2, 10 * CORES)
    market.recordProof(third[0], third[1], {"from": relayer})
    chain.sleep(100)

    with reverts_with("MarketStaleCheckpoint", running_job, machine, 2, 3):
        market.recordProof(second[0], second[1], {"from": relayer})


def test_receipt_rejects_wrong_key(market, running_job, machine, lender, lender2, sign_receipt, relayer):
    chain.sleep(100)
    receipt, signature, _ = sign_receipt(lender2, running_job, machine, 1, 10 * CORES)

    with reverts_with("MarketInvalidSigner", lender, lender2):
        market.recordProof(receipt, signature, {"from": relayer})


def test_receipt_rejects_other_chain_id(market, running_job, machine, lender, sign_receipt, relayer):
    chain.sleep(100)
    receipt, signature, _ = sign_receipt(lender, running_job, machine, 1, 10 * CORES, chain_id=5)
    recovered = recover_signer(market.hashWorkReceipt(receipt), signature)

    with reverts_with("MarketInvalidSigner", lender, recovered):
        market.recordProof(receipt, signature, {"from": relayer})


def test_receipt_rejects_other_market(market, running_job, machine, lender, sign_receipt, relayer, stranger):
    chain.sleep(100)
    receipt, signature, _ = sign_receipt(
        lender, running_job, machine, 1, 10 * CORES, verifying_contract=stranger
    )
    recovered = recover_signer(market.hashWorkReceipt(receipt), signature)

    with reverts_with("MarketInvalidSigner", lender, recovered):
        market.recordProof(receipt, signature, {"from": relayer})


def test_receipt_rejects_high_s_twin(market, running_job, machine, lender, sign_receipt, relayer):
    chain.sleep(100)
    receipt, signature, _ = sign_receipt(lender, running_job, machine, 1, 10 * CORES)
    twin = high_s_twin(signature)
    _, twin_s, _ = split_signature(twin)

    with reverts_with("ECDSAInvalidSignatureS", twin_s.to_bytes(32, "big")):
        market.recordProof(receipt, twin, {"from": relayer})


def test_receipt_rejects_payment_above_escrow(
    market, submit_job, borrower, machine, machine2, lender, coordinator, prove
):
    budget = payment_for(5)  # escrow worth five core-seconds
    job_id = submit_job(borrower, budget=budget)
    market.assignJob(job_id, [machine, machine2], "bafycluster", {"from": coordinator})
    chain.sleep(100)

    with reverts_with("MarketBudgetExhausted", job_id, payment_for(6), budget):
        prove(lender, job_id, machine, 1, 6)
    prove(lender, job_id, machine, 1, 5)
    chain.sleep(100)
    with reverts_with("MarketBudgetExhausted", job_id, payment_for(1), 0):
        prove(lender, job_id, machine, 2, 1)

    assert market.getJob(job_id)["escrow"] == 0
    assert market.withdrawable(lender) == budget


# ------------------------------------------------------------------ lenders and borrowers who walk away


def test_idle_lenders_slashed_after_timeout(
    market, registry, token, running_job, machine, machine2, borrower, stranger
):
    last_progress = market.getJob(running_job)["lastProgressAt"]
    slashed = slash_for(MIN_STAKE)

    with mined_at(last_progress + PROOF_TIMEOUT), reverts_with("MarketJobNotExpirable", running_job):
        market.expireJob(running_job, {"from": stranger})
    with mined_at(last_progress + PROOF_TIMEOUT + 1):
        tx = market.expireJob(running_job, {"from": stranger})

    assert market.getJob(running_job)["status"] == JobStatus.EXPIRED
    assert registry.getMachine(machine)["stake"] == MIN_STAKE - slashed
    assert registry.getMachine(machine2)["stake"] == MIN_STAKE - slashed
    assert market.withdrawable(borrower) == BUDGET + 2 * slashed
    assert_event(tx, "JobExpired", market, jobId=running_job, refund=BUDGET, slashed=2 * slashed)
    assert_event(
        tx, "WorkerFaulted", market, index=0, jobId=running_job, machineId=machine, slot=0, slashed=slashed
    )
    assert_event(
        tx, "WorkerFaulted", market, index=1, jobId=running_job, machineId=machine2, slot=1, slashed=slashed
    )

    market.withdraw({"from": borrower})
    assert token.balanceOf(borrower) == BUDGET + 2 * slashed


def test_lenders_withdraw_after_completion_without_borrower(
    market, registry, token, running_job, machine, machine2, lender, lender2, coordinator, prove
):
    chain.sleep(1_000)
    prove(lender, running_job, machine, 1, 500 * CORES, "bafyckpt")
    prove(lender2, running_job, machine2, 1, 400 * CORES, "bafyckpt")
    market.completeJob(running_job, "bafyresult", {"from": coordinator})

    market.withdraw({"from": lender})
    market.withdraw({"from": lender2})
    registry.retireMachine(machine, {"from": lender})

    assert token.balanceOf(lender) == payment_for(500 * CORES) + MIN_STAKE
    assert token.balanceOf(lender2) == payment_for(400 * CORES)


def test_lenders_withdraw_after_expiry_without_borrower(
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
    deadline = start + 1_000
    job_id = submit_job(borrower, jobDeadline=deadline)
    with mined_at(start):
        market.assignJob(job_id, [machine, machine2], "bafycluster", {"from": coordinator})
    with mined_at(start + 900):
        prove(lender, job_id, machine, 1, 900 * CORES, "bafyckpt")
    prove(lender2, job_id, machine2, 1, 900 * CORES, "bafyckpt")

    # The coordinator and the borrower are gone; anyone ends the job after its deadline.
    with mined_at(deadline + 1):
        market.expireJob(job_id, {"from": stranger})
    market.withdraw({"from": lender})
    market.withdraw({"from": lender2})
    registry.retireMachine(machine2, {"from": lender2})

    assert token.balanceOf(lender) == payment_for(900 * CORES)
    assert token.balanceOf(lender2) == payment_for(900 * CORES) + MIN_STAKE
    assert market.withdrawable(borrower) == BUDGET - 2 * payment_for(900 * CORES)


# ------------------------------------------------------------------ deadline boundaries


@pytest.mark.parametrize("offset", [-1, 0, 1], ids=["deadline-1", "deadline", "deadline+1"])
@pytest.mark.parametrize("assigned", [False, True], ids=["queued", "running"])
def test_expire_requires_time_past_job_deadline(
    market, submit_job, borrower, machine, machine2, coordinator, stranger, offset, assigned
):
    # The deadline comes well before the proof timeout, so only the deadline can make the job expirable.
    deadline = latest_timestamp() + PROOF_TIMEOUT // 4
    job_id = submit_job(borrower, jobDeadline=deadline)
    if assigned:
        market.assignJob(job_id, [machine, machine2], "bafycluster", {"from": coordinator})

    if offset <= 0:
        with mined_at(deadline + offset), reverts_with("MarketJobNotExpirable", job_id):
            market.expireJob(job_id, {"from": stranger})
        assert market.getJob(job_id)["status"] == (JobStatus.RUNNING if assigned else JobStatus.QUEUED)
    else:
        with mined_at(deadline + offset):
            tx = market.expireJob(job_id, {"from": stranger})
        assert market.getJob(job_id)["status"] == JobStatus.EXPIRED
        assert_event(tx, "JobExpired", market, jobId=job_id, refund=BUDGET, slashed=0)


# ------------------------------------------------------------------ pause


def test_pause_blocks_entry_but_not_exits(
    market,
    token,
    fund,
    submit_job,
    borrower,
    borrower2,
    machine,
    machine2,
    machine3,
    coordinator,
    admin,
    stranger,
):
    queued = submit_job(borrower)
    stalled = submit_job(borrower2)
    market.assignJob(stalled, [machine, machine2], "bafycluster", {"from": coordinator})
    fund(borrower, BUDGET, spender=market)
    last_progress = market.getJob(stalled)["lastProgressAt"]

    market.pause({"from": admin})

    with reverts_with("EnforcedPause"):
        market.submitJob(request_tuple(job_request()), {"from": borrower})
    with reverts_with("EnforcedPause"):
        market.assignJob(queued, [machine3, machine3], "bafycluster", {"from": coordinator})
    market.cancelJob(queued, {"from": borrower})
    with mined_at(last_progress + PROOF_TIMEOUT + 1):
        market.expireJob(stalled, {"from": stranger})
    market.withdraw({"from": borrower})
    market.withdraw({"from": borrower2})

    assert token.balanceOf(borrower) == 2 * BUDGET
    assert token.balanceOf(borrower2) == BUDGET + 2 * slash_for(MIN_STAKE)
