"""Marketplace operations shared by the CLI, the brownie scripts and the HTTP API.

Each function takes a connected :class:`~deepmarket.chain.client.MarketClient` (or a Web3
for deployment) and the acting account, so callers only differ in how they get those.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from web3 import Web3

from deepmarket.chain.client import CREDIT, Deployment, MarketClient
from deepmarket.chain.errors import JOB_STATUS_NAMES
from deepmarket.chain.typed_data import JobRequest, job_order_message, sign_typed
from deepmarket.errors import ContractRevert
from deepmarket.market.machines import MachineSpec

logger = logging.getLogger(__name__)

MACHINE_STATUS_NAMES = ("None", "Active", "Paused", "Retired")
ORDER_VALIDITY_S = 600  # how long a signed order may wait for its relayer


def deploy(w3: Web3, admin: LocalAccount, coordinator: str, deployment_file: Path, **parameters: Any) -> MarketClient:
    """Deploy the contracts, grant the coordinator role and write the deployment file."""
    client = MarketClient.deploy(w3, admin, coordinator=coordinator, **parameters)
    client.deployment.save(deployment_file)
    logger.info("deployment written to %s", deployment_file)
    return client


def open_client(w3: Web3, deployment_file: Path) -> MarketClient:
    return MarketClient(w3, Deployment.load(deployment_file))


def register_machine(client: MarketClient, lender: LocalAccount, spec: MachineSpec, stake: int) -> int:
    """Register `spec` for `lender`, bonding `stake`; returns the machine id."""
    machine_id = client.register_machine(lender, spec.as_tuple(), stake)
    logger.info("machine registered: machine %s lender %s cores %s price %s", machine_id, lender.address,
                spec.cores, spec.price_per_core_hour)
    return machine_id


def submit_signed_job(client: MarketClient, borrower: LocalAccount, relayer: LocalAccount,
                      request: JobRequest) -> int:
    """Approve the budget, sign the order as `borrower` and relay it from `relayer`; returns the job id."""
    nonce = client.order_nonce(borrower.address)
    deadline = client.latest_timestamp() + ORDER_VALIDITY_S
    message = job_order_message(borrower.address, request, nonce, deadline, client.deployment.chain_id,
                                client.market.address)
    signature = sign_typed(borrower, message)
    client.approve(borrower, client.market.address, request.budget)
    job_id = client.submit_signed_order(relayer, borrower.address, request, nonce, deadline, signature)
    logger.info("job submitted: job %s borrower %s budget %s bundle %s", job_id, borrower.address,
                request.budget, request.bundleCid)
    return job_id


def claim_payout(client: MarketClient, account: LocalAccount) -> int:
    """Withdraw everything credited to `account`; returns the amount (0 if nothing was due)."""
    if client.withdrawable(account.address) == 0:
        return 0
    try:
        amount = client.withdraw(account)
    except ContractRevert as exc:
        if exc.name == "MarketNothingToWithdraw":
            return 0
        raise
    logger.info("payout claimed: account %s amount %s", account.address, amount)
    return amount


def market_status(client: MarketClient, accounts: dict[str, str] | None = None) -> dict[str, Any]:
    """Return the state of every machine and job plus the credits of `accounts`."""
    machines = []
    for machine_id in range(1, client.machine_count() + 1):
        machine = client.get_machine(machine_id)
        machine["status"] = MACHINE_STATUS_NAMES[machine["status"]]
        machines.append(machine)
    jobs = []
    for job_id in range(1, client.job_count() + 1):
        job = client.get_job(job_id)
        job["status"] = JOB_STATUS_NAMES[job["status"]]
        jobs.append(job)
    balances = {}
    for name, address in (accounts or {}).items():
        balances[name] = {"balance": client.balance_of(address), "withdrawable": client.withdrawable(address)}
    return {
        "chain_id": client.deployment.chain_id,
        "contracts": {"token": client.token.address, "registry": client.registry.address,
                      "market": client.market.address},
        "escrowed": client.market.functions.totalEscrowed().call(),
        "withdrawable": client.market.functions.totalWithdrawable().call(),
        "staked": client.registry.functions.totalStaked().call(),
        "machines": machines,
        "jobs": jobs,
        "accounts": balances,
    }


def format_credits(amount: int) -> str:
    return f"{amount / CREDIT:,.6f}"

