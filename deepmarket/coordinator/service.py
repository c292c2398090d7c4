"""The coordinator: turns contract events into cluster assignments and settles finished jobs.

Each :meth:`Coordinator.step` handles new events, then schedules queued jobs, then
supervises running ones. The chain is the source of truth: every action re-reads the job
on chain first, so a restart (or a second step after a crash between a transaction and its
event) never assigns, faults or completes a job twice.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount

from deepmarket.chain.client import MarketClient
from deepmarket.chain.events import ChainEvent, EventTailer, open_state_db
from deepmarket.coordinator import state
from deepmarket.errors import BundleError, ChainError, ContractRevert, StorageError
from deepmarket.market.matching import JobNeeds, fair_share_order, rejection_reason, select_machines
from deepmarket.storage.store import IpfsStore

logger = logging.getLogger(__name__)

JOB_QUEUED, JOB_RUNNING = 1, 2
CLUSTER_FORMAT = "deepmarket-cluster/1"
# expireJob slashes and releases each worker. NOTE: 100k per worker is an estimate (a slash
# and a release are two external calls with a few storage writes), not a measurement.
EXPIRE_GAS_BASE, EXPIRE_GAS_PER_WORKER = 200_000, 100_000
RESULT_FORMAT = "deepmarket-result/1"
EVENTS = ("JobSubmitted", "JobAssigned", "WorkerReady", "WorkerStopped", "ProofRecorded", "WorkerFaulted", "WorkerLeft",
          "JobCompleted", "JobCancelled", "JobFailed", "JobExpired")
TERMINAL = {"JobCompleted": "completed", "JobCancelled": "cancelled", "JobFailed": "failed", "JobExpired": "expired"}


@dataclass
class CoordinatorConfig:
    state_path: Path
    poll_interval_s: float = 1.0
    # A worker that has not reported ready this long after its (re)assignment is faulted.
    # Launch to first step takes ~10 s for four TF workers on two cores, so 120 s is generous.
    formation_timeout_s: int = 120
    # After the chief proves the last checkpoint, wait this long for the other workers' receipts.
    completion_grace_s: int = 60
    # A bundle that cannot be fetched this many times in a row fails its job.
    fetch_attempts: int = 3
    # After the first worker of a round reports that it stopped, wait this long for the
    # others: the worker that stays silent is the lost one. TF fails the surviving workers
    # of a killed peer within ~7 s, and of a hung one within ~10 s (its heartbeat timeout).
    loss_grace_s: int = 12
    # A job whose cluster is restarted more often than this fails (and refunds the rest).
    max_restarts: int = 5
    work_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "deepmarket-coordinator")


class Coordinator:
    """Schedules and settles jobs for one deployment, signing as the account holding COORDINATOR_ROLE."""

    def __init__(self, client: MarketClient, account: LocalAccount, store: Any, config: CoordinatorConfig) -> None:
        self.client = client
        self.account = account
        self.store = store
        self.config = config
        self.db: sqlite3.Connection = open_state_db(config.state_path)
        state.init_schema(self.db)
        self.tailer = EventTailer(client, self.db, "coordinator", EVENTS)
        self._fetch_failures: dict[int, int] = {}
        # One bundle check at a time, on its own IPFS connection (ipfshttpclient sessions are not thread-safe).
        self._validator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bundle-check")
        self._validations: dict[int, Future[Any]] = {}
        self._validation_store = IpfsStore(store.api_addr) if isinstance(store, IpfsStore) else store
        # Import TensorFlow now, off the loop, so the first job's bundle check does not pay for it.
        self._validator.submit(_import_tensorflow)
        self._unmatched_logged: set[int] = set()
        self._refill_logged: set[tuple[int, int]] = set()

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event) -> None:
        """Step until `stop` is set; chain or IPFS outages are retried with backoff, not fatal."""
        logger.info("coordinator started: account %s market %s", self.account.address, self.client.market.address)
        backoff = self.config.poll_interval_s
        while not stop.is_set():
            try:
                self.step()
                backoff = self.config.poll_interval_s
            except (ChainError, StorageError, ConnectionError, OSError) as exc:
                backoff = min(backoff * 2, 30.0)
                logger.warning("coordinator step failed, retrying in %.0f s: %s", backoff, exc)
            stop.wait(backoff)
        logger.info("coordinator stopped")

    def step(self) -> None:
        self.tailer.poll(self._on_event)
        self._schedule_queued()
        self._supervise_running()

    @contextlib.contextmanager
    def _isolated(self, action: str, job_id: int) -> Iterator[None]:
        """Keep one job's failure from stopping the others; chain and IPFS outages still propagate."""
        try:
            yield
        except ContractRevert as exc:
            logger.warning("%s job %s: transaction rejected, retrying next step: %s", action, job_id, exc)
        except (ChainError, StorageError, OSError):
            raise
        except Exception:
            logger.exception("%s job %s failed; retrying next step", action, job_id)

    def _now(self) -> int:
        """Unix time for timeouts: the wall clock, or the latest block if the chain runs ahead.

        The latest block alone would freeze time on a chain that mines only when a
        transaction arrives, exactly when a stalled job sends none.
        """
        return max(self.client.latest_timestamp(), int(time.time()))

    # ------------------------------------------------------------------ events

    def _on_event(self, event: ChainEvent, db: sqlite3.Connection) -> None:
        args = event.args
        if event.name == "JobSubmitted":
            db.execute("INSERT OR IGNORE INTO job (job_id, borrower, bundle_cid, workers, status) VALUES (?, ?, ?, ?, ?)",
                       (args["jobId"], args["borrower"], args["bundleCid"], args["workers"], "queued"))
            logger.info("job submitted: job %s borrower %s workers %s bundle %s", args["jobId"], args["borrower"],
                        args["workers"], args["bundleCid"])
        elif event.name == "JobAssigned":
            timestamp = int(self.client.w3.eth.get_block(event.block)["timestamp"])
            db.execute("UPDATE job SET status = 'running', round = ?, cluster_spec_cid = ?, assigned_at = ? "
                       "WHERE job_id = ?", (args["round"], args["clusterSpecCid"], timestamp, args["jobId"]))
            for slot, machine_id in enumerate(args["machineIds"]):
                db.execute("INSERT OR IGNORE INTO job_worker (job_id, round, slot, machine_id) VALUES (?, ?, ?, ?)",
                           (args["jobId"], args["round"], slot, machine_id))
            logger.info("cluster assembled: job %s round %s machines %s spec %s", args["jobId"], args["round"],
                        list(args["machineIds"]), args["clusterSpecCid"])
        elif event.name == "WorkerReady":
            db.execute("UPDATE job_worker SET ready = 1 WHERE job_id = ? AND round = ? AND machine_id = ?",
                       (args["jobId"], args["round"], args["machineId"]))
            logger.info("worker ready: job %s round %s machine %s", args["jobId"], args["round"], args["machineId"])
        elif event.name == "WorkerStopped":
            timestamp = int(self.client.w3.eth.get_block(event.block)["timestamp"])
            db.execute("INSERT OR IGNORE INTO stopped_worker VALUES (?, ?, ?, ?)",
                       (args["jobId"], args["round"], args["machineId"], timestamp))
            logger.info("worker stopped: job %s round %s machine %s", args["jobId"], args["round"], args["machineId"])
        elif event.name == "ProofRecorded":
            db.execute("INSERT OR IGNORE INTO proof VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (args["jobId"], args["machineId"], args["checkpointIndex"], args["checkpointCid"],
                        args["steps"], str(args["payment"]), event.block))
            logger.info("proof recorded: job %s machine %s checkpoint %s payment %s", args["jobId"],
                        args["machineId"], args["checkpointIndex"], args["payment"])
        elif event.name in ("WorkerFaulted", "WorkerLeft"):
            logger.info("%s: job %s machine %s", "worker lost" if event.name == "WorkerFaulted" else "worker left",
                        args["jobId"], args["machineId"])
        elif event.name in TERMINAL:
            db.execute("UPDATE job SET status = ? WHERE job_id = ?", (TERMINAL[event.name], args["jobId"]))
            logger.info("job %s: job %s", TERMINAL[event.name], args["jobId"])

    # ------------------------------------------------------------------ scheduling

    def _schedule_queued(self) -> None:
        queued = state.jobs_with_status(self.db, "queued")
        if not queued:
            return
        needs = {}
        for row in queued:
            job = self.client.get_job(row.job_id)
            if job["status"] != JOB_QUEUED:
                continue  # its event is on the way
            if self._now() > job["deadline"]:
                self._expire(row.job_id, 0)
                continue
            needs[row.job_id] = JobNeeds(row.job_id, job["borrower"], job["workers"], job["min_cores"],
                                         job["min_memory_mib"], job["max_price_per_core_hour"])
        market = self.client.market.functions
        lent = {n.borrower: market.lentCoreSeconds(n.borrower).call() for n in needs.values()}
        borrowed = {n.borrower: market.borrowedCoreSeconds(n.borrower).call() for n in needs.values()}
        for job_needs in fair_share_order(needs.values(), lent, borrowed):
            row = state.get_job(self.db, job_needs.job_id)
            if row is not None:
                with self._isolated("scheduling", row.job_id):
                    self._schedule_job(row, job_needs)

    def _schedule_job(self, row: state.JobRow, needs: JobNeeds) -> None:
        if row.epochs is None:
            epochs = self._check_bundle(row)
            if epochs is None:
                return
        machines = [self.client.get_machine(i) for i in range(1, self.client.machine_count() + 1)]
        now = self._now()
        min_stake = int(self.client.market.functions.minStake().call())
        chosen = select_machines(needs, machines, now, min_stake)
        if chosen is None:
            if row.job_id not in self._unmatched_logged:
                reasons = {m["machine_id"]: rejection_reason(m, needs, now, min_stake) for m in machines}
                logger.info("job %s waits: no %s machines qualify now (%s)", row.job_id, needs.workers,
                            ", ".join(f"machine {k}: {v or 'eligible'}" for k, v in reasons.items()) or "none registered")
                self._unmatched_logged.add(row.job_id)
            return
        self._unmatched_logged.discard(row.job_id)
        spec = self._cluster_spec(row, chosen, round_=1, resume=None)
        spec_cid = self.store.add_json(spec)
        try:
            self.client.assign_job(self.account, row.job_id, chosen, spec_cid)
        except ContractRevert as exc:
            logger.warning("assignment of job %s to machines %s rejected, retrying later: %s", row.job_id, chosen, exc)

    def _check_bundle(self, row: state.JobRow) -> int | None:
        """Fetch and validate a queued job's bundle in the background; fail the job if it is invalid.

        Returns the bundle's epochs once it is valid, None while the check runs or after a
        failure. Fetching waits up to the store's resolve timeout per attempt, so it runs
        beside the loop instead of holding up every other job.
        """
        future = self._validations.get(row.job_id)
        if future is None:
            from deepmarket import bundles  # validation imports TensorFlow lazily

            self._validations[row.job_id] = self._validator.submit(
                bundles.fetch_and_validate, self._validation_store, row.bundle_cid,
                self.config.work_dir / f"job-{row.job_id}")
            return None
        if not future.done():
            return None
        del self._validations[row.job_id]
        try:
            manifest = future.result()
        except BundleError as exc:
            self._fail(row.job_id, f"invalid bundle: {exc}")
            return None
        except StorageError as exc:
            failures = self._fetch_failures.get(row.job_id, 0) + 1
            self._fetch_failures[row.job_id] = failures
            if failures >= self.config.fetch_attempts:
                self._fail(row.job_id, f"bundle {row.bundle_cid} could not be fetched after {failures} attempts: {exc}")
            else:
                logger.warning("bundle of job %s not fetched (attempt %s of %s): %s", row.job_id, failures,
                               self.config.fetch_attempts, exc)
            return None
        epochs = int(manifest.config.epochs)
        self.db.execute("UPDATE job SET epochs = ? WHERE job_id = ?", (epochs, row.job_id))
        logger.info("bundle valid: job %s bundle %s epochs %s", row.job_id, row.bundle_cid, epochs)
        return epochs

    def _cluster_spec(self, row: state.JobRow, machine_ids: list[int], round_: int,
                      resume: dict[str, Any] | None) -> dict[str, Any]:
        workers = []
        for slot, machine_id in enumerate(machine_ids):
            machine = self.client.get_machine(machine_id)
            workers.append({"slot": slot, "machine_id": machine_id, "endpoint": machine["endpoint"],
                            "cores": machine["cores"]})
        return {"format": CLUSTER_FORMAT, "job_id": row.job_id, "round": round_, "run_id": uuid.uuid4().hex,
                "bundle_cid": row.bundle_cid, "workers": workers, "resume": resume, "created_at": int(time.time())}

    # ------------------------------------------------------------------ supervision

    def _supervise_running(self) -> None:
        proof_timeout = int(self.client.market.functions.proofTimeout().call())
        for row in state.jobs_with_status(self.db, "running"):
            job = self.client.get_job(row.job_id)
            if job["status"] != JOB_RUNNING:
                continue
            now = self._now()
            workers = self.client.get_workers(row.job_id)
            vacant = any(not w["active"] for w in workers)
            if now > job["deadline"] or (not vacant and now > job["last_progress_at"] + proof_timeout):
                self._expire(row.job_id, len(workers))
                continue
            with self._isolated("supervising", row.job_id):
                if self._try_complete(row, job, now):
                    continue
                self._check_formation(row, job, now)
                self._check_lost(row, job, now)
                self._refill(row, self.client.get_job(row.job_id))

    def _check_formation(self, row: state.JobRow, job: dict[str, Any], now: int) -> None:
        """Fault the workers of the current round that did not report ready in time."""
        workers = state.round_workers(self.db, row.job_id, job["round"])
        silent = [machine_id for _slot, machine_id, ready in workers if not ready]
        if not silent or row.assigned_at is None or now < row.assigned_at + self.config.formation_timeout_s:
            return
        active = {w["machine_id"] for w in self.client.get_workers(row.job_id) if w["active"]}
        for machine_id in silent:
            if machine_id in active:
                logger.warning("worker lost: job %s machine %s did not report ready within %s s of round %s",
                               row.job_id, machine_id, self.config.formation_timeout_s, job["round"])
                self.client.report_fault(self.account, row.job_id, machine_id)

    def _check_lost(self, row: state.JobRow, job: dict[str, Any], now: int) -> None:
        """After workers report that their cluster broke, fault the silent ones or restart everyone."""
        stopped = state.stopped_workers(self.db, row.job_id, job["round"])
        if not stopped:
            return
        workers = self.client.get_workers(row.job_id)
        active = [w["machine_id"] for w in workers if w["active"]]
        silent = [m for m in active if m not in stopped]
        first_report = min(stopped.values())
        if silent and now < first_report + self.config.loss_grace_s:
            return  # the other workers may still be reporting
        if job["round"] > self.config.max_restarts:
            self._fail(row.job_id, f"cluster restarted {job['round'] - 1} times without finishing")
            return
        if silent:
            for machine_id in silent:
                logger.warning("worker lost: job %s round %s machine %s stayed silent %s s after its peers "
                               "reported the cluster broken", row.job_id, job["round"], machine_id, now - first_report)
                self.client.report_fault(self.account, row.job_id, machine_id)
            return  # _refill puts replacements in and starts the next round
        if len(active) < len(workers):
            # A worker left or was faulted in this round. restartCluster rejects a cluster
            # with an empty slot, so the restart is _refill's replaceWorker.
            return
        spec = self._cluster_spec(row, active, round_=job["round"] + 1, resume=self._resume_point(row.job_id))
        self.client.restart_cluster(self.account, row.job_id, self.store.add_json(spec))
        logger.info("cluster restarted: job %s round %s on the same machines %s", row.job_id, job["round"] + 1, active)

    def _refill(self, row: state.JobRow, job: dict[str, Any]) -> None:
        """Put a replacement machine into every empty slot of a running job, if any qualifies."""
        workers = self.client.get_workers(row.job_id)
        empty = [slot for slot, w in enumerate(workers) if not w["active"]]
        if not empty:
            return
        needs = JobNeeds(row.job_id, job["borrower"], job["workers"], job["min_cores"], job["min_memory_mib"],
                         job["max_price_per_core_hour"])
        machines = [self.client.get_machine(i) for i in range(1, self.client.machine_count() + 1)]
        now = self._now()
        min_stake = int(self.client.market.functions.minStake().call())
        used = [w["machine_id"] for w in workers]
        replacements = select_machines(needs, machines, now, min_stake, count=len(empty), exclude=used)
        if replacements is None:
            key = (row.job_id, job["round"])
            if key not in self._refill_logged:
                self._refill_logged.add(key)
                logger.warning("job %s has %s empty slots and no replacement machine; it waits until one frees up "
                               "or its deadline passes", row.job_id, len(empty))
            return
        ids = [w["machine_id"] for w in workers]
        for slot, machine_id in zip(empty, replacements, strict=True):
            ids[slot] = machine_id
        resume = self._resume_point(row.job_id)
        round_ = job["round"]
        for slot, machine_id in zip(empty, replacements, strict=True):
            round_ += 1
            spec = self._cluster_spec(row, ids, round_=round_, resume=resume)
            self.client.replace_worker(self.account, row.job_id, slot, machine_id, self.store.add_json(spec))
            logger.info("worker replaced: job %s slot %s machine %s round %s", row.job_id, slot, machine_id, round_)

    def _resume_point(self, job_id: int) -> dict[str, Any] | None:
        """Return the resume point of a restarted cluster: the highest checkpoint proved so far, if any."""
        last = state.last_checkpoint(self.db, job_id)
        if last is None:
            return None
        return {"epoch": last[0], "checkpoint_cid": last[1]}

    def _try_complete(self, row: state.JobRow, job: dict[str, Any], now: int) -> bool:
        if row.epochs is None:
            return False
        final = state.proofs_at(self.db, row.job_id, row.epochs)
        workers = self.client.get_workers(row.job_id)
        chief = workers[0]["machine_id"]
        if chief not in final:
            return False
        active = [w["machine_id"] for w in workers if w["active"]]
        proved_block = self.db.execute("SELECT block FROM proof WHERE job_id = ? AND machine_id = ? AND "
                                       "checkpoint_index = ?", (row.job_id, chief, row.epochs)).fetchone()[0]
        proved_at = int(self.client.w3.eth.get_block(proved_block)["timestamp"])
        if not all(m in final for m in active) and now < proved_at + self.config.completion_grace_s:
            return True  # still waiting for the other workers' final receipts
        checkpoint = self.store.get_json(final[chief])
        bundle = self.store.get_json(row.bundle_cid)
        result = {"format": RESULT_FORMAT, "job_id": row.job_id, "model_cid": bundle["model_cid"],
                  "weights_cid": checkpoint["weights_cid"], "epochs": row.epochs, "steps": checkpoint.get("steps"),
                  "metrics": checkpoint.get("metrics", {}), "checkpoint_cids": state.checkpoint_cids(self.db, row.job_id)}
        result_cid = self.store.add_json(result)
        try:
            settled = self.client.complete_job(self.account, row.job_id, result_cid)
        except ContractRevert as exc:
            logger.warning("completing job %s failed: %s", row.job_id, exc)
            return True
        logger.info("job completed: job %s result %s paid %s refund %s", row.job_id, result_cid, settled["paid"],
                    settled["refund"])
        return True

    def _expire(self, job_id: int, worker_count: int) -> None:
        try:
            # A fixed gas limit: estimating against the latest, possibly older, block would
            # reject an expiry that the block including it accepts.
            expired = self.client.expire_job(self.account, job_id, gas_limit=EXPIRE_GAS_BASE + EXPIRE_GAS_PER_WORKER * worker_count)
            logger.info("job expired: job %s refund %s slashed %s", job_id, expired["refund"], expired["slashed"])
        except (ContractRevert, ChainError) as exc:
            logger.warning("expiring job %s failed: %s", job_id, exc)

    def _fail(self, job_id: int, reason: str) -> None:
        logger.warning("job failed: job %s: %s", job_id, reason)
        try:
            self.client.fail_job(self.account, job_id, reason[:500])
        except ContractRevert as exc:
            logger.warning("failing job %s was rejected: %s", job_id, exc)


def _import_tensorflow() -> None:
    from deepmarket.training.bundle import import_tf_keras

    import_tf_keras()
