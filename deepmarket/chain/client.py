"""Typed access to the deployed DeepMarket contracts over web3: deploy, send, read, decode errors.

Every state-changing call goes through :meth:`MarketClient.transact`, which signs locally
with the caller's key, waits for the receipt, records its gas, and turns a revert into a
:class:`~deepmarket.errors.ContractRevert` that names the values and the fix.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract.contract import Contract, ContractFunction
from web3.exceptions import ContractCustomError, ContractLogicError, Web3RPCError
from web3.logs import DISCARD
from web3.types import TxReceipt

from deepmarket.chain import artifacts
from deepmarket.chain.errors import decode_revert
from deepmarket.chain.typed_data import JobRequest, WorkReceipt
from deepmarket.errors import ChainError, ConfigError

logger = logging.getLogger(__name__)

CREDIT = 10**18  # base units per credit (18 decimals)
RECEIPT_TIMEOUT_S = 120
GAS_MARGIN = 1.25
DEFAULT_MIN_STAKE = 10 * CREDIT
DEFAULT_SLASH_BPS = 5_000
DEFAULT_PROOF_TIMEOUT_S = 600


@dataclass(frozen=True)
class Deployment:
    """Addresses of the three contracts on one chain."""

    chain_id: int
    token: str
    registry: str
    market: str
    block: int  # block of the first deployment transaction: event scans start here

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Deployment:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except FileNotFoundError as exc:
            raise ConfigError(f"deployment file {path} not found: deploy first with `deepmarket deploy` "
                              f"or `brownie run scripts/deploy.py`") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"deployment file {path} is invalid: {exc}") from exc


def connect(rpc_url: str, timeout_s: float = 10.0) -> Web3:
    """Return a Web3 connected to `rpc_url`; raise ChainError if no node responds there."""
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            w3.eth.chain_id  # noqa: B018 (a probe call)
            return w3
        except Exception as exc:  # requests raises several types; all mean "not reachable yet"
            if time.monotonic() > deadline:
                raise ChainError(f"no Ethereum JSON-RPC node responds at {_redact(rpc_url)}: start the chain "
                                 f"(`deepmarket chain start`) or fix the RPC setting ({type(exc).__name__})") from exc
            time.sleep(0.25)


def _redact(url: str) -> str:
    """Drop credentials and paths (API keys often hide there) from an RPC URL before logging it."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port}" if parts.port else f"{parts.scheme}://{parts.hostname}"


class GasMeter:
    """Gas used per contract call name, for reports and benchmarks."""

    def __init__(self) -> None:
        self.calls: dict[str, list[int]] = defaultdict(list)

    def record(self, name: str, gas_used: int) -> None:
        self.calls[name].append(gas_used)

    def total(self) -> int:
        return sum(sum(v) for v in self.calls.values())

    def summary(self) -> dict[str, dict[str, int]]:
        return {name: {"calls": len(v), "min": min(v), "max": max(v), "mean": sum(v) // len(v)}
                for name, v in sorted(self.calls.items())}


class MarketClient:
    """The token, registry and market contracts of one deployment, bound to a web3 connection."""

    def __init__(self, w3: Web3, deployment: Deployment, gas_meter: GasMeter | None = None) -> None:
        if w3.eth.chain_id != deployment.chain_id:
            raise ConfigError(f"the deployment is for chain id {deployment.chain_id} but the RPC node serves "
                              f"chain id {w3.eth.chain_id}: use the matching deployment file")
        self.w3 = w3
        self.deployment = deployment
        self.gas = gas_meter or GasMeter()
        # One sender at a time: concurrent threads of one account would race for the same nonce.
        self._send_lock = threading.Lock()
        self.token: Contract = w3.eth.contract(address=deployment.token, abi=artifacts.abi("CreditToken"))
        self.registry: Contract = w3.eth.contract(address=deployment.registry, abi=artifacts.abi("MachineRegistry"))
        self.market: Contract = w3.eth.contract(address=deployment.market, abi=artifacts.abi("JobMarket"))

    # ------------------------------------------------------------------ deployment

    @classmethod
    def deploy(cls, w3: Web3, admin: LocalAccount, coordinator: str | None = None,
               min_stake: int = DEFAULT_MIN_STAKE, slash_bps: int = DEFAULT_SLASH_BPS,
               proof_timeout_s: int = DEFAULT_PROOF_TIMEOUT_S, gas_meter: GasMeter | None = None) -> MarketClient:
        """Deploy the token, registry and market, wire their roles and return a client for them."""
        gas = gas_meter or GasMeter()
        first_block = w3.eth.block_number + 1
        token = _deploy(w3, admin, "CreditToken", [admin.address], gas)
        registry = _deploy(w3, admin, "MachineRegistry", [token, admin.address], gas)
        market = _deploy(w3, admin, "JobMarket",
                         [token, registry, admin.address, min_stake, slash_bps, proof_timeout_s], gas)
        client = cls(w3, Deployment(w3.eth.chain_id, token, registry, market, first_block), gas)
        client.transact(admin, client.registry.functions.grantRole(
            client.registry.functions.MARKET_ROLE().call(), market), "grantRole")
        if coordinator is not None:
            client.grant_coordinator(admin, coordinator)
        logger.info("contracts deployed on chain %s: token %s registry %s market %s",
                    w3.eth.chain_id, token, registry, market)
        return client

    def grant_coordinator(self, admin: LocalAccount, coordinator: str) -> None:
        role = self.market.functions.COORDINATOR_ROLE().call()
        self.transact(admin, self.market.functions.grantRole(role, coordinator), "grantRole")

    # ------------------------------------------------------------------ transactions

    def transact(self, account: LocalAccount, call: ContractFunction, name: str | None = None,
                 gas_limit: int | None = None) -> TxReceipt:
        """Sign and send `call` from `account`, wait for it to be mined and return its receipt.

        With `gas_limit` the transaction skips gas estimation, for calls whose outcome
        depends on the timestamp of the block that will include them.
        """
        label = name or call.fn_name
        with self._send_lock:
            return send_transaction(self.w3, account, call, label, self.gas, gas_limit=gas_limit)

    def read(self, call: ContractFunction) -> Any:
        """Run a view call, turning a revert into ContractRevert like :meth:`transact` does."""
        try:
            return call.call()
        except ContractCustomError as exc:
            raise _revert_error(exc.data, call.fn_name) from exc
        except ContractLogicError as exc:
            data = exc.data.get("result") if isinstance(exc.data, dict) else exc.data
            if isinstance(data, str) and decode_revert(data) is not None:
                raise _revert_error(data, call.fn_name) from exc
            raise ChainError(f"{call.fn_name} reverted: {exc.message or exc}") from exc

    def event(self, receipt: TxReceipt, contract: Contract, event_name: str) -> dict[str, Any]:
        """Return the args of the first `event_name` log in `receipt`."""
        logs = getattr(contract.events, event_name)().process_receipt(receipt, errors=DISCARD)
        if not logs:
            raise ChainError(f"transaction {receipt['transactionHash'].hex()} emitted no {event_name} event")
        return dict(logs[0]["args"])

    # ------------------------------------------------------------------ credits

    def mint(self, admin: LocalAccount, to: str, amount: int, reason: str = "onboarding") -> None:
        self.transact(admin, self.token.functions.mint(to, amount, reason))

    def approve(self, account: LocalAccount, spender: str, amount: int) -> None:
        self.transact(account, self.token.functions.approve(spender, amount))

    def balance_of(self, address: str) -> int:
        return int(self.token.functions.balanceOf(address).call())

    def withdrawable(self, address: str) -> int:
        return int(self.market.functions.withdrawable(address).call())

    def withdraw(self, account: LocalAccount) -> int:
        receipt = self.transact(account, self.market.functions.withdraw())
        return int(self.event(receipt, self.market, "Withdrawn")["amount"])

    # ------------------------------------------------------------------ machines

    def register_machine(self, lender: LocalAccount, spec: tuple[Any, ...], stake: int) -> int:
        """Register a machine (spec in MachineRegistry.MachineSpec order) and bond `stake`; returns its id."""
        if stake > 0:
            self.approve(lender, self.registry.address, stake)
        receipt = self.transact(lender, self.registry.functions.registerMachine(spec, stake))
        return int(self.event(receipt, self.registry, "MachineRegistered")["machineId"])

    def get_machine(self, machine_id: int) -> dict[str, Any]:
        lender, status, stake, locked_by, spec = self.read(self.registry.functions.getMachine(machine_id))
        cores, memory_mib, gpus, score, price, mask, endpoint = spec
        return {"machine_id": machine_id, "lender": lender, "status": status, "stake": stake,
                "locked_by": locked_by, "cores": cores, "memory_mib": memory_mib, "gpus": gpus,
                "benchmark_score": score, "price_per_core_hour": price, "availability_mask": mask,
                "endpoint": endpoint}

    def machine_count(self) -> int:
        return int(self.registry.functions.machineCount().call())

    # ------------------------------------------------------------------ jobs

    def submit_job(self, borrower: LocalAccount, request: JobRequest) -> int:
        self.approve(borrower, self.market.address, request.budget)
        receipt = self.transact(borrower, self.market.functions.submitJob(request.as_tuple()))
        return int(self.event(receipt, self.market, "JobSubmitted")["jobId"])

    def submit_signed_order(self, relayer: LocalAccount, borrower: str, request: JobRequest, nonce: int,
                            deadline: int, signature: bytes) -> int:
        """Relay a borrower-signed order; the borrower must have approved the budget to the market."""
        order = (borrower, request.as_tuple(), nonce, deadline)
        receipt = self.transact(relayer, self.market.functions.submitJobWithSignature(order, signature))
        return int(self.event(receipt, self.market, "JobSubmitted")["jobId"])

    def order_nonce(self, borrower: str) -> int:
        return int(self.market.functions.nonces(borrower).call())

    def get_job(self, job_id: int) -> dict[str, Any]:
        fields = ("borrower", "status", "workers", "round", "min_cores", "min_memory_mib", "deadline",
                  "last_progress_at", "budget", "escrow", "paid", "max_price_per_core_hour", "bundle_cid",
                  "cluster_spec_cid", "result_cid")
        values = self.read(self.market.functions.getJob(job_id))
        return {"job_id": job_id, **dict(zip(fields, values, strict=True))}

    def get_workers(self, job_id: int) -> list[dict[str, Any]]:
        fields = ("machine_id", "lender", "price_per_core_hour", "cores", "since", "active")
        return [dict(zip(fields, w, strict=True)) for w in self.market.functions.getWorkers(job_id).call()]

    def job_count(self) -> int:
        return int(self.market.functions.jobCount().call())

    def assign_job(self, coordinator: LocalAccount, job_id: int, machine_ids: list[int], cluster_spec_cid: str) -> None:
        self.transact(coordinator, self.market.functions.assignJob(job_id, machine_ids, cluster_spec_cid))

    def record_proof(self, sender: LocalAccount, receipt: WorkReceipt, signature: bytes,
                     gas_limit: int | None = None) -> int:
        """Record a signed work receipt; returns the payment credited to the lender."""
        tx = self.transact(sender, self.market.functions.recordProof(receipt.as_tuple(), signature),
                           gas_limit=gas_limit)
        return int(self.event(tx, self.market, "ProofRecorded")["payment"])

    def complete_job(self, coordinator: LocalAccount, job_id: int, result_cid: str) -> dict[str, Any]:
        tx = self.transact(coordinator, self.market.functions.completeJob(job_id, result_cid))
        return self.event(tx, self.market, "JobCompleted")

    def fail_job(self, coordinator: LocalAccount, job_id: int, reason: str) -> dict[str, Any]:
        tx = self.transact(coordinator, self.market.functions.failJob(job_id, reason))
        return self.event(tx, self.market, "JobFailed")

    def cancel_job(self, borrower: LocalAccount, job_id: int) -> int:
        tx = self.transact(borrower, self.market.functions.cancelJob(job_id))
        return int(self.event(tx, self.market, "JobCancelled")["refund"])

    def expire_job(self, sender: LocalAccount, job_id: int, gas_limit: int | None = None) -> dict[str, Any]:
        tx = self.transact(sender, self.market.functions.expireJob(job_id), gas_limit=gas_limit)
        return self.event(tx, self.market, "JobExpired")

    def report_fault(self, coordinator: LocalAccount, job_id: int, machine_id: int) -> int:
        tx = self.transact(coordinator, self.market.functions.reportFault(job_id, machine_id))
        return int(self.event(tx, self.market, "WorkerFaulted")["slashed"])

    def replace_worker(self, coordinator: LocalAccount, job_id: int, slot: int, machine_id: int,
                       cluster_spec_cid: str) -> None:
        self.transact(coordinator, self.market.functions.replaceWorker(job_id, slot, machine_id, cluster_spec_cid))

    def report_ready(self, lender: LocalAccount, job_id: int, machine_id: int) -> None:
        self.transact(lender, self.market.functions.reportReady(job_id, machine_id))

    def report_stopped(self, lender: LocalAccount, job_id: int, machine_id: int) -> None:
        self.transact(lender, self.market.functions.reportStopped(job_id, machine_id))

    def restart_cluster(self, coordinator: LocalAccount, job_id: int, cluster_spec_cid: str) -> None:
        self.transact(coordinator, self.market.functions.restartCluster(job_id, cluster_spec_cid))

    def leave_job(self, lender: LocalAccount, job_id: int, machine_id: int) -> None:
        self.transact(lender, self.market.functions.leaveJob(job_id, machine_id))

    def latest_timestamp(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def tracked_balances(self, addresses: dict[str, str]) -> dict[str, int]:
        """Credit balances of named accounts plus the market and registry contracts (base units)."""
        named = dict(addresses)
        named["JobMarket"] = self.market.address
        named["MachineRegistry"] = self.registry.address
        return {name: self.balance_of(addr) for name, addr in named.items()}


def send_transaction(w3: Web3, account: LocalAccount, call: ContractFunction | None, label: str,
                     gas: GasMeter | None = None, deploy_data: str | None = None,
                     gas_limit: int | None = None) -> TxReceipt:
    """Build, sign and send one transaction; decode reverts into ContractRevert."""
    params: dict[str, Any] = {"from": account.address, "nonce": w3.eth.get_transaction_count(account.address, "pending"),
                              "chainId": w3.eth.chain_id}
    if gas_limit is not None:
        params["gas"] = gas_limit
    try:
        if call is not None:
            tx = call.build_transaction(params)
        else:
            tx = {**params, "data": deploy_data}
            tx["gas"] = w3.eth.estimate_gas(tx)
            tx.update(_fee_fields(w3))
    except ContractCustomError as exc:
        raise _revert_error(exc.data, label) from exc
    except ContractLogicError as exc:
        # Ganache reports custom errors as a plain revert with the data under "result".
        data = exc.data.get("result") if isinstance(exc.data, dict) else exc.data
        if isinstance(data, str) and decode_revert(data) is not None:
            raise _revert_error(data, label) from exc
        raise ChainError(f"{label} reverted: {exc.message or exc}") from exc
    except Web3RPCError as exc:
        raise ChainError(f"{label} was rejected by the node: {exc}") from exc
    # Ganache's estimate runs against the latest block and comes out short for some calls
    # (seen with recordProof), so every transaction gets a margin, as brownie's gas_buffer does.
    if gas_limit is None:
        tx["gas"] = int(tx["gas"] * GAS_MARGIN) + 10_000
    signed = account.sign_transaction(tx)
    try:
        tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_S)
    except Web3RPCError as exc:
        raise ChainError(f"{label} was rejected by the node: {exc}") from exc
    if receipt["status"] != 1:
        raise ChainError(f"{label} failed in block {receipt['blockNumber']} (tx {tx_hash.hex()})")
    if gas is not None:
        gas.record(label, int(receipt["gasUsed"]))
    logger.debug("%s mined in block %s, gas %s", label, receipt["blockNumber"], receipt["gasUsed"])
    return receipt


def _fee_fields(w3: Web3) -> dict[str, int]:
    base_fee = int(w3.eth.get_block("latest").get("baseFeePerGas", 0))
    tip = 10**9
    return {"maxPriorityFeePerGas": tip, "maxFeePerGas": 2 * base_fee + tip}


def _revert_error(data: Any, label: str) -> Exception:
    decoded = decode_revert(data) if isinstance(data, str | bytes) else None
    if decoded is None:
        return ChainError(f"{label} reverted with unknown data {data!r}")
    decoded.args = (f"{label} reverted: {decoded.args[0]}",)
    return decoded


def _deploy(w3: Web3, admin: LocalAccount, name: str, args: list[Any], gas: GasMeter) -> str:
    factory = w3.eth.contract(abi=artifacts.abi(name), bytecode=artifacts.bytecode(name))
    data = factory.constructor(*args).data_in_transaction
    receipt = send_transaction(w3, admin, None, f"deploy {name}", gas, deploy_data=data)
    return str(receipt["contractAddress"])
