"""The lender daemon: registers a machine, runs the TF workers it is assigned, proves each
checkpoint with a signed work receipt and claims its payouts.

An assignment is a ``JobAssigned`` event that names this machine, for the job's current
round. For each one the daemon fetches the cluster spec and the bundle from IPFS (CIDs
verified) and checks the availability window. It then launches the worker under resource
limits, reports ready on chain, and submits a receipt for every finished epoch.

The chief (slot 0) pins its weights and a checkpoint manifest. Every other worker computes
the CID of its own weights, waits for the chief's receipt, and signs the same manifest CID
only if the weights match.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount

from deepmarket.bundles import fetch_bundle
from deepmarket.chain.client import MarketClient
from deepmarket.chain.events import ChainEvent, EventTailer, open_state_db
from deepmarket.chain.typed_data import WorkReceipt, sign_typed, work_receipt_message
from deepmarket.errors import (
    BundleError,
    ChainError,
    ConfigError,
    ContentMismatchError,
    ContractRevert,
    DeepMarketError,
    StorageError,
)
from deepmarket.lender.worker import WorkerProcess
from deepmarket.market.machines import MachineSpec, host_resources, is_available, parse_windows
from deepmarket.market.operations import claim_payout
from deepmarket.storage.cid import compute_file_cid

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "deepmarket-checkpoint/1"
PID_FILE = "daemon.pid"  # the running daemon's process id, for `deepmarket lender reclaim`
RECLAIM_REQUEST = "reclaim.request"  # written by `deepmarket lender reclaim`
RESUME_REQUEST = "resume.request"  # written by `deepmarket lender resume`
# Leave a job this long before the availability window closes (a checkpoint must fit in it).
WINDOW_MARGIN_S = 300
JOB_RUNNING = 2
MACHINE_ACTIVE, MACHINE_PAUSED = 1, 2
RETRY_FOR_S = 120  # how long one step of an assignment retries a chain or IPFS outage
CLOCK_SKEW_S = 2  # seconds this host's clock may run ahead of the chain's block timestamps
RECORD_PROOF_GAS = 500_000  # recordProof measured at up to ~230k gas
EVENTS = ("JobAssigned", "WorkerFaulted", "JobCompleted", "JobFailed", "JobExpired", "JobCancelled")
SCHEMA = """
CREATE TABLE IF NOT EXISTS lender_machine (id INTEGER PRIMARY KEY CHECK (id = 1), machine_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS assignment (
    job_id INTEGER NOT NULL, round INTEGER NOT NULL, cluster_spec_cid TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',   -- pending, running, done, skipped
    PRIMARY KEY (job_id, round)
);
"""


@dataclass
class LenderConfig:
    """Settings of a lender daemon: the machine it offers and the folder for its files."""

    work_dir: Path
    tf_port: int
    host: str = "127.0.0.1"  # address other workers use to reach this machine's TF server
    cores: int | None = None  # default: every core of this host
    memory_mib: int | None = None  # default: all memory of this host
    price_per_core_hour: int = 0  # credit base units
    windows: str = "always"
    stake: int = 0  # credit base units bonded at registration
    poll_interval_s: float = 1.0
    proof_wait_s: float = 120.0  # how long a non-chief worker waits for the chief's receipt
    auto_claim: bool = True
    worker_args: list[str] = field(default_factory=list)
    # CPU ids the worker is pinned to; default: the first `cores` CPUs this process may use.
    cpus: list[int] | None = None

    def machine_spec(self) -> MachineSpec:
        """Return the spec to register; raise ConfigError if it offers more than this host has."""
        host_cores, host_memory = host_resources()
        cores = host_cores if self.cores is None else self.cores
        memory_mib = host_memory if self.memory_mib is None else self.memory_mib
        if not 1 <= cores <= host_cores:
            raise ConfigError(f"--cores {cores} is invalid: this host lets the daemon use 1 to {host_cores} cores")
        if not 1 <= memory_mib <= host_memory:
            raise ConfigError(f"--memory-mib {memory_mib} is invalid: this host has 1 to {host_memory} MiB")
        if self.cpus is not None and len(set(self.cpus)) != len(self.cpus):
            raise ConfigError(f"--cpus {self.cpus} repeats a CPU id: list each CPU once")
        return MachineSpec(cores=cores, memory_mib=memory_mib, gpus=0,
                           benchmark_score=0, price_per_core_hour=self.price_per_core_hour,
                           availability_mask=parse_windows(self.windows), endpoint=f"{self.host}:{self.tf_port}")


class LenderDaemon:
    """Serves one machine for one lender account."""

    def __init__(self, client: MarketClient, account: LocalAccount, store: Any, config: LenderConfig) -> None:
        self.client = client
        self.account = account
        self.store = store
        self.config = config
        self.spec = config.machine_spec()
        config.work_dir.mkdir(parents=True, exist_ok=True)
        self.db: sqlite3.Connection = open_state_db(config.work_dir / "lender.sqlite")
        self.db.executescript(SCHEMA)
        self.tailer = EventTailer(client, self.db, "lender", EVENTS)
        self.machine_id = 0
        self._worker: WorkerProcess | None = None
        self._thread: threading.Thread | None = None
        self._serving: tuple[int, int] | None = None  # (job id, round)
        self._lock = threading.Lock()
        self._jobs_to_claim: set[int] = set()
        # Set when the owner reclaims the machine or its window is about to close: the worker
        # leaves the job right after its next proved checkpoint.
        self._leave_after_checkpoint = threading.Event()
        self._pause_after_leave = False
        self._intentional_stop: set[tuple[int, int]] = set()  # rounds stopped on purpose

    # ------------------------------------------------------------------ machine

    def ensure_machine(self) -> int:
        """Register this machine, or update its on-chain spec if the config changed; return its id."""
        row = self.db.execute("SELECT machine_id FROM lender_machine").fetchone()
        if row is None:
            if self.config.stake:
                self.client.approve(self.account, self.client.registry.address, self.config.stake)
            receipt = self.client.transact(self.account, self.client.registry.functions.registerMachine(
                self.spec.as_tuple(), self.config.stake))
            self.machine_id = int(self.client.event(receipt, self.client.registry, "MachineRegistered")["machineId"])
            self.db.execute("INSERT INTO lender_machine VALUES (1, ?)", (self.machine_id,))
            logger.info("machine registered: machine %s lender %s endpoint %s cores %s", self.machine_id,
                        self.account.address, self.spec.endpoint, self.spec.cores)
            return self.machine_id
        self.machine_id = int(row[0])
        on_chain = self.client.get_machine(self.machine_id)
        if on_chain["lender"] != self.account.address:
            raise DeepMarketError(f"machine {self.machine_id} in {self.config.work_dir} belongs to "
                                  f"{on_chain['lender']}, not {self.account.address}: use another work dir")
        current = (on_chain["cores"], on_chain["memory_mib"], on_chain["gpus"], on_chain["benchmark_score"],
                   on_chain["price_per_core_hour"], on_chain["availability_mask"], on_chain["endpoint"])
        if current != self.spec.as_tuple():
            self.client.transact(self.account, self.client.registry.functions.updateMachine(
                self.machine_id, self.spec.as_tuple()))
            logger.info("machine updated: machine %s", self.machine_id)
        if on_chain["locked_by"]:
            self._report_lost_assignment(int(on_chain["locked_by"]))
        return self.machine_id

    def _report_lost_assignment(self, job_id: int) -> None:
        """Leave the job this machine served before the daemon restarted, because its worker died with the old daemon."""
        job = self.client.get_job(job_id)
        if job["status"] != JOB_RUNNING:
            return
        logger.warning("worker lost: machine %s was serving job %s before this daemon started; leaving the job",
                       self.machine_id, job_id)
        try:
            self.client.leave_job(self.account, job_id, self.machine_id)
        except ContractRevert as exc:
            logger.warning("leaving job %s failed: %s", job_id, exc)

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event) -> None:
        pid_file = self.config.work_dir / PID_FILE
        pid_file.write_text(str(os.getpid()))
        try:
            self._run(stop)
        finally:
            pid_file.unlink(missing_ok=True)

    def _run(self, stop: threading.Event) -> None:
        self.ensure_machine()
        logger.info("lender daemon started: machine %s account %s", self.machine_id, self.account.address)
        backoff = self.config.poll_interval_s
        try:
            while not stop.is_set():
                try:
                    self.step()
                    backoff = self.config.poll_interval_s
                except (ChainError, StorageError, ConnectionError, OSError) as exc:
                    backoff = min(backoff * 2, 30.0)
                    logger.warning("lender step failed, retrying in %.0f s: %s", backoff, exc)
                stop.wait(backoff)
        finally:
            self.stop_worker()
            logger.info("lender daemon stopped: machine %s", self.machine_id)

    def step(self) -> None:
        self.tailer.poll(self._on_event)
        self._handle_owner_requests()
        self._start_pending()
        if self.config.auto_claim and self._jobs_to_claim:
            self.claim()

    def _handle_owner_requests(self) -> None:
        reclaim = self.config.work_dir / RECLAIM_REQUEST
        resume = self.config.work_dir / RESUME_REQUEST
        if reclaim.exists():
            reclaim.unlink()
            logger.info("reclaim requested by the owner: machine %s", self.machine_id)
            self._pause_after_leave = True
            if self._serving_job() is None:
                self._pause_machine()
            else:
                self._leave_after_checkpoint.set()
        if resume.exists():
            resume.unlink()
            if self.client.get_machine(self.machine_id)["status"] == MACHINE_PAUSED:
                self.client.transact(self.account, self.client.registry.functions.resumeMachine(self.machine_id))
                logger.info("machine resumed by the owner: machine %s", self.machine_id)
        serving = self._serving_job()
        closing = not is_available(self.spec.availability_mask, int(time.time()) + WINDOW_MARGIN_S)
        if serving is not None and closing and not self._leave_after_checkpoint.is_set():
            logger.info("availability window closes soon: machine %s leaves job %s after its next checkpoint",
                        self.machine_id, serving)
            self._leave_after_checkpoint.set()

    def _pause_machine(self) -> None:
        self._pause_after_leave = False
        if self.client.get_machine(self.machine_id)["status"] == MACHINE_ACTIVE:
            self.client.transact(self.account, self.client.registry.functions.pauseMachine(self.machine_id))
            logger.info("machine paused for its owner: machine %s", self.machine_id)

    def _leave(self, job_id: int, round_: int) -> None:
        """Stop the worker on purpose, give the slot back without a slash, and pause if the owner asked."""
        self._intentional_stop.add((job_id, round_))
        self._stop_if_serving(job_id)
        try:
            self.client.leave_job(self.account, job_id, self.machine_id)
            logger.info("worker left: job %s round %s machine %s", job_id, round_, self.machine_id)
        except ContractRevert as exc:
            logger.warning("leaving job %s failed: %s", job_id, exc)
        self._leave_after_checkpoint.clear()
        if self._pause_after_leave:
            self._pause_machine()

    def claim(self) -> int:
        amount = claim_payout(self.client, self.account)
        self._jobs_to_claim.clear()
        return amount

    def _on_event(self, event: ChainEvent, db: sqlite3.Connection) -> None:
        args = event.args
        job_id = int(args["jobId"])
        if event.name == "JobAssigned":
            if self.machine_id in args["machineIds"]:
                db.execute("INSERT OR IGNORE INTO assignment (job_id, round, cluster_spec_cid) VALUES (?, ?, ?)",
                           (job_id, args["round"], args["clusterSpecCid"]))
                logger.info("assignment received: job %s round %s machine %s", job_id, args["round"], self.machine_id)
        elif event.name == "WorkerFaulted":
            if int(args["machineId"]) == self.machine_id:
                logger.warning("worker faulted by the coordinator: job %s machine %s", job_id, self.machine_id)
                self._mark_intentional(job_id)
                self._stop_if_serving(job_id)
        elif self._serving_job() == job_id or self._served(job_id):
            logger.info("job ended (%s): job %s", event.name, job_id)
            self._mark_intentional(job_id)
            self._stop_if_serving(job_id)
            self._jobs_to_claim.add(job_id)

    def _mark_intentional(self, job_id: int) -> None:
        with self._lock:
            if self._serving is not None and self._serving[0] == job_id:
                self._intentional_stop.add(self._serving)

    def _served(self, job_id: int) -> bool:
        return self.db.execute("SELECT 1 FROM assignment WHERE job_id = ?", (job_id,)).fetchone() is not None

    def _serving_job(self) -> int | None:
        with self._lock:
            return self._serving[0] if self._serving else None

    def _start_pending(self) -> None:
        rows = self.db.execute("SELECT job_id, round, cluster_spec_cid FROM assignment WHERE status = 'pending' "
                               "ORDER BY job_id, round").fetchall()
        for job_id, round_, spec_cid in rows:
            job = self.client.get_job(job_id)
            mine = any(w["machine_id"] == self.machine_id and w["active"] for w in self.client.get_workers(job_id))
            if job["status"] != JOB_RUNNING or job["round"] != round_ or not mine:
                self._set_status(job_id, round_, "skipped")  # superseded by a later round or over
                continue
            with self._lock:
                old = self._serving
            if old is not None:
                self._intentional_stop.add(old)
            self._stop_if_serving(job_id)
            if self._leave_after_checkpoint.is_set():
                # The owner reclaimed the machine (or its window closes): give the slot back
                # instead of starting the next round.
                self._set_status(job_id, round_, "skipped")
                self._leave(job_id, round_)
                continue
            self._set_status(job_id, round_, "running")
            with self._lock:
                self._serving = (job_id, round_)
            self._thread = threading.Thread(target=self._serve, args=(job_id, round_, spec_cid), daemon=True,
                                            name=f"serve-{job_id}-{round_}")
            self._thread.start()

    def _set_status(self, job_id: int, round_: int, status: str) -> None:
        self.db.execute("UPDATE assignment SET status = ? WHERE job_id = ? AND round = ?", (status, job_id, round_))

    # ------------------------------------------------------------------ serving one assignment

    def _serve(self, job_id: int, round_: int, spec_cid: str) -> None:
        try:
            self._serve_round(job_id, round_, spec_cid)
        except (BundleError, StorageError, ChainError) as exc:
            logger.error("assignment failed: job %s round %s machine %s: %s", job_id, round_, self.machine_id, exc)
        except Exception:
            logger.exception("assignment crashed: job %s round %s machine %s", job_id, round_, self.machine_id)
        finally:
            with self._lock:
                if self._serving == (job_id, round_):
                    self._serving = None
                worker = self._worker if self._worker is not None and self._worker.round == round_ else None
            if worker is not None and worker.returncode is None:
                # No thread reads the worker's events any more, so its work would go unproved: stop it.
                self._intentional_stop.add((job_id, round_))
                worker.stop()

    def _retry(self, what: str, action: Any) -> Any:
        """Run `action()`, retrying chain and IPFS outages with exponential backoff for up to RETRY_FOR_S."""
        deadline = time.monotonic() + RETRY_FOR_S
        delay, attempt = 1.0, 1
        while True:
            try:
                return action()
            except (ContractRevert, ContentMismatchError, BundleError):
                raise  # a definite rejection, which a retry would not change
            except (ChainError, StorageError, OSError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("%s failed (attempt %s), retrying in %.0f s: %s", what, attempt, delay, exc)
                time.sleep(delay)
                delay, attempt = min(delay * 2, 30.0), attempt + 1

    def _serve_round(self, job_id: int, round_: int, spec_cid: str) -> None:
        spec = self._retry(f"fetching cluster spec {spec_cid}", lambda: self.store.get_json(spec_cid))
        slots = [w for w in spec["workers"] if int(w["machine_id"]) == self.machine_id]
        if not slots:
            raise ChainError(f"cluster spec {spec_cid} of job {job_id} does not list machine {self.machine_id}")
        slot = int(slots[0]["slot"])

        if not is_available(self.spec.availability_mask, int(time.time())):
            logger.warning("assignment outside the availability window: job %s machine %s; leaving", job_id,
                           self.machine_id)
            self.client.leave_job(self.account, job_id, self.machine_id)
            return
        job_dir = self.config.work_dir / f"job-{job_id}"
        bundle = self._retry(f"fetching bundle {spec['bundle_cid']}",
                             lambda: fetch_bundle(self.store, spec["bundle_cid"], job_dir / "bundle"))
        initial_weights, initial_epoch = None, 0
        if spec.get("resume"):
            checkpoint = self.store.get_json(spec["resume"]["checkpoint_cid"])
            initial_epoch = int(checkpoint["epoch"])
            initial_weights = self.store.get_file(checkpoint["weights_cid"],
                                                  job_dir / f"resume-epoch-{initial_epoch:04d}.weights.h5")

        endpoints = [w["endpoint"] for w in sorted(spec["workers"], key=lambda w: int(w["slot"]))]
        with self._lock:
            if self._serving != (job_id, round_):
                return  # a later round or the end of the job arrived while the bundle was fetched
            worker = WorkerProcess(
                job_id=job_id, round_=round_, endpoints=endpoints, slot=slot, model=bundle.model_path,
                dataset=bundle.dataset_path, config=bundle.config_path, workdir=job_dir / f"round-{round_}",
                cores=self.spec.cores, memory_mib=self.spec.memory_mib, initial_weights=initial_weights,
                initial_epoch=initial_epoch, extra_args=self.config.worker_args, cpus=self.config.cpus)
            self._worker = worker

        chief_machine = int(next(w["machine_id"] for w in spec["workers"] if int(w["slot"]) == 0))
        for event in worker.iter_events():
            kind = event["event"]
            if kind == "started":
                self._retry(f"reporting ready for job {job_id}",
                            lambda: self.client.report_ready(self.account, job_id, self.machine_id))
                logger.info("worker ready: job %s round %s machine %s slot %s", job_id, round_, self.machine_id, slot)
            elif kind == "first_step":
                logger.info("first training step: job %s round %s machine %s at unix time %.3f", job_id, round_,
                            self.machine_id, float(event.get("time", time.time())))
            elif kind == "checkpoint":
                self._retry(f"proving checkpoint {event.get('epoch')} of job {job_id}",
                            lambda event=event: self._prove(job_id, round_, slot, chief_machine, event))
                if self._leave_after_checkpoint.is_set():
                    self._leave(job_id, round_)
            elif kind == "failed":
                logger.error("worker failed: job %s round %s machine %s: %s", job_id, round_, self.machine_id,
                             event.get("error"))
        logger.info("worker exited: job %s round %s machine %s code %s", job_id, round_, self.machine_id,
                    worker.returncode)
        self._set_status(job_id, round_, "done")
        if worker.returncode != 0 and (job_id, round_) not in self._intentional_stop:
            self._report_stopped(job_id, round_)
        if self._leave_after_checkpoint.is_set() and self.client.get_job(job_id)["status"] != JOB_RUNNING:
            # The job ended before the reclaim took effect: nothing to leave, but still pause.
            self._leave_after_checkpoint.clear()
            if self._pause_after_leave:
                self._pause_machine()

    def _report_stopped(self, job_id: int, round_: int) -> None:
        """Tell the coordinator our worker stopped early, if the job still runs this round with us in it."""
        job = self.client.get_job(job_id)
        mine = any(w["machine_id"] == self.machine_id and w["active"] for w in self.client.get_workers(job_id))
        if job["status"] != JOB_RUNNING or job["round"] != round_ or not mine:
            return
        try:
            self.client.report_stopped(self.account, job_id, self.machine_id)
            logger.warning("worker stopped early, reported: job %s round %s machine %s", job_id, round_,
                           self.machine_id)
        except ContractRevert as exc:
            logger.warning("reporting the stopped worker of job %s failed: %s", job_id, exc)

    def _prove(self, job_id: int, round_: int, slot: int, chief_machine: int, event: dict[str, Any]) -> None:
        epoch = int(event["epoch"])
        weights_path = Path(event["path"])
        if slot == 0:
            weights_cid = self.store.add_file(weights_path)
            manifest = {"format": CHECKPOINT_FORMAT, "job_id": job_id, "round": round_, "epoch": epoch,
                        "steps": int(event["steps"]), "weights_cid": weights_cid,
                        "metrics": event.get("metrics") or {}}
            checkpoint_cid = self.store.add_json(manifest)
            logger.info("checkpoint pinned: job %s epoch %s checkpoint %s weights %s", job_id, epoch, checkpoint_cid,
                        weights_cid)
        else:
            checkpoint_cid = self._matching_chief_checkpoint(job_id, chief_machine, epoch, weights_path)
            if checkpoint_cid is None:
                return

        worker = next(w for w in self.client.get_workers(job_id) if w["machine_id"] == self.machine_id)
        # Claim up to now, not up to the latest block: on a chain that mines only on demand the
        # latest block can be many seconds old. The block that includes the receipt is no older
        # than now minus the allowed clock skew, so the contract's cap holds.
        now = max(self.client.latest_timestamp(), int(time.time()) - CLOCK_SKEW_S)
        core_seconds = int(worker["cores"]) * max(0, now - int(worker["since"]))
        receipt = WorkReceipt(job_id, self.machine_id, epoch, int(event["steps"]), checkpoint_cid, core_seconds)
        message = work_receipt_message(receipt, self.client.deployment.chain_id, self.client.market.address)
        try:
            # A fixed gas limit, because estimating against the latest (older) block would
            # reject a claim that the including block accepts.
            payment = self.client.record_proof(self.account, receipt, sign_typed(self.account, message),
                                               gas_limit=RECORD_PROOF_GAS)
        except ContractRevert as exc:
            logger.error("proof rejected: job %s machine %s checkpoint %s: %s", job_id, self.machine_id, epoch, exc)
            return
        logger.info("proof recorded: job %s machine %s checkpoint %s core-seconds %s payment %s", job_id,
                    self.machine_id, epoch, core_seconds, payment)

    def _matching_chief_checkpoint(self, job_id: int, chief_machine: int, epoch: int, weights_path: Path) -> str | None:
        """Wait for the chief's receipt for `epoch`; return its CID if its weights equal ours."""
        local_cid = compute_file_cid(weights_path)
        deadline = time.monotonic() + self.config.proof_wait_s
        while time.monotonic() < deadline:
            logs = self.client.market.events.ProofRecorded().get_logs(
                from_block=self.client.deployment.block, argument_filters={"jobId": job_id, "machineId": chief_machine})
            for log in logs:
                if int(log["args"]["checkpointIndex"]) == epoch:
                    checkpoint_cid = str(log["args"]["checkpointCid"])
                    manifest = self.store.get_json(checkpoint_cid)
                    if manifest.get("weights_cid") != local_cid:
                        logger.error("checkpoint mismatch: job %s epoch %s chief weights %s, ours %s; not signing",
                                     job_id, epoch, manifest.get("weights_cid"), local_cid)
                        return None
                    return checkpoint_cid
            time.sleep(1.0)
        logger.error("chief receipt missing: job %s epoch %s not proved by machine %s within %.0f s", job_id, epoch,
                     chief_machine, self.config.proof_wait_s)
        return None

    # ------------------------------------------------------------------ stopping

    def _stop_if_serving(self, job_id: int) -> None:
        with self._lock:
            worker = self._worker if self._worker is not None and self._worker.job_id == job_id else None
        if worker is not None:
            worker.stop()

    def stop_worker(self) -> None:
        with self._lock:
            worker = self._worker
        if worker is not None:
            worker.stop()


def running_daemon_pid(work_dir: Path) -> int | None:
    """Return the process id of the daemon serving `work_dir`, or None if none is running."""
    try:
        pid = int((work_dir / PID_FILE).read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, owned by another user
    return pid
