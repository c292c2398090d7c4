"""Launch real training workers on 127.0.0.1 for tests, and always clean them up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepmarket.training.protocol import parse_event, tf_config_for

# TF_CONFIG names 127.0.0.1, but TensorFlow's gRPC server listens on all interfaces.
LOCALHOST = "127.0.0.1"
RESERVED_PORTS = {8545}


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((LOCALHOST, 0))
            port = probe.getsockname()[1]
        if port not in ports and port not in RESERVED_PORTS:
            ports.append(port)
    return ports


@dataclass
class Worker:
    """One runner process, with its output captured in files."""

    index: int
    workdir: Path
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    return_code: int | None = field(default=None)

    def events(self) -> list[dict[str, Any]]:
        """Parse every line written to stdout so far as an event; a non-event line fails the test."""
        lines = self.stdout_path.read_text().splitlines()
        return [parse_event(line) for line in lines if line.strip()]

    def events_of(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events() if event["event"] == name]

    def stderr_tail(self, chars: int = 3000) -> str:
        return self.stderr_path.read_text(errors="replace")[-chars:]


class Cluster:
    """Context manager that starts runner workers and kills their process groups on exit.

    Each worker runs in its own session, so killing its process group also ends the
    watchdog process it starts.
    """

    def __init__(
        self, tmp_path: Path, num_workers: int, runner_args: list[str], *, name: str = "run"
    ) -> None:
        self.tmp_path = tmp_path
        self.num_workers = num_workers
        self.runner_args = runner_args
        self.name = name
        self.workers: list[Worker] = []

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill_all()

    def start(self, indexes: list[int] | None = None, extra_args: dict[int, list[str]] | None = None) -> None:
        """Start the workers at ``indexes`` (all by default), each with TF_CONFIG for its index."""
        addresses = [f"{LOCALHOST}:{port}" for port in free_ports(self.num_workers)]
        for index in range(self.num_workers) if indexes is None else indexes:
            workdir = self.tmp_path / f"{self.name}-worker-{index}"
            stdout_path = self.tmp_path / f"{self.name}-worker-{index}.stdout"
            stderr_path = self.tmp_path / f"{self.name}-worker-{index}.stderr"
            env = dict(os.environ)
            if self.num_workers > 1:
                env["TF_CONFIG"] = tf_config_for(addresses, index)
            else:
                env.pop("TF_CONFIG", None)
            command = [
                sys.executable,
                "-m",
                "deepmarket.training.runner",
                *self.runner_args,
                "--workdir",
                str(workdir),
                *(extra_args or {}).get(index, []),
            ]
            with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
                process = subprocess.Popen(
                    command, stdout=stdout, stderr=stderr, start_new_session=True, env=env
                )
            self.workers.append(Worker(index, workdir, process, stdout_path, stderr_path))

    def wait(self, timeout_s: float) -> list[int]:
        """Wait for every worker to exit; on timeout kill them all and fail with their logs."""
        deadline = time.monotonic() + timeout_s
        for worker in self.workers:
            try:
                worker.return_code = worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill_all()
                raise AssertionError(
                    f"workers still running after {timeout_s} s:\n{self.describe()}"
                ) from None
        return [worker.return_code for worker in self.workers if worker.return_code is not None]

    def wait_for_event(self, worker: Worker, name: str, timeout_s: float) -> dict[str, Any]:
        """Poll a running worker's output until it emits the event ``name``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = worker.events_of(name)
            if found:
                return found[0]
            if worker.process.poll() is not None:
                raise AssertionError(f"worker {worker.index} exited before {name}:\n{self.describe()}")
            time.sleep(0.2)
        raise AssertionError(
            f"worker {worker.index} sent no {name} event within {timeout_s} s:\n{self.describe()}"
        )

    def kill_all(self) -> None:
        """SIGKILL every worker's process group that is still running, then reap the workers."""
        for worker in self.workers:
            if worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.process.pid, signal.SIGKILL)
            worker.process.wait()

    def describe(self) -> str:
        parts = []
        for worker in self.workers:
            stdout = worker.stdout_path.read_text(errors="replace")[-2000:]
            parts.append(
                f"--- worker {worker.index} (exit {worker.process.poll()}) stdout:\n{stdout}\n"
                f"--- stderr:\n{worker.stderr_tail()}"
            )
        return "\n".join(parts)


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path
