"""The contract between a training worker and the process that launches it.

It covers the cluster description read from TF_CONFIG, the layout of a worker's
directory, and the JSON event stream on standard output. This module does not import
TensorFlow, so launchers can use it cheaply.

Events, one JSON object per line (``time`` is Unix time in seconds)::

    {"event": "started", "task_index": 0, "num_workers": 2, "time": 1790000000.0}
    {"event": "first_step", "task_index": 0, "time": 1790000004.3, "elapsed_s": 4.3}
    {"event": "checkpoint", "task_index": 0, "epoch": 1, "steps": 39,
     "path": "WORKDIR/checkpoints/epoch-0001.weights.h5", "sha256": "...",
     "loss": 0.61, "val_loss": 0.22, "val_accuracy": 0.94, "metrics": {...}}
    {"event": "finished", "task_index": 0, "epochs": 5,
     "final_weights": "WORKDIR/checkpoints/epoch-0005.weights.h5",
     "model_path": "WORKDIR/final/model.keras"}
    {"event": "failed", "task_index": 1, "error": "..."}

``elapsed_s`` counts from the start of the worker's Python module, not of the process.
``epoch`` in a checkpoint event is the number of completed epochs. ``val_accuracy`` is
null unless the config lists an accuracy metric, and ``model_path`` is null on every
worker but the chief. ``metrics`` contains every value Keras logged for the epoch.

``sha256`` is the digest of the checkpoint file. The workers of one cluster write
byte-identical files, because the weights are identical after each all-reduce and the
``.weights.h5`` format stores no timestamps (checked with tf_keras 2.21 and h5py 3.14).
NOTE: the bytes still depend on the h5py and HDF5 versions, so compare digests only
between workers that run the same environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from deepmarket.errors import ConfigError

CHECKPOINT_DIR = "checkpoints"
BACKUP_DIR = "backup"
FINAL_MODEL = Path("final") / "model.keras"

EVENTS = ("started", "first_step", "checkpoint", "finished", "failed")


@dataclass(frozen=True)
class ClusterSpec:
    """This worker's place in the cluster. Worker 0 is the chief."""

    num_workers: int
    task_index: int

    @property
    def is_chief(self) -> bool:
        return self.task_index == 0


class EventWriter:
    """Writer of events as JSON lines, flushed one by one; safe to call from any thread."""

    def __init__(self, stream: IO[str], task_index: int) -> None:
        self._stream = stream
        self._task_index = task_index
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        """Write the event ``event`` with this worker's ``task_index`` and ``fields``."""
        record = {"event": event, "task_index": self._task_index, **fields}
        line = json.dumps(record, allow_nan=False, default=_json_default)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


def read_cluster_spec(environ: Mapping[str, str] | None = None) -> ClusterSpec:
    """Parse TF_CONFIG. Without it, the process is a single worker.

    Only a ``worker`` job is supported: worker 0 is the chief, and ``chief``, ``ps`` or
    ``evaluator`` jobs raise ConfigError.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG", "").strip()
    if not raw:
        return ClusterSpec(num_workers=1, task_index=0)
    try:
        tf_config = json.loads(raw)
        cluster = tf_config["cluster"]
        workers = cluster["worker"]
        task = tf_config["task"]
        task_type = task.get("type")
        index = task.get("index")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"TF_CONFIG is invalid ({type(exc).__name__}: {exc}); expected "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}'
        ) from exc

    other_jobs = sorted(set(cluster) - {"worker"})
    if other_jobs:
        raise ConfigError(f"TF_CONFIG cluster has the job(s) {other_jobs}; only 'worker' is supported")
    if not isinstance(workers, list) or not workers:
        raise ConfigError(f"TF_CONFIG cluster.worker {workers!r} must be a non-empty list of host:port")
    if task_type != "worker":
        raise ConfigError(f"TF_CONFIG task type {task_type!r} is not supported; use 'worker'")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(workers):
        raise ConfigError(f"TF_CONFIG task index {index!r} is not in [0, {len(workers)})")
    return ClusterSpec(num_workers=len(workers), task_index=index)


def tf_config_for(addresses: list[str], task_index: int) -> str:
    """Return the TF_CONFIG value for worker ``task_index`` of a cluster at ``addresses``."""
    return json.dumps(
        {"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": task_index}}
    )


def checkpoint_path(workdir: str | os.PathLike[str], epoch: int) -> Path:
    """Return the path of the weights file written once ``epoch`` epochs are complete."""
    return Path(workdir) / CHECKPOINT_DIR / f"epoch-{epoch:04d}.weights.h5"


def parse_event(line: str) -> dict[str, Any]:
    """Parse one line of a worker's standard output. Raise ValueError if it is not an event."""
    record = json.loads(line)
    if not isinstance(record, dict) or record.get("event") not in EVENTS:
        raise ValueError(f"not a worker event: {line!r}")
    return record


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
