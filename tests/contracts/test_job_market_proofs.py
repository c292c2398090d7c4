"""JobMarket.recordProof: lender-signed work receipts, checkpoint publication and interval pay."""

import pytest
from brownie import chain
from contract_support import (
    BUDGET,
    CORES,
    PRICE_PER_CORE_HOUR,
    JobStatus,
    assert_event,
    machine_spec,
    mined_at,
    payment_for,
    reverts_with,
)
from eth_utils import keccak
from hexbytes import HexBytes

CID_1 = "bafycheckpointone"
CID_2 = "bafycheckpointtwo"


@pytest.fixture
def since(market, running_job):
    """Unix time the workers of `running_job` were assigned (both share the block)."""
    return market.getWorkers(running_job)[0]["since"]


def test_chief_proof_pays_lender(
    market, token, running_job, machine, lender, borrower, relayer, sign_receipt, since
):
    receipt, signature, _ = sign_receipt(lender, running_job, machine, 1, 600 * CORES, CID_1, steps=1_234)
    payment = payment_for(600 * CORES)

    with mined_at(since + 600):
        tx = market.recordProof(receipt, signature, {"from": relayer})

    assert payment == 48 * 10**17
    assert market.withdrawable(lender) == payment
    assert market.withdrawable(relayer) == 0
    assert market.totalWithdrawable() == payment
    assert market.totalEscrowed() == BUDGET - payment
    assert token.balanceOf(market) == BUDGET
    job = market.getJob(running_job)
    assert (job["escrow"], job["paid"], job["lastProgressAt"]) == (BUDGET - payment, payment, since + 600)
    assert market.getWorkers(running_job)[0]["since"] == since + 600
    assert market.lastCheckpointIndex(running_job, machine) == 1
    assert HexBytes(market.checkpointCidHash(running_job, 1)) == keccak(text=CID_1)
    assert market.lentCoreSeconds(lender) == 600 * CORES
    assert market.borrowedCoreSeconds(borrower) == 600 * CORES
    assert_event(
        tx,
        "ProofRecorded",
        market,
        jobId=running_job,
        machineId=machine,
        lender=lender,
        checkpointIndex=1,
        steps=1_234,
        coreSeconds=600 * CORES,
        payment=payment,
        checkpointCid=CID_1,
    )


def test_hash_work_receipt_matches_independent_encoder(market, running_job, machine, lender, sign_receipt):
    receipt, _, digest = sign_receipt(lender, running_job, machine, 3, 12_345, "bafy-ü-checkpoint")

    assert HexBytes(market.hashWorkReceipt(receipt)) == digest


def test_worker_proof_matches_published_checkpoint(
    market, running_job, machine, machine2, lender, lender2, prove, since
):
    with mined_at(since + 100):
        prove(lender, running_job, machine, 1, 100, CID_1)

    with mined_at(since + 300):
        tx = prove(lender2, running_job, machine2, 1, 300 * CORES, CID_1)

    assert market.withdrawable(lender2) == payment_for(300 * CORES)
    assert market.lastCheckpointIndex(running_job, machine2) == 1
    assert_event(
        tx,
        "ProofRecorded",
        market,
        jobId=running_job,
        machineId=machine2,
        lender=lender2,
        checkpointIndex=1,
        steps=100,
        coreSeconds=300 * CORES,
        payment=payment_for(300 * CORES),
        checkpointCid=CID_1,
    )


def test_worker_proof_rejects_unpublished_checkpoint(market, running_job, machine2, lender2, prove):
    with reverts_with("MarketCheckpointNotPublished", running_job, 1):
        prove(lender2, running_job, machine2, 1, 1, CID_1)


def test_worker_proof_rejects_other_checkpoint_cid(
    market, running_job, machine, machine2, lender, lender2, prove
):
    chain.sleep(60)
    prove(lender, running_job, machine, 1, 1, CID_1)

    with reverts_with("MarketCheckpointMismatch", running_job, 1):
        prove(lender2, running_job, machine2, 1, 1, CID_2)


def test_proof_may_skip_checkpoint_indices(market, running_job, machine, lender, prove):
    chain.sleep(60)
    prove(lender, running_job, machine, 1, 1, CID_1)
    chain.sleep(60)
    prove(lender, running_job, machine, 5, 1, CID_2)

    assert market.lastCheckpointIndex(running_job, machine) == 5


def test_proof_accepts_full_core_seconds(market, running_job, machine, lender, prove, since):
    with mined_at(since + 1_000):
        prove(lender, running_job, machine, 1, 1_000 * CORES, CID_1)

    assert market.withdrawable(lender) == payment_for(1_000 * CORES)


def test_proof_rejects_core_seconds_above_elapsed(market, running_job, machine, lender, prove, since):
    with (
        mined_at(since + 1_000),
        reverts_with("MarketCoreSecondsTooHigh", running_job, machine, 1_000 * CORES + 1, 1_000 * CORES),
    ):
        prove(lender, running_job, machine, 1, 1_000 * CORES + 1, CID_1)


def test_proof_interval_starts_at_previous_proof(market, running_job, machine, lender, prove, since):
    with mined_at(since + 100):
        prove(lender, running_job, machine, 1, 100 * CORES, CID_1)

    with (
        mined_at(since + 150),
        reverts_with("MarketCoreSecondsTooHigh", running_job, machine, 50 * CORES + 1, 50 * CORES),
    ):
        prove(lender, running_job, machine, 2, 50 * CORES + 1, CID_2)


def test_proof_pays_price_rounded_down(
    market, registry, submit_job, register_machine, borrower, lender, lender2, coordinator, prove
):
    cheap = register_machine(lender, pricePerCoreHour=1_000)
    other = register_machine(lender2, pricePerCoreHour=1_000)
    job_id = submit_job(borrower)
    market.assignJob(job_id, [cheap, other], "bafycluster", {"from": coordinator})
    chain.sleep(60)

    tx = prove(lender, job_id, cheap, 1, 7, CID_1)

    # 7 core-seconds at 1000 per core-hour is 1.94 base units.
    assert tx.events["ProofRecorded"]["payment"] == 1
    assert market.withdrawable(lender) == 1


def test_proof_uses_price_at_assignment(market, registry, running_job, machine, lender, prove):
    registry.updateMachine(machine, machine_spec(pricePerCoreHour=10 * PRICE_PER_CORE_HOUR), {"from": lender})
    chain.sleep(60)

    tx = prove(lender, running_job, machine, 1, 100, CID_1)

    assert tx.events["ProofRecorded"]["payment"] == payment_for(100)


def test_proof_rejects_queued_job(market, queued_job, machine, lender, prove):
    with reverts_with("MarketInvalidJobStatus", queued_job, JobStatus.QUEUED):
        prove(lender, queued_job, machine, 1, 1, CID_1)


def test_proof_rejects_completed_job(market, running_job, machine, lender, coordinator, prove):
    market.completeJob(running_job, "bafyresult", {"from": coordinator})

    with reverts_with("MarketInvalidJobStatus", running_job, JobStatus.COMPLETED):
        prove(lender, running_job, machine, 1, 1, CID_1)


def test_proof_rejects_unknown_job(market, machine, lender, prove):
    with reverts_with("MarketJobNotFound", 404):
        prove(lender, 404, machine, 1, 1, CID_1)


def test_proof_rejects_machine_outside_job(market, running_job, machine3, lender3, prove):
    with reverts_with("MarketWorkerNotActive", running_job, machine3):
        prove(lender3, running_job, machine3, 1, 1, CID_1)


def test_proof_rejects_machine_that_left(market, running_job, machine2, lender2, prove):
    market.leaveJob(running_job, machine2, {"from": lender2})

    with reverts_with("MarketWorkerNotActive", running_job, machine2):
        prove(lender2, running_job, machine2, 1, 1, CID_1)


def test_replacement_chief_republishes_only_same_cid(
    market, running_job, machine, machine3, lender, lender3, coordinator, prove
):
    chain.sleep(60)
    prove(lender, running_job, machine, 1, 1, CID_1)
    market.reportFault(running_job, machine, {"from": coordinator})
    market.replaceWorker(running_job, 0, machine3, "bafycluster2", {"from": coordinator})
    chain.sleep(60)

    with reverts_with("MarketCheckpointMismatch", running_job, 1):
        prove(lender3, running_job, machine3, 1, 1, CID_2)
    prove(lender3, running_job, machine3, 1, 1, CID_1)
    chain.sleep(60)
    prove(lender3, running_job, machine3, 2, 1, CID_2)

    assert HexBytes(market.checkpointCidHash(running_job, 1)) == keccak(text=CID_1)
    assert HexBytes(market.checkpointCidHash(running_job, 2)) == keccak(text=CID_2)
    assert market.lastCheckpointIndex(running_job, machine3) == 2
