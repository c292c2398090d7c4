"""Helpers for the integration tests: job statuses, event queries, waits with daemon logs, and
a per-test handle that starts lenders and submits jobs on the shared local marketplace."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount

from deepmarket.bundles import upload_bundle
from deepmarket.chain.client import CREDIT, MarketClient
from deepmarket.chain.typed_data import JobRequest
from deepmarket.errors import ChainError, DeepMarketError
from deepmarket.localnet import LocalMarketplace
from deepmarket.market import operations
from deepmarket.storage.store import IpfsStore
from deepmarket.training import digits

logger = logging.getLogger(__name__)

# JobMarket.JobStatus and MachineRegistry.MachineStatus values.
JOB_QUEUED, JOB_RUNNING, JOB_COMPLETED, JOB_CANCELLED, JOB_FAILED, JOB_EXPIRED = 1, 2, 3, 4, 5, 6
MACHINE_ACTIVE, MACHINE_PAUSED = 1, 2
BPS = 10_000  # JobMarket.BPS: slashBps is in basis points

BUDGET = 100 * CREDIT
PRICE_PER_CORE_HOUR = "60"  # credits, so one core-minute costs one credit
MAX_PRICE_PER_CORE_HOUR = 100 * CREDIT
JOB_DEADLINE_S = 3600

# Waits are long because the machine running the tests may be shared and slow: a TensorFlow
# worker alone takes tens of seconds to import and form its cluster on two busy cores.
REGISTRATION_TIMEOUT_S = 180
JOB_TIMEOUT_S = 900
FIRST_PROOF_TIMEOUT_S = 600
LOG_LINES = 60

# Jobs that a test breaks mid-training. The fault is injected once the first checkpoint is
# proved, and training must still run then, so that the cluster notices the fault. With the
# demo's global batch of 32 an epoch is 40 steps. Two or three workers on two busy cores
# proved a checkpoint every 2 to 6 s in the runs measured, so the four epochs left take
# several seconds at least.
FAULT_EPOCHS = 5
FAULT_CONFIG = dataclasses.replace(digits.DEMO_CONFIG, epochs=FAULT_EPOCHS)

_lender_numbers = itertools.count(1)


@dataclass(frozen=True)
class Lender:
    """A lender daemon started by a test, with the machine it registered."""

    name: str
    account: LocalAccount
    machine_id: int


@dataclass
class MarketTest:
    """One test's view of the shared marketplace: the lenders it started and the jobs it submitted.

    :meth:`cleanup` ends any job the test left open and stops those lenders. It pauses their
    machines, so that later tests never get a machine whose daemon is gone, and withdraws the
    borrower's refunds, so that the next test can escrow a budget again.
    """

    net: LocalMarketplace
    lenders: list[Lender] = field(default_factory=list)
    job_ids: list[int] = field(default_factory=list)

    @property
    def client(self) -> MarketClient:
        return self.net.client

    @property
    def borrower(self) -> LocalAccount:
        return self.net.accounts["borrower"]

    def start_lenders(self, count: int, **options: Any) -> list[Lender]:
        """Start `count` lender daemons under new names and wait until each machine is registered."""
        return self.start_lenders_each([options] * count)

    def start_lenders_each(self, options_each: Sequence[dict[str, Any]]) -> list[Lender]:
        """Start one lender daemon per dict of :meth:`LocalMarketplace.start_lender` options and wait for all."""
        names = [f"lender{next(_lender_numbers)}" for _ in options_each]
        for name, options in zip(names, options_each, strict=True):
            self.net.start_lender(name, price=PRICE_PER_CORE_HOUR, **options)
        started: dict[str, int] = {}

        def all_registered() -> bool:
            for name in names:
                if name not in started:
                    machine_id = find_machine(self.client, self.net.accounts[name].address)
                    if machine_id is not None:
                        started[name] = machine_id
            return len(started) == len(names)

        wait_until(self.net, all_registered, REGISTRATION_TIMEOUT_S,
                   f"machines of {', '.join(names)} to register", names)
        lenders = [Lender(name, self.net.accounts[name], started[name]) for name in names]
        self.lenders.extend(lenders)
        return lenders

    def submit_job(self, bundle_cid: str, workers: int, budget: int = BUDGET, min_cores: int = 1,
                   deadline_s: int = JOB_DEADLINE_S) -> int:
        """Submit a signed order for `bundle_cid` as the borrower, who also relays it; return the job id.

        The job's deadline is `deadline_s` seconds after the latest block.
        """
        request = JobRequest(bundleCid=bundle_cid, budget=budget, maxPricePerCoreHour=MAX_PRICE_PER_CORE_HOUR,
                             workers=workers, minCores=min_cores, minMemoryMib=1024,
                             jobDeadline=self.client.latest_timestamp() + deadline_s)
        job_id = operations.submit_signed_job(self.client, self.borrower, self.borrower, request)
        self.job_ids.append(job_id)
        return job_id

    def daemon_names(self) -> list[str]:
        return ["coordinator", *(lender.name for lender in self.lenders)]

    def lender_of_machine(self, machine_id: int) -> Lender:
        return next(lender for lender in self.lenders if lender.machine_id == machine_id)

    def lender_in_slot(self, job_id: int, slot: int) -> Lender:
        """Return the lender whose machine is in `slot` of job `job_id` now."""
        return self.lender_of_machine(int(self.client.get_workers(job_id)[slot]["machine_id"]))

    def wait_for_assignment(self, job_id: int, timeout_s: float = FIRST_PROOF_TIMEOUT_S) -> None:
        wait_until(self.net, lambda: job_events(self.client, "JobAssigned", job_id) != [], timeout_s,
                   f"job {job_id} to be assigned", self.daemon_names())

    def wait_for_checkpoint(self, job_id: int, index: int, machine_id: int | None = None,
                            timeout_s: float = FIRST_PROOF_TIMEOUT_S) -> None:
        """Wait until machine `machine_id` (default: any) proved checkpoint `index` or a later one of job `job_id`.

        Polls every quarter second, so that a fault injected next lands while training runs.
        """
        def proved() -> bool:
            return any(p["checkpointIndex"] >= index and machine_id in (None, p["machineId"])
                       for p in job_events(self.client, "ProofRecorded", job_id))

        prover = "some machine" if machine_id is None else f"machine {machine_id}"
        wait_until(self.net, proved, timeout_s, f"{prover} to prove checkpoint {index} of job {job_id}",
                   self.daemon_names(), interval_s=0.25)

    def wait_for_status(self, job_id: int, status: int, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, Any]:
        """Wait until job `job_id` has `status`, and fail at once if it reaches another final status."""
        final = {JOB_COMPLETED, JOB_CANCELLED, JOB_FAILED, JOB_EXPIRED} - {status}
        job: dict[str, Any] = {}

        def reached() -> bool:
            job.update(self.client.get_job(job_id))
            if job["status"] in final:
                pytest.fail(f"job {job_id} ended with status {job['status']} while the test waited for "
                            f"{status}\n{log_tails(self.net, self.daemon_names())}")
            return bool(job["status"] == status)

        wait_until(self.net, reached, timeout_s, f"job {job_id} to reach status {status}",
                   self.daemon_names())
        return job

    def cleanup(self) -> None:
        for job_id in self.job_ids:
            self._end_job(job_id)
        for lender in self.lenders:
            self.net.stop_process(lender.name)
            if self.client.get_machine(lender.machine_id)["status"] == MACHINE_ACTIVE:
                pause = self.client.registry.functions.pauseMachine(lender.machine_id)
                self.client.transact(lender.account, pause)
        operations.claim_payout(self.client, self.borrower)

    def _end_job(self, job_id: int) -> None:
        """Cancel a job the test left queued or fail one it left running, so it takes no later machine."""
        status = self.client.get_job(job_id)["status"]
        try:
            if status == JOB_QUEUED:
                self.client.cancel_job(self.borrower, job_id)
            elif status == JOB_RUNNING:
                self.client.fail_job(self.net.accounts["coordinator"], job_id, "ended by the test teardown")
        except ChainError as exc:
            logger.warning("ending job %s after the test failed: %s", job_id, exc)


def find_machine(client: MarketClient, lender_address: str) -> int | None:
    """Return the id of the machine registered by `lender_address`, or None."""
    for machine_id in range(1, client.machine_count() + 1):
        if client.get_machine(machine_id)["lender"] == lender_address:
            return machine_id
    return None


def job_events(client: MarketClient, event_name: str, job_id: int) -> list[dict[str, Any]]:
    """Return the args of every `event_name` log of JobMarket for job `job_id`, in chain order."""
    return [dict(log["args"]) for log in job_logs(client, event_name, job_id)]


def job_logs(client: MarketClient, event_name: str, job_id: int) -> list[Any]:
    """Return every decoded `event_name` log of JobMarket for job `job_id`, with its block number."""
    return list(getattr(client.market.events, event_name)().get_logs(
        from_block=client.deployment.block, argument_filters={"jobId": job_id}))


def upload_digits_bundle(store: IpfsStore, demo_inputs: digits.DemoInputs,
                         config: Any = FAULT_CONFIG) -> str:
    """Upload the digits model and the lender dataset with `config`; return the bundle CID."""
    return upload_bundle(store, demo_inputs.model_path, demo_inputs.dataset_path, config)


def checkpoint_cids(proofs: Iterable[dict[str, Any]]) -> dict[int, set[str]]:
    """Map each proved checkpoint index to the set of CIDs proved for it (one, if all agree)."""
    found: dict[int, set[str]] = {}
    for proof in proofs:
        found.setdefault(int(proof["checkpointIndex"]), set()).add(str(proof["checkpointCid"]))
    return found


def machines_locked_by(client: MarketClient, job_id: int) -> list[int]:
    return [machine_id for machine_id in range(1, client.machine_count() + 1)
            if client.get_machine(machine_id)["locked_by"] == job_id]


def market_shortfall(client: MarketClient) -> int:
    """Return JobMarket's credit balance minus what it owes (escrow plus withdrawable), 0 when they match."""
    market = client.market.functions
    owed = int(market.totalEscrowed().call()) + int(market.totalWithdrawable().call())
    return client.balance_of(client.market.address) - owed


def wait_until(net: LocalMarketplace, condition: Callable[[], bool], timeout_s: float, what: str,
               log_names: Iterable[str] = ("coordinator",), interval_s: float = 1.0) -> None:
    """Poll `condition` every `interval_s`; on timeout or when a daemon exits, fail with the daemon logs."""
    names = list(log_names)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            net.check_alive()
        except DeepMarketError as exc:
            pytest.fail(f"{exc}\n{log_tails(net, names)}")
        if condition():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{log_tails(net, names)}")
        time.sleep(interval_s)


def log_tails(net: LocalMarketplace, names: Iterable[str]) -> str:
    """Return the last lines of each daemon's log and of the TensorFlow worker logs under its work dir."""
    parts = []
    for name in names:
        parts.append(f"--- {name}.log ---\n{net.log_tail(name, LOG_LINES)}")
        for worker_log in sorted((net.root / name).glob("job-*/round-*/worker.log")):
            tail = "\n".join(worker_log.read_text(errors="replace").splitlines()[-LOG_LINES:])
            parts.append(f"--- {worker_log.relative_to(net.root)} ---\n{tail}")
    return "\n".join(parts)


def coordinator_log(net: LocalMarketplace) -> str:
    return daemon_log(net, "coordinator")


def daemon_log(net: LocalMarketplace, name: str) -> str:
    """Return the whole log of daemon `name`, or an empty string before it wrote one."""
    path: Path = net.log_dir / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""
