"""A job's history read back from a real local chain."""

import pytest

from deepmarket.chain.client import CREDIT, MarketClient, connect
from deepmarket.chain.node import DEV_MNEMONIC, LocalChain
from deepmarket.chain.typed_data import JobRequest
from deepmarket.chain.wallet import dev_account
from deepmarket.errors import ContractRevert
from deepmarket.market import operations
from deepmarket.market.history import job_history


@pytest.fixture(scope="module")
def client():
    with LocalChain(kind="ganache") as chain:
        admin = dev_account(DEV_MNEMONIC, 0)
        market = MarketClient.deploy(connect(chain.rpc_url), admin, coordinator=admin.address)
        market.mint(admin, dev_account(DEV_MNEMONIC, 2).address, 100 * CREDIT)
        yield market


def test_history_lists_submission_and_cancel(client):
    borrower = dev_account(DEV_MNEMONIC, 2)
    request = JobRequest("bafkreihistorytest", 5 * CREDIT, CREDIT, 1, 1, 1, client.latest_timestamp() + 3600)
    job_id = operations.submit_signed_job(client, borrower, borrower, request)
    client.cancel_job(borrower, job_id)

    lines = list(job_history(client, job_id))

    assert len(lines) == 2
    assert "JobSubmitted" in lines[0]
    assert "escrowed 5.000000 credits for 1 workers" in lines[0]
    assert "JobCancelled: refunded 5.000000 credits" in lines[1]


def test_history_of_unknown_job_raises(client):
    with pytest.raises(ContractRevert) as info:
        list(job_history(client, 999))
    assert info.value.name == "MarketJobNotFound"
