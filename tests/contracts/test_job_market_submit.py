"""JobMarket: deployment parameters, job submission (direct, permit, signed order) and pausing."""

import pytest
from contract_support import (
    BUDGET,
    COORDINATOR_ROLE,
    DEFAULT_ADMIN_ROLE,
    EIP712_DOMAIN_TYPE,
    JOB_ORDER_TYPE,
    JOB_REQUEST_TYPE,
    MARKET_DOMAIN_NAME,
    MIN_STAKE,
    PAUSER_ROLE,
    PERMIT_TYPE,
    PROOF_TIMEOUT,
    SLASH_BPS,
    TOKEN_DOMAIN_NAME,
    WORK_RECEIPT_TYPE,
    JobStatus,
    assert_event,
    eip712_domain,
    job_request,
    latest_timestamp,
    mined_at,
    recover_signer,
    request_tuple,
    reverts_with,
    sign_typed_data,
)
from eth_account.messages import encode_typed_data
from eth_utils import keccak
from hexbytes import HexBytes


def type_string(name, fields):
    members = ",".join(field["type"] + " " + field["name"] for field in fields)
    return f"{name}({members})"


def sign_budget_permit(token, market, owner, value, deadline):
    message = {
        "owner": owner.address,
        "spender": market.address,
        "value": value,
        "nonce": token.nonces(owner),
        "deadline": deadline,
    }
    domain = eip712_domain(TOKEN_DOMAIN_NAME, token)
    signature, _ = sign_typed_data(owner.private_key, domain, "Permit", {"Permit": PERMIT_TYPE}, message)
    return signature[64], signature[:32], signature[32:64]


def sign_order_for(market, signer, order):
    """Sign an already built order tuple with `signer`'s key."""
    borrower, request, nonce, deadline = order
    message = {
        "borrower": borrower,
        "request": {field["name"]: value for field, value in zip(JOB_REQUEST_TYPE, request, strict=True)},
        "nonce": nonce,
        "deadline": deadline,
    }
    domain = eip712_domain(MARKET_DOMAIN_NAME, market)
    signature, _ = sign_typed_data(
        signer.private_key,
        domain,
        "JobOrder",
        {"JobOrder": JOB_ORDER_TYPE, "JobRequest": JOB_REQUEST_TYPE},
        message,
    )
    return signature


# ------------------------------------------------------------------ deployment and parameters


def test_constructor_sets_parameters_and_roles(market, token, registry, admin, coordinator):
    assert market.token() == token
    assert market.registry() == registry
    assert market.minStake() == MIN_STAKE
    assert market.slashBps() == SLASH_BPS
    assert market.proofTimeout() == PROOF_TIMEOUT
    assert market.MAX_WORKERS() == 64
    assert market.BPS() == 10_000
    assert market.hasRole(DEFAULT_ADMIN_ROLE, admin)
    assert market.hasRole(PAUSER_ROLE, admin)
    assert market.hasRole(COORDINATOR_ROLE, coordinator)
    assert not market.hasRole(COORDINATOR_ROLE, admin)
    assert_event(
        market.tx,
        "ParametersUpdated",
        market,
        minStake=MIN_STAKE,
        slashBps=SLASH_BPS,
        proofTimeout=PROOF_TIMEOUT,
    )


def test_type_hashes_match_eip712_type_strings(market):
    request = type_string("JobRequest", JOB_REQUEST_TYPE)
    order = type_string("JobOrder", JOB_ORDER_TYPE) + request
    receipt = type_string("WorkReceipt", WORK_RECEIPT_TYPE)

    assert HexBytes(market.JOB_REQUEST_TYPEHASH()) == keccak(text=request)
    assert HexBytes(market.JOB_ORDER_TYPEHASH()) == keccak(text=order)
    assert HexBytes(market.WORK_RECEIPT_TYPEHASH()) == keccak(text=receipt)


def test_domain_separator_matches_independent_encoder(market):
    domain = eip712_domain(MARKET_DOMAIN_NAME, market)
    receipt = {
        "jobId": 1,
        "machineId": 1,
        "checkpointIndex": 1,
        "steps": 1,
        "checkpointCid": "c",
        "coreSeconds": 1,
    }
    full_message = {
        "types": {"EIP712Domain": EIP712_DOMAIN_TYPE, "WorkReceipt": WORK_RECEIPT_TYPE},
        "primaryType": "WorkReceipt",
        "domain": domain,
        "message": receipt,
    }

    # The header of an EIP-191 version 1 message is the domain separator.
    assert HexBytes(market.DOMAIN_SEPARATOR()) == encode_typed_data(full_message=full_message).header


@pytest.mark.parametrize(
    "slash_bps, proof_timeout, name, value",
    [(10_001, PROOF_TIMEOUT, "slashBps", 10_001), (SLASH_BPS, 0, "proofTimeout", 0)],
    ids=["slash-above-100-percent", "zero-proof-timeout"],
)
def test_constructor_rejects_invalid_parameters(
    JobMarket, token, registry, admin, slash_bps, proof_timeout, name, value
):
    with reverts_with("MarketInvalidParameter", name, value):
        JobMarket.deploy(token, registry, admin, MIN_STAKE, slash_bps, proof_timeout, {"from": admin})


def test_set_parameters_updates_and_emits(market, admin):
    tx = market.setParameters(5, 10_000, 60, {"from": admin})

    assert (market.minStake(), market.slashBps(), market.proofTimeout()) == (5, 10_000, 60)
    assert_event(tx, "ParametersUpdated", market, minStake=5, slashBps=10_000, proofTimeout=60)


def test_set_parameters_rejects_invalid_values(market, admin):
    with reverts_with("MarketInvalidParameter", "slashBps", 10_001):
        market.setParameters(MIN_STAKE, 10_001, PROOF_TIMEOUT, {"from": admin})
    with reverts_with("MarketInvalidParameter", "proofTimeout", 0):
        market.setParameters(MIN_STAKE, SLASH_BPS, 0, {"from": admin})


def test_set_parameters_rejects_non_admin(market, coordinator):
    with reverts_with("AccessControlUnauthorizedAccount", coordinator, DEFAULT_ADMIN_ROLE):
        market.setParameters(0, 0, 1, {"from": coordinator})


# ------------------------------------------------------------------ submitJob


def test_submit_job_escrows_budget(market, token, fund, borrower):
    request = job_request(
        bundleCid="bafybundle", budget=250, maxPricePerCoreHour=9, workers=3, minCores=2, minMemoryMib=512
    )
    fund(borrower, 250, spender=market)

    tx = market.submitJob(request_tuple(request), {"from": borrower})

    assert tx.return_value == 1
    assert market.jobCount() == 1
    assert market.totalEscrowed() == 250
    assert token.balanceOf(market) == 250
    assert token.balanceOf(borrower) == 0
    job = market.getJob(1)
    assert job["borrower"] == borrower
    assert job["status"] == JobStatus.QUEUED
    assert (job["workers"], job["round"], job["minCores"], job["minMemoryMib"]) == (3, 0, 2, 512)
    assert job["deadline"] == request["jobDeadline"]
    assert (job["budget"], job["escrow"], job["paid"], job["maxPricePerCoreHour"]) == (250, 250, 0, 9)
    assert (job["bundleCid"], job["clusterSpecCid"], job["resultCid"]) == ("bafybundle", "", "")
    assert market.getWorkers(1) == []
    assert_event(
        tx,
        "JobSubmitted",
        market,
        jobId=1,
        borrower=borrower,
        budget=250,
        workers=3,
        deadline=request["jobDeadline"],
        bundleCid="bafybundle",
    )
    assert_event(tx, "Transfer", token, **{"from": borrower, "to": market, "value": 250})


def test_submit_job_accepts_max_workers(market, submit_job, borrower):
    job_id = submit_job(borrower, workers=64)

    assert market.getJob(job_id)["workers"] == 64


@pytest.mark.parametrize(
    "override, field, value",
    [
        ({"bundleCid": ""}, "bundleCid", 0),
        ({"budget": 0}, "budget", 0),
        ({"workers": 0}, "workers", 0),
        ({"workers": 65}, "workers", 65),
    ],
    ids=["empty-bundle", "zero-budget", "no-workers", "too-many-workers"],
)
def test_submit_rejects_invalid_request(market, fund, borrower, override, field, value):
    fund(borrower, BUDGET, spender=market)

    with reverts_with("MarketInvalidRequest", field, value):
        market.submitJob(request_tuple(job_request(**override)), {"from": borrower})


def test_submit_rejects_deadline_not_in_future(market, fund, borrower):
    fund(borrower, BUDGET, spender=market)
    now = latest_timestamp() + 10
    request = job_request(jobDeadline=now)

    with mined_at(now), reverts_with("MarketInvalidRequest", "jobDeadline", now):
        market.submitJob(request_tuple(request), {"from": borrower})


def test_submit_accepts_deadline_one_second_ahead(market, fund, borrower):
    fund(borrower, BUDGET, spender=market)
    now = latest_timestamp() + 10

    with mined_at(now):
        tx = market.submitJob(request_tuple(job_request(jobDeadline=now + 1)), {"from": borrower})

    assert market.getJob(tx.events["JobSubmitted"]["jobId"])["deadline"] == now + 1


def test_submit_rejects_missing_allowance(market, token, admin, borrower):
    token.mint(borrower, BUDGET, "grant", {"from": admin})

    with reverts_with("ERC20InsufficientAllowance", market, 0, BUDGET):
        market.submitJob(request_tuple(job_request()), {"from": borrower})


def test_submit_rejects_budget_above_balance(market, token, admin, borrower):
    token.mint(borrower, BUDGET - 1, "grant", {"from": admin})
    token.approve(market, BUDGET, {"from": borrower})

    with reverts_with("ERC20InsufficientBalance", borrower, BUDGET - 1, BUDGET):
        market.submitJob(request_tuple(job_request()), {"from": borrower})


def test_get_job_rejects_unknown_id(market):
    with reverts_with("MarketJobNotFound", market.jobCount() + 1):
        market.getJob(market.jobCount() + 1)


# ------------------------------------------------------------------ submitJobWithPermit


def test_permit_submit_escrows_budget(market, token, admin, borrower):
    token.mint(borrower, BUDGET, "grant", {"from": admin})
    deadline = latest_timestamp() + 600
    v, r, s = sign_budget_permit(token, market, borrower, BUDGET, deadline)

    tx = market.submitJobWithPermit(request_tuple(job_request()), deadline, v, r, s, {"from": borrower})

    job_id = tx.events["JobSubmitted"]["jobId"]
    assert market.getJob(job_id)["escrow"] == BUDGET
    assert token.balanceOf(market) == BUDGET
    assert token.nonces(borrower) == 1
    assert token.allowance(borrower, market) == 0
    assert_event(tx, "Approval", token, index=0, owner=borrower, spender=market, value=BUDGET)


def test_permit_submit_survives_front_run(market, token, admin, borrower, stranger):
    token.mint(borrower, BUDGET, "grant", {"from": admin})
    deadline = latest_timestamp() + 600
    v, r, s = sign_budget_permit(token, market, borrower, BUDGET, deadline)
    token.permit(borrower, market, BUDGET, deadline, v, r, s, {"from": stranger})

    tx = market.submitJobWithPermit(request_tuple(job_request()), deadline, v, r, s, {"from": borrower})

    assert market.getJob(tx.events["JobSubmitted"]["jobId"])["status"] == JobStatus.QUEUED
    assert token.balanceOf(market) == BUDGET


def test_permit_submit_needs_allowance_when_invalid(market, token, admin, borrower, lender):
    token.mint(borrower, BUDGET, "grant", {"from": admin})
    deadline = latest_timestamp() + 600
    v, r, s = sign_budget_permit(token, market, lender, BUDGET, deadline)  # wrong owner's key

    with reverts_with("ERC20InsufficientAllowance", market, 0, BUDGET):
        market.submitJobWithPermit(request_tuple(job_request()), deadline, v, r, s, {"from": borrower})


# ------------------------------------------------------------------ submitJobWithSignature


def test_submit_with_signature_escrows_from_borrower(market, token, fund, sign_order, borrower, relayer):
    request = job_request()
    fund(borrower, BUDGET, spender=market)
    order, signature, digest = sign_order(borrower, request)
    relayer_balance = token.balanceOf(relayer)

    tx = market.submitJobWithSignature(order, signature, {"from": relayer})

    job_id = tx.events["JobSubmitted"]["jobId"]
    assert market.getJob(job_id)["borrower"] == borrower
    assert market.nonces(borrower) == 1
    assert token.balanceOf(borrower) == 0
    assert token.balanceOf(relayer) == relayer_balance
    assert_event(
        tx,
        "JobSubmitted",
        market,
        jobId=job_id,
        borrower=borrower,
        budget=BUDGET,
        workers=2,
        deadline=request["jobDeadline"],
        bundleCid=request["bundleCid"],
    )
    assert_event(tx, "Transfer", token, **{"from": borrower, "to": market, "value": BUDGET})


def test_hash_job_order_matches_independent_encoder(market, sign_order, borrower):
    order, _, digest = sign_order(borrower, job_request(bundleCid="bafy-é-unicode", workers=5))

    assert HexBytes(market.hashJobOrder(order)) == digest


def test_signed_orders_use_consecutive_nonces(market, fund, sign_order, borrower, relayer):
    fund(borrower, 2 * BUDGET, spender=market)
    first = sign_order(borrower, job_request(), nonce=0)
    second = sign_order(borrower, job_request(), nonce=1)

    market.submitJobWithSignature(first[0], first[1], {"from": relayer})
    market.submitJobWithSignature(second[0], second[1], {"from": relayer})

    assert market.nonces(borrower) == 2


def test_submit_with_signature_rejects_skipped_nonce(market, fund, sign_order, borrower, relayer):
    fund(borrower, BUDGET, spender=market)
    order, signature, _ = sign_order(borrower, job_request(), nonce=1)

    with reverts_with("InvalidAccountNonce", borrower, 0):
        market.submitJobWithSignature(order, signature, {"from": relayer})


def test_submit_with_signature_rejects_other_signer(market, fund, sign_order, borrower, lender, relayer):
    fund(borrower, BUDGET, spender=market)
    order, _, _ = sign_order(borrower, job_request())
    # The lender signs an order that names the borrower as the payer.
    forged_signature = sign_order_for(market, lender, order)

    with reverts_with("MarketInvalidSigner", borrower, lender):
        market.submitJobWithSignature(order, forged_signature, {"from": relayer})


def test_submit_with_signature_rejects_tampered_budget(market, fund, sign_order, borrower, relayer):
    fund(borrower, 2 * BUDGET, spender=market)
    order, signature, _ = sign_order(borrower, job_request())
    tampered_request = (order[1][0], 2 * BUDGET, *order[1][2:])
    tampered = (order[0], tampered_request, order[2], order[3])
    recovered = recover_signer(market.hashJobOrder(tampered), signature)

    with reverts_with("MarketInvalidSigner", borrower, recovered):
        market.submitJobWithSignature(tampered, signature, {"from": relayer})


def test_submit_with_signature_rejects_short_signature(market, fund, sign_order, borrower, relayer):
    fund(borrower, BUDGET, spender=market)
    order, signature, _ = sign_order(borrower, job_request())

    with reverts_with("ECDSAInvalidSignatureLength", 64):
        market.submitJobWithSignature(order, signature[:64], {"from": relayer})


def test_submit_with_signature_rejects_invalid_v(market, fund, sign_order, borrower, relayer):
    fund(borrower, BUDGET, spender=market)
    order, signature, _ = sign_order(borrower, job_request())

    with reverts_with("ECDSAInvalidSignature"):
        market.submitJobWithSignature(order, bytes(signature[:64]) + bytes([29]), {"from": relayer})


# ------------------------------------------------------------------ pause


def test_pause_blocks_every_submission_path(market, token, fund, sign_order, admin, borrower, relayer):
    fund(borrower, BUDGET, spender=market)
    order, signature, _ = sign_order(borrower, job_request())

    tx = market.pause({"from": admin})
    assert market.paused()
    assert_event(tx, "Paused", market, account=admin)

    with reverts_with("EnforcedPause"):
        market.submitJob(request_tuple(job_request()), {"from": borrower})
    with reverts_with("EnforcedPause"):
        market.submitJobWithPermit(
            request_tuple(job_request()), 0, 27, b"\x00" * 32, b"\x00" * 32, {"from": borrower}
        )
    with reverts_with("EnforcedPause"):
        market.submitJobWithSignature(order, signature, {"from": relayer})

    tx = market.unpause({"from": admin})
    assert_event(tx, "Unpaused", market, account=admin)
    market.submitJobWithSignature(order, signature, {"from": relayer})
    assert market.jobCount() == 1


def test_unpause_rejects_running_market(market, admin):
    with reverts_with("ExpectedPause"):
        market.unpause({"from": admin})


def test_pause_rejects_caller_without_pauser_role(market, coordinator):
    with reverts_with("AccessControlUnauthorizedAccount", coordinator, PAUSER_ROLE):
        market.pause({"from": coordinator})
