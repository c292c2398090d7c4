"""One TensorFlow worker process run by a lender: launch, resource limits, events, stop.

Limits: the worker is pinned to at most the number of cores the machine offers
(``sched_setaffinity``) and runs at a lower priority than the owner's own work (nice 10).
A watchdog kills it when its resident memory exceeds the offered memory. Memory is polled
(every second) because an address-space rlimit would break TensorFlow, which reserves far
more virtual memory than it uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from deepmarket.training.protocol import tf_config_for

logger = logging.getLogger(__name__)

WORKER_NICE = 10
MEMORY_POLL_S = 1.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class WorkerProcess:
    """A running ``deepmarket.training.runner`` with TF_CONFIG for one slot of a cluster."""

    def __init__(self, *, job_id: int, round_: int, endpoints: list[str], slot: int, model: Path, dataset: Path,
                 config: Path, workdir: Path, cores: int, memory_mib: int, initial_weights: Path | None = None,
                 initial_epoch: int = 0, extra_args: list[str] | None = None, cpus: list[int] | None = None) -> None:
        self.job_id = job_id
        self.round = round_
        self.slot = slot
        self.workdir = workdir
        self.cores = cores
        self.cpus = cpus
        self.memory_mib = memory_mib
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.memory_exceeded = False
        command = [sys.executable, "-m", "deepmarket.training.runner", "--model", str(model), "--dataset",
                   str(dataset), "--config", str(config), "--workdir", str(workdir)]
        if initial_weights is not None:
            command += ["--initial-weights", str(initial_weights), "--initial-epoch", str(initial_epoch)]
        command += extra_args or []
        env = dict(os.environ)
        env.update({"TF_CONFIG": tf_config_for(endpoints, slot), "TF_USE_LEGACY_KERAS": "1",
                    "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0", "PYTHONUNBUFFERED": "1"})
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "worker.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed when the process ends)
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True, preexec_fn=self._limit)
        self.started_at = time.time()
        logger.info("worker started: job %s round %s slot %s pid %s", job_id, round_, slot, self.process.pid)
        threading.Thread(target=self._read_events, daemon=True, name=f"worker-{job_id}-events").start()
        threading.Thread(target=self._watch_memory, daemon=True, name=f"worker-{job_id}-memory").start()

    def _limit(self) -> None:
        # Die with the thread that launched us, so a killed daemon leaves no worker behind.
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)
        else:
            allowed = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, allowed[: max(1, min(self.cores, len(allowed)))])
        os.nice(WORKER_NICE)

    def _read_events(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                logger.debug("job %s worker output: %s", self.job_id, line)
                continue
            if isinstance(event, dict) and "event" in event:
                self.events.put(event)
        self.process.wait()
        self.events.put(None)  # end of stream
        self._log.close()

    def _watch_memory(self) -> None:
        limit = self.memory_mib * 1024 * 1024
        try:
            proc = psutil.Process(self.process.pid)
            while self.process.poll() is None:
                rss = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
                if rss > limit:
                    self.memory_exceeded = True
                    logger.warning("worker over its memory limit: job %s pid %s rss %s MiB limit %s MiB; stopping it",
                                   self.job_id, self.process.pid, rss // 2**20, self.memory_mib)
                    self.stop()
                    return
                time.sleep(MEMORY_POLL_S)
        except psutil.Error:
            return

    def iter_events(self, timeout_s: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield events until the process exits (or `timeout_s` passes without one)."""
        while True:
            try:
                event = self.events.get(timeout=timeout_s)
            except queue.Empty:
                return
            if event is None:
                return
            yield event

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Kill the worker's whole process group.

        SIGKILL, not SIGTERM: TensorFlow workers keep running after SIGTERM, and a worker
        has nothing to flush, because every checkpoint is on disk before it is reported.
        """
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=timeout_s)
        logger.info("worker stopped: job %s round %s pid %s", self.job_id, self.round, self.process.pid)
