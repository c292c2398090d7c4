"""Command line for one training worker of a job, under MultiWorkerMirroredStrategy.

Run one process per worker::

    TF_CONFIG='{"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},
                "task": {"type": "worker", "index": 0}}' \\
    python -m deepmarket.training.runner --model model.keras --dataset data.npz \\
        --config config.json --workdir run/

Without TF_CONFIG the process trains alone. Worker 0 is the chief. Every worker writes
``WORKDIR/checkpoints/epoch-KKKK.weights.h5`` after each epoch, and the chief also writes
``WORKDIR/final/model.keras`` at the end. Standard output carries only the JSON events
described in :mod:`deepmarket.training.protocol`. Human-readable logs, TensorFlow's
included, go to standard error. The exit status is 0 on success, 1 when training
fails, 2 for invalid arguments and 3 for an invalid bundle or config. A worker that
has not completed its first step within ``--startup-timeout-s`` is killed with
SIGKILL after a ``failed`` event.

MultiWorkerMirroredStrategy is not elastic: when any worker dies, the others fail
within seconds and every worker must be restarted. Restart them all with the same
``--initial-weights`` (a checkpoint file) and ``--initial-epoch``.

IMPORTANT: TensorFlow's gRPC server listens on all interfaces, whatever host TF_CONFIG
names, and accepts unauthenticated requests to run operations. Lenders must firewall
the worker port so that only the other workers of the cluster can reach it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from deepmarket.errors import BundleError, ConfigError, TrainingError
from deepmarket.training import bundle
from deepmarket.training.protocol import ClusterSpec, EventWriter, read_cluster_spec
from deepmarket.training.watchdog import Watchdog, start_watchdog

MODULE_START_TIME = time.time()

logger = logging.getLogger("deepmarket.training.runner")

EXIT_OK = 0
EXIT_TRAINING_FAILED = 1
EXIT_USAGE = 2
EXIT_INVALID_BUNDLE = 3

# A collective that has not completed after this long raises DeadlineExceededError
# instead of waiting forever. Healthy workers can reach a collective far apart in time,
# because the first step waits until every peer has loaded the data and traced the
# training function. A slow or busy lender may need tens of seconds for that (an
# estimate), so a short bound would fail healthy runs. A dead or stopped peer is already detected
# by the coordination service's heartbeat after about 10 s (measured with TensorFlow
# 2.21), so this bound only has to catch a peer that is alive but stuck, and it can be
# generous.
DEFAULT_COLLECTIVE_TIMEOUT_S = 120.0

# From launch until the first training step completes. Cluster formation has no
# timeout of its own: a worker whose peers never start waits forever. This bound turns
# that wait into a failure: the watchdog process kills the worker.
DEFAULT_STARTUP_TIMEOUT_S = 300.0


def main(argv: list[str] | None = None) -> int:
    """Run one worker from the command line and return its exit status."""
    args = _parse_args(argv)

    # Keras 3's model.fit fails under MultiWorkerMirroredStrategy (TensorFlow 2.21 with
    # Keras 3.15), while tf_keras 2.21 works. The switch must be set before TensorFlow
    # is first imported, which happens when the trainer module loads.
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

    # Keep standard output for events only. TensorFlow and Keras may write to file
    # descriptor 1, so after the event stream takes a copy of it, it points to stderr.
    sys.stdout.flush()
    event_stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    try:
        cluster = read_cluster_spec()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s worker-{cluster.task_index} %(levelname)s %(name)s: %(message)s",
    )
    events = EventWriter(event_stream, cluster.task_index)
    events.emit("started", num_workers=cluster.num_workers, time=time.time())

    watchdog: Watchdog | None = None
    try:
        _check_args(args)
        config = bundle.load_config(args.config)
        bundle.scan_model_archive(args.model)
        if args.initial_epoch >= config.epochs:
            raise ConfigError(
                f"--initial-epoch {args.initial_epoch} is not below the config's {config.epochs} epochs, "
                "so nothing would be trained"
            )
        watchdog = start_watchdog(args.startup_timeout_s, cluster.task_index, event_stream)
        _train(args, config, cluster, events, on_first_step=watchdog.cancel)
    except (BundleError, ConfigError) as exc:
        return _fail(events, EXIT_INVALID_BUNDLE, exc)
    except TrainingError as exc:
        return _fail(events, EXIT_TRAINING_FAILED, exc)
    except Exception as exc:  # noqa: BLE001 - the process boundary reports every failure as an event
        logger.exception("Training failed")
        error = TrainingError(
            f"worker {cluster.task_index} failed: {type(exc).__name__}: {exc}. "
            "Restart every worker of the cluster from the last checkpoint"
        )
        return _fail(events, EXIT_TRAINING_FAILED, error)
    finally:
        if watchdog is not None:
            watchdog.cancel()
    return EXIT_OK


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deepmarket.training.runner",
        description="Train one MultiWorkerMirroredStrategy worker of a DeepMarket job. "
        "The cluster is read from TF_CONFIG; without it the process trains alone.",
    )
    parser.add_argument("--model", required=True, type=Path, help="the .keras model file")
    parser.add_argument("--dataset", required=True, type=Path, help="the .npz dataset file")
    parser.add_argument(
        "--config", required=True, type=Path, help="JSON training config, or a bundle manifest"
    )
    parser.add_argument(
        "--workdir", required=True, type=Path, help="directory for checkpoints, backup and final model"
    )
    parser.add_argument(
        "--initial-weights",
        type=Path,
        help="a checkpoint (.weights.h5) to start from; a backup in WORKDIR/backup is deleted",
    )
    parser.add_argument(
        "--initial-epoch",
        type=int,
        default=0,
        help="number of epochs the initial weights have completed: K for epoch-K.weights.h5 (default: 0)",
    )
    parser.add_argument(
        "--collective-timeout-s",
        type=float,
        default=DEFAULT_COLLECTIVE_TIMEOUT_S,
        help="seconds a cross-worker collective may wait for its peers before the worker fails "
        f"(default: {DEFAULT_COLLECTIVE_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--startup-timeout-s",
        type=float,
        default=DEFAULT_STARTUP_TIMEOUT_S,
        help="seconds from launch until the first training step must complete, cluster formation "
        f"included (default: {DEFAULT_STARTUP_TIMEOUT_S:g})",
    )
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    if args.initial_epoch < 0:
        raise ConfigError(f"--initial-epoch {args.initial_epoch} is negative; give 0 or more")
    if args.initial_epoch > 0 and args.initial_weights is None:
        raise ConfigError(
            f"--initial-epoch {args.initial_epoch} needs --initial-weights with that epoch's checkpoint"
        )
    if args.initial_weights is not None:
        if not args.initial_weights.name.endswith(".weights.h5"):
            raise ConfigError(f"--initial-weights {args.initial_weights} is not a .weights.h5 checkpoint")
        if not args.initial_weights.is_file():
            raise ConfigError(f"--initial-weights {args.initial_weights} not found")
    for option, value in (
        ("--collective-timeout-s", args.collective_timeout_s),
        ("--startup-timeout-s", args.startup_timeout_s),
    ):
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{option} {value} is invalid; give a positive number of seconds")


def _train(
    args: argparse.Namespace,
    config: bundle.TrainingConfig,
    cluster: ClusterSpec,
    events: EventWriter,
    *,
    on_first_step: Callable[[], None],
) -> None:
    from deepmarket.training import trainer  # imports TensorFlow

    trainer.train(
        model_path=args.model,
        dataset_path=args.dataset,
        config=config,
        workdir=args.workdir,
        cluster=cluster,
        events=events,
        initial_weights=args.initial_weights,
        initial_epoch=args.initial_epoch,
        collective_timeout_s=args.collective_timeout_s,
        start_time=MODULE_START_TIME,
        on_first_step=on_first_step,
    )


def _fail(events: EventWriter, status: int, error: Exception) -> int:
    logger.error("%s: %s", type(error).__name__, error)
    events.emit("failed", error=str(error))
    return status


if __name__ == "__main__":
    sys.exit(main())
