"""Real training runs of the runner CLI: one worker, a 2-worker cluster, resume and failures."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from training_cluster import Cluster, Worker, write_json

from deepmarket.training import bundle, digits
from deepmarket.training.bundle import TrainingConfig, write_config
from deepmarket.training.protocol import BACKUP_DIR, FINAL_MODEL, checkpoint_path, sha256_file

STEPS_PER_EPOCH = 1257 // 32
# Generous bounds: on a 2-core machine a 2-epoch 2-worker run took 13-25 s, depending on load.
RUN_TIMEOUT_S = 240
STARTUP_TIMEOUT_S = 120


def runner_args(demo: digits.DemoInputs, config_path: Path) -> list[str]:
    return [
        "--model",
        str(demo.model_path),
        "--dataset",
        str(demo.lender_dataset_path),
        "--config",
        str(config_path),
        "--startup-timeout-s",
        str(STARTUP_TIMEOUT_S),
    ]


def event_names(worker: Worker) -> list[str]:
    return [event["event"] for event in worker.events()]


def assert_checkpoints(worker: Worker, epochs: list[int]) -> list[dict[str, Any]]:
    """Check a worker's checkpoint events against its files and return the events."""
    checkpoints = worker.events_of("checkpoint")
    assert [event["epoch"] for event in checkpoints] == epochs
    assert [event["steps"] for event in checkpoints] == [epoch * STEPS_PER_EPOCH for epoch in epochs]
    for event in checkpoints:
        path = Path(event["path"])
        assert path == checkpoint_path(worker.workdir, event["epoch"])
        assert path.is_file()
        assert sha256_file(path) == event["sha256"]
        assert event["loss"] > 0
        assert event["val_loss"] > 0
        assert 0 <= event["val_accuracy"] <= 1
    return checkpoints


@pytest.fixture(scope="module")
def two_worker_run(
    tmp_path_factory: pytest.TempPathFactory,
    demo: digits.DemoInputs,
    short_config: tuple[TrainingConfig, Path],
) -> Iterator[Cluster]:
    """A finished 2-epoch run of a 2-worker cluster on 127.0.0.1."""
    _, config_path = short_config
    with Cluster(tmp_path_factory.mktemp("two-workers"), 2, runner_args(demo, config_path)) as cluster:
        cluster.start()
        cluster.wait(RUN_TIMEOUT_S)
    yield cluster


# --- one worker ----------------------------------------------------------------------


def test_single_worker_trains_demo_to_90_percent(tmp_path: Path, demo: digits.DemoInputs) -> None:
    with Cluster(tmp_path, 1, runner_args(demo, demo.config_path)) as cluster:
        cluster.start()
        (return_code,) = cluster.wait(RUN_TIMEOUT_S)
    (worker,) = cluster.workers

    assert return_code == 0, cluster.describe()
    epochs = digits.DEMO_CONFIG.epochs
    assert event_names(worker) == ["started", "first_step"] + ["checkpoint"] * epochs + ["finished"]
    assert worker.events_of("started")[0]["num_workers"] == 1
    assert worker.events_of("first_step")[0]["elapsed_s"] > 0
    assert_checkpoints(worker, list(range(1, epochs + 1)))

    finished = worker.events_of("finished")[0]
    assert finished["epochs"] == epochs
    assert Path(finished["final_weights"]) == checkpoint_path(worker.workdir, epochs)
    assert Path(finished["model_path"]) == worker.workdir / FINAL_MODEL
    model_accuracy = digits.evaluate(finished["model_path"], demo.dataset_path)
    weights_accuracy = digits.evaluate(finished["final_weights"], demo.dataset_path)
    assert model_accuracy >= 0.90
    assert weights_accuracy == model_accuracy


def test_invalid_config_exits_before_training(tmp_path: Path, demo: digits.DemoInputs) -> None:
    config = digits.DEMO_CONFIG.to_dict()
    config["epochs"] = 0
    config_path = write_json(tmp_path / "config.json", config)

    with Cluster(tmp_path, 1, runner_args(demo, config_path)) as cluster:
        cluster.start()
        (return_code,) = cluster.wait(60)
    (worker,) = cluster.workers

    assert return_code == 3
    assert event_names(worker) == ["started", "failed"]
    assert "epochs 0 is out of range" in worker.events_of("failed")[0]["error"]


def test_lambda_model_rejected_by_runner(tmp_path: Path, demo: digits.DemoInputs) -> None:
    keras = bundle.import_tf_keras()
    inputs = keras.Input((64,))
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Lambda(lambda x: -x)(inputs))
    model_path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(model_path)
    args = runner_args(demo, demo.config_path)
    args[args.index("--model") + 1] = str(model_path)

    with Cluster(tmp_path, 1, args) as cluster:
        cluster.start()
        (return_code,) = cluster.wait(60)
    (worker,) = cluster.workers

    assert return_code == 3
    assert event_names(worker) == ["started", "failed"]
    assert "Lambda layer" in worker.events_of("failed")[0]["error"]


def test_initial_epoch_without_weights_rejected(tmp_path: Path, demo: digits.DemoInputs) -> None:
    with Cluster(tmp_path, 1, runner_args(demo, demo.config_path)) as cluster:
        cluster.start(extra_args={0: ["--initial-epoch", "2"]})
        (return_code,) = cluster.wait(60)
    (worker,) = cluster.workers

    assert return_code == 3
    assert "needs --initial-weights" in worker.events_of("failed")[0]["error"]


# --- two workers ---------------------------------------------------------------------


def test_two_workers_both_emit_every_event(two_worker_run: Cluster) -> None:
    for worker in two_worker_run.workers:
        assert worker.return_code == 0, two_worker_run.describe()
        assert event_names(worker) == ["started", "first_step", "checkpoint", "checkpoint", "finished"]
        started = worker.events_of("started")[0]
        assert started["task_index"] == worker.index
        assert started["num_workers"] == 2


def test_two_workers_checkpoint_every_epoch(two_worker_run: Cluster) -> None:
    for worker in two_worker_run.workers:
        assert_checkpoints(worker, [1, 2])


def test_two_workers_write_identical_checkpoints(two_worker_run: Cluster) -> None:
    chief, other = (worker.events_of("checkpoint") for worker in two_worker_run.workers)

    for chief_event, other_event in zip(chief, other, strict=True):
        assert chief_event["sha256"] == other_event["sha256"]
        assert chief_event["loss"] == other_event["loss"]
        assert chief_event["val_accuracy"] == other_event["val_accuracy"]
        assert Path(chief_event["path"]).read_bytes() == Path(other_event["path"]).read_bytes()


def test_only_chief_writes_final_model(two_worker_run: Cluster, demo: digits.DemoInputs) -> None:
    chief, other = two_worker_run.workers
    chief_finished = chief.events_of("finished")[0]
    other_finished = other.events_of("finished")[0]

    assert other_finished["model_path"] is None
    assert not (other.workdir / FINAL_MODEL).exists()
    assert Path(chief_finished["model_path"]) == chief.workdir / FINAL_MODEL
    assert digits.evaluate(chief_finished["model_path"], demo.dataset_path) >= 0.85


def test_two_workers_resume_from_initial_weights(
    tmp_path: Path,
    two_worker_run: Cluster,
    demo: digits.DemoInputs,
    short_config: tuple[TrainingConfig, Path],
) -> None:
    _, config_path = short_config
    first_run = two_worker_run.workers[0]
    epoch_one = checkpoint_path(first_run.workdir, 1)
    original_epoch_one_loss = first_run.events_of("checkpoint")[0]["loss"]

    with Cluster(tmp_path, 2, runner_args(demo, config_path), name="resume") as cluster:
        # The chief's backup of the finished run would restore epoch 2 on the chief
        # only; --initial-weights must make the runner delete it.
        stale_backup = tmp_path / "resume-worker-0" / BACKUP_DIR
        shutil.copytree(first_run.workdir / BACKUP_DIR, stale_backup)
        resume_args = ["--initial-weights", str(epoch_one), "--initial-epoch", "1"]
        cluster.start(extra_args={0: resume_args, 1: resume_args})
        return_codes = cluster.wait(RUN_TIMEOUT_S)

    assert return_codes == [0, 0], cluster.describe()
    assert "Removing backup" in cluster.workers[0].stderr_tail(20_000)
    resumed = [assert_checkpoints(worker, [2]) for worker in cluster.workers]
    assert resumed[0][0]["sha256"] == resumed[1][0]["sha256"]
    # Starting over from the model file would give about the first epoch's loss again.
    assert resumed[0][0]["loss"] < 0.5 * original_epoch_one_loss


def test_missing_peer_fails_at_startup_timeout(
    tmp_path: Path, demo: digits.DemoInputs, short_config: tuple[TrainingConfig, Path]
) -> None:
    _, config_path = short_config
    with Cluster(tmp_path, 2, runner_args(demo, config_path)) as cluster:
        started_at = time.monotonic()
        cluster.start(indexes=[0], extra_args={0: ["--startup-timeout-s", "8"]})
        (return_code,) = cluster.wait(90)
        elapsed_s = time.monotonic() - started_at
    (worker,) = cluster.workers

    assert return_code == -signal.SIGKILL
    assert event_names(worker) == ["started", "failed"]
    assert "no training step completed within 8 s" in worker.events_of("failed")[0]["error"]
    assert elapsed_s < 60


def test_killed_peer_fails_chief(tmp_path: Path, demo: digits.DemoInputs) -> None:
    long_config = dataclasses.replace(digits.DEMO_CONFIG, epochs=200)
    config_path = write_config(long_config, tmp_path / "config-long.json")

    with Cluster(tmp_path, 2, runner_args(demo, config_path)) as cluster:
        cluster.start()
        chief, peer = cluster.workers
        cluster.wait_for_event(peer, "checkpoint", RUN_TIMEOUT_S)
        os.killpg(peer.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        chief_code = chief.process.wait(timeout=90)
        detection_s = time.monotonic() - killed_at

    assert chief_code == 1, cluster.describe()
    failed = chief.events_of("failed")
    assert len(failed) == 1
    assert "Restart every worker of the cluster" in failed[0]["error"]
    assert chief.events_of("finished") == []
    assert detection_s < 60
