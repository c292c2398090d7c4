"""Fixtures for the DeepMarket contract tests: deployment, funded keyed accounts, machines, jobs, signatures."""

import pytest
from brownie import accounts as brownie_accounts
from contract_support import (
    COORDINATOR_ROLE,
    JOB_ORDER_TYPE,
    JOB_REQUEST_TYPE,
    MARKET_DOMAIN_NAME,
    MARKET_ROLE,
    MIN_STAKE,
    ORDER_LIFETIME_S,
    PROOF_TIMEOUT,
    SLASH_BPS,
    WORK_RECEIPT_TYPE,
    eip712_domain,
    job_request,
    latest_timestamp,
    machine_spec,
    order_tuple,
    receipt_tuple,
    request_tuple,
    sign_typed_data,
)
from eth_utils import keccak


def pytest_configure(config):
    # Brownie's own chain helpers call its deprecated rpc.* functions internally.
    config.addinivalue_line("filterwarnings", r"ignore:rpc\.\w+ should not be called directly:FutureWarning")


@pytest.fixture(autouse=True)
def isolation(fn_isolation):
    """Revert the chain after every test. Module-scoped fixtures are rebuilt for each module."""


# ------------------------------------------------------------------ accounts


@pytest.fixture(scope="module")
def admin(accounts):
    """Deployer: DEFAULT_ADMIN_ROLE and MINTER_ROLE on the token, admin and PAUSER_ROLE on the market."""
    return accounts[0]


@pytest.fixture(scope="module")
def coordinator(accounts):
    return accounts[1]


@pytest.fixture(scope="module")
def relayer(accounts):
    """Relays signed orders and receipts and has no role."""
    return accounts[2]


@pytest.fixture(scope="module")
def stranger(accounts):
    return accounts[3]


def _keyed_account(label, funder):
    """Add a local account with a fixed private key (so tests can sign for it) and give it ether for gas."""
    account = brownie_accounts.add(keccak(text=f"deepmarket contract tests: {label}"))
    funder.transfer(account, "10 ether")
    return account


@pytest.fixture(scope="module")
def lender(admin):
    return _keyed_account("lender", admin)


@pytest.fixture(scope="module")
def lender2(admin):
    return _keyed_account("lender 2", admin)


@pytest.fixture(scope="module")
def lender3(admin):
    return _keyed_account("lender 3", admin)


@pytest.fixture(scope="module")
def borrower(admin):
    return _keyed_account("borrower", admin)


@pytest.fixture(scope="module")
def borrower2(admin):
    return _keyed_account("borrower 2", admin)


# ------------------------------------------------------------------ deployment


@pytest.fixture(scope="module")
def token(CreditToken, admin):
    return CreditToken.deploy(admin, {"from": admin})


@pytest.fixture(scope="module")
def registry(MachineRegistry, token, admin):
    return MachineRegistry.deploy(token, admin, {"from": admin})


@pytest.fixture(scope="module")
def market(JobMarket, token, registry, admin, coordinator):
    deployed = JobMarket.deploy(token, registry, admin, MIN_STAKE, SLASH_BPS, PROOF_TIMEOUT, {"from": admin})
    registry.grantRole(MARKET_ROLE, deployed, {"from": admin})
    deployed.grantRole(COORDINATOR_ROLE, coordinator, {"from": admin})
    return deployed


# ------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def fund(token, admin):
    """Mint `amount` credits to `account` and approve `spender` for them."""

    def fund_(account, amount, spender=None):
        token.mint(account, amount, "test funding", {"from": admin})
        if spender is not None:
            token.approve(spender, amount, {"from": account})

    return fund_


@pytest.fixture(scope="module")
def register_machine(registry, fund):
    """Register a machine for `lender` with `stake` and the default spec (keywords override fields), and return its id."""

    def register_machine_(lender, stake=MIN_STAKE, **spec):
        if stake:
            fund(lender, stake, spender=registry)
        tx = registry.registerMachine(machine_spec(**spec), stake, {"from": lender})
        return tx.events["MachineRegistered"]["machineId"]

    return register_machine_


@pytest.fixture(scope="module")
def submit_job(market, fund):
    """Mint and approve a budget for `borrower`, submit a job with it, and return the job id."""

    def submit_job_(borrower, **request):
        full_request = job_request(**request)
        fund(borrower, full_request["budget"], spender=market)
        tx = market.submitJob(request_tuple(full_request), {"from": borrower})
        return tx.events["JobSubmitted"]["jobId"]

    return submit_job_


@pytest.fixture(scope="module")
def sign_order(market):
    """Sign a JobOrder with `borrower`'s key and return (order tuple, signature, EIP-712 digest).

    `chain_id` and `verifying_contract` override the domain, to produce signatures meant
    for another chain or contract.
    """

    def sign_order_(borrower, request, nonce=None, deadline=None, chain_id=None, verifying_contract=None):
        order = {
            "borrower": borrower.address,
            "request": request,
            "nonce": market.nonces(borrower) if nonce is None else nonce,
            "deadline": latest_timestamp() + ORDER_LIFETIME_S if deadline is None else deadline,
        }
        domain = eip712_domain(MARKET_DOMAIN_NAME, verifying_contract or market, chain_id)
        signature, digest = sign_typed_data(
            borrower.private_key,
            domain,
            "JobOrder",
            {"JobOrder": JOB_ORDER_TYPE, "JobRequest": JOB_REQUEST_TYPE},
            order,
        )
        return order_tuple(order), signature, digest

    return sign_order_


@pytest.fixture(scope="module")
def sign_receipt(market):
    """Sign a WorkReceipt with `signer`'s key and return (receipt tuple, signature, EIP-712 digest)."""

    def sign_receipt_(
        signer,
        job_id,
        machine_id,
        checkpoint_index,
        core_seconds,
        checkpoint_cid=None,
        steps=None,
        chain_id=None,
        verifying_contract=None,
    ):
        receipt = {
            "jobId": job_id,
            "machineId": machine_id,
            "checkpointIndex": checkpoint_index,
            "steps": 100 * checkpoint_index if steps is None else steps,
            "checkpointCid": checkpoint_cid or f"bafycheckpoint{job_id}x{checkpoint_index}",
            "coreSeconds": core_seconds,
        }
        domain = eip712_domain(MARKET_DOMAIN_NAME, verifying_contract or market, chain_id)
        signature, digest = sign_typed_data(
            signer.private_key, domain, "WorkReceipt", {"WorkReceipt": WORK_RECEIPT_TYPE}, receipt
        )
        return receipt_tuple(receipt), signature, digest

    return sign_receipt_


@pytest.fixture(scope="module")
def prove(market, sign_receipt, relayer):
    """Sign a receipt as `lender`, have the relayer record it, and return the transaction."""

    def prove_(lender, job_id, machine_id, checkpoint_index, core_seconds, checkpoint_cid=None, steps=None):
        receipt, signature, _ = sign_receipt(
            lender, job_id, machine_id, checkpoint_index, core_seconds, checkpoint_cid, steps
        )
        return market.recordProof(receipt, signature, {"from": relayer})

    return prove_


# ------------------------------------------------------------------ standing state


@pytest.fixture
def machine(register_machine, lender):
    """An always-available 8-core machine of `lender`, staked with exactly MIN_STAKE."""
    return register_machine(lender)


@pytest.fixture
def machine2(register_machine, lender2):
    return register_machine(lender2, endpoint="10.0.0.2:2222")


@pytest.fixture
def machine3(register_machine, lender3):
    return register_machine(lender3, endpoint="10.0.0.3:2222")


@pytest.fixture
def queued_job(submit_job, borrower):
    """A two-worker job of `borrower`, escrowed and waiting for assignment."""
    return submit_job(borrower)


@pytest.fixture
def running_job(market, queued_job, machine, machine2, coordinator):
    """`queued_job` assigned to `machine` (slot 0, the chief) and `machine2` (slot 1)."""
    market.assignJob(queued_job, [machine, machine2], "bafyclusterspec1", {"from": coordinator})
    return queued_job
