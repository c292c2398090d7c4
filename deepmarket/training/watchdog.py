"""Startup watchdog for a training worker, run as its own small process.

While MultiWorkerMirroredStrategy forms the cluster, the worker's main thread waits
inside TensorFlow's C++ runtime without releasing the GIL. With TensorFlow 2.21, a
``threading.Timer`` in the worker did not fire until every peer had joined, which may be
never. The watchdog therefore runs in a separate process. It waits on a pipe from the worker. If the worker
closes the pipe (first step done, or worker gone) it exits quietly. On timeout it writes
a ``failed`` event to the worker's event stream and kills the worker with SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

from deepmarket.training.protocol import EventWriter

logger = logging.getLogger(__name__)


class Watchdog:
    """Handle on a running watchdog process; :meth:`cancel` stops it."""

    def __init__(self, process: subprocess.Popen[bytes], pipe: IO[bytes]) -> None:
        self._process = process
        self._pipe = pipe

    def cancel(self) -> None:
        """Stop the watchdog. Calling it again does nothing."""
        if not self._pipe.closed:
            self._pipe.close()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def start_watchdog(timeout_s: float, task_index: int, event_stream: IO[str]) -> Watchdog:
    """Start a watchdog that kills this process unless cancelled within ``timeout_s``."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deepmarket.training.watchdog",
            "--pid",
            str(os.getpid()),
            "--timeout-s",
            str(timeout_s),
            "--task-index",
            str(task_index),
        ],
        stdin=subprocess.PIPE,
        stdout=event_stream.fileno(),
        env=env,
    )
    assert process.stdin is not None
    return Watchdog(process, process.stdin)


def main(argv: list[str] | None = None) -> int:
    """Wait for standard input to close. On timeout, emit a failed event and kill the worker."""
    parser = argparse.ArgumentParser(description="Kill a training worker that does not start in time.")
    parser.add_argument("--pid", type=int, required=True, help="process id of the worker")
    parser.add_argument(
        "--timeout-s", type=float, required=True, help="seconds to wait for standard input to close"
    )
    parser.add_argument("--task-index", type=int, required=True, help="the worker's task index")
    args = parser.parse_args(argv)

    readable, _, _ = select.select([sys.stdin.buffer], [], [], args.timeout_s)
    if readable:
        return 0  # The worker closed the pipe: it started, or it ended on its own.

    message = (
        f"no training step completed within {args.timeout_s:g} s of launch; a peer worker may not "
        "have started or may be unreachable. Restart every worker of the cluster"
    )
    print(f"worker-{args.task_index} ERROR watchdog: {message}", file=sys.stderr, flush=True)
    EventWriter(sys.stdout, args.task_index).emit("failed", error=message)
    _terminate(args.pid)
    return 0


def _terminate(pid: int) -> None:
    # SIGKILL, because a multi-worker TensorFlow process (2.21) catches SIGTERM and keeps
    # running after it.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
