"""The TensorFlow side of a worker: strategy, data pipeline, fit and checkpoints.

Importing this module imports TensorFlow. :mod:`deepmarket.training.runner` sets
``TF_USE_LEGACY_KERAS=1`` first, so that ``tf.keras`` and the ``tf_keras`` used here are
the same Keras 2 implementation.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from deepmarket.errors import TrainingError
from deepmarket.training import bundle
from deepmarket.training.bundle import TrainingConfig
from deepmarket.training.protocol import (
    BACKUP_DIR,
    CHECKPOINT_DIR,
    FINAL_MODEL,
    ClusterSpec,
    EventWriter,
    checkpoint_path,
    sha256_file,
)

logger = logging.getLogger(__name__)

_OPTIMIZER_CLASSES = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
    "adagrad": keras.optimizers.Adagrad,
    "adamax": keras.optimizers.Adamax,
    "nadam": keras.optimizers.Nadam,
}


def train(
    *,
    model_path: Path,
    dataset_path: Path,
    config: TrainingConfig,
    workdir: Path,
    cluster: ClusterSpec,
    events: EventWriter,
    initial_weights: Path | None,
    initial_epoch: int,
    collective_timeout_s: float,
    start_time: float,
    on_first_step: Callable[[], None],
) -> None:
    """Train this worker's share of the job and emit its first_step, checkpoint and finished events.

    The caller must have checked the model file with :func:`bundle.scan_model_archive`.
    ``start_time`` (Unix time) is the reference for ``elapsed_s`` in the first_step event,
    and ``on_first_step`` runs once the first training step has completed.
    """
    arrays = bundle.load_dataset(dataset_path)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CHECKPOINT_DIR).mkdir(exist_ok=True)
    backup_dir = workdir / BACKUP_DIR
    if initial_weights is not None and backup_dir.exists():
        # Every worker of a restarted cluster must start from the same state. A backup
        # left in this workdir would override the given checkpoint on this worker only.
        logger.info("Removing backup %s because --initial-weights was given", backup_dir)
        shutil.rmtree(backup_dir)

    keras.utils.set_random_seed(config.shuffle_seed)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=collective_timeout_s
        )
    )
    logger.info(
        "Worker %d of %d joined the cluster (%d replicas in sync)",
        cluster.task_index,
        cluster.num_workers,
        strategy.num_replicas_in_sync,
    )
    if config.batch_size % strategy.num_replicas_in_sync:
        logger.warning(
            "batch_size %d is not a multiple of the %d replicas; per-replica batches differ in size",
            config.batch_size,
            strategy.num_replicas_in_sync,
        )

    with strategy.scope():
        model = bundle.load_keras_model(model_path)
        spec = bundle.model_spec(model, model_path)
        bundle.validate_dataset(arrays, model=spec, config=config)
        compile_model(model, config)
        if initial_weights is not None:
            load_checkpoint(model, initial_weights)
            logger.info("Loaded %s at epoch %d", initial_weights, initial_epoch)

    train_data, val_data = build_datasets(arrays, config, initial_epoch)
    del arrays

    progress = _ProgressCallback(
        workdir=workdir,
        events=events,
        start_time=start_time,
        on_first_step=on_first_step,
    )
    callbacks = [
        keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False),
        progress,
    ]
    try:
        model.fit(
            train_data,
            validation_data=val_data,
            epochs=config.epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            verbose=0,
        )
    except tf.errors.OpError as exc:
        raise TrainingError(
            f"worker {cluster.task_index} lost contact with the cluster or a collective failed: "
            f"{type(exc).__name__}: {exc.message.splitlines()[0] if exc.message else exc}. "
            "Restart every worker of the cluster from the last checkpoint"
        ) from exc

    final_weights = checkpoint_path(workdir, config.epochs)
    if not final_weights.is_file():
        raise TrainingError(
            f"training ended without the checkpoint {final_weights}; the backup in {backup_dir} "
            "may come from another run, so delete it and restart from the last checkpoint"
        )

    model_path_out: Path | None = None
    if cluster.is_chief:
        model_path_out = workdir / FINAL_MODEL
        save_final_model(model_path, final_weights, config, model_path_out)
        logger.info("Saved the trained model to %s", model_path_out)
    events.emit(
        "finished",
        epochs=config.epochs,
        final_weights=str(final_weights),
        model_path=None if model_path_out is None else str(model_path_out),
    )


def compile_model(model: Any, config: TrainingConfig) -> None:
    """Compile ``model`` with the config's optimizer, loss and metrics."""
    optimizer_class = _OPTIMIZER_CLASSES[config.optimizer.name]
    model.compile(
        optimizer=optimizer_class(learning_rate=config.optimizer.learning_rate),
        loss=config.loss,
        metrics=list(config.metrics),
    )


def load_checkpoint(model: Any, path: Path) -> None:
    """Load a ``.weights.h5`` checkpoint into a compiled model, optimizer state included."""
    # The optimizer creates its slot variables lazily; without them load_weights would
    # skip the saved optimizer state and restart e.g. Adam's moment estimates from zero.
    model.optimizer.build(model.trainable_variables)
    try:
        model.load_weights(str(path))
    except (ValueError, OSError) as exc:
        raise TrainingError(
            f"checkpoint {path} does not fit the model: {exc}; give a checkpoint of this job"
        ) from exc


def build_datasets(
    arrays: dict[str, np.ndarray], config: TrainingConfig, initial_epoch: int
) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """Build the training and validation pipelines, batched with the global batch size.

    Every worker builds the same pipelines. ``AutoShardPolicy.DATA`` then gives each worker
    a disjoint part of every global batch, which requires identical element order on all
    workers: the shuffle therefore uses a fixed seed. Mixing ``initial_epoch`` into the
    seed keeps a resumed run from replaying the first epoch's order, though it does not
    reproduce the order that an uninterrupted run would have used.

    NOTE: the arrays are embedded in the tf.data graph, which auto-sharding serializes,
    and a serialized graph must stay under protobuf's 2 GB limit. Larger datasets need a
    file-based source.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.deterministic = True

    x_train = tf.constant(arrays["x_train"].astype(np.float32))
    y_train = tf.constant(arrays["y_train"])
    num_train = len(arrays["x_train"])

    # Shuffling indices keeps the shuffle buffer small whatever the size of an example.
    train = (
        tf.data.Dataset.range(num_train)
        .shuffle(num_train, seed=config.shuffle_seed + initial_epoch, reshuffle_each_iteration=True)
        .batch(config.batch_size, drop_remainder=True)
        .map(lambda index: (tf.gather(x_train, index), tf.gather(y_train, index)))
        .prefetch(tf.data.AUTOTUNE)
        .with_options(options)
    )
    val = (
        tf.data.Dataset.from_tensor_slices((arrays["x_val"].astype(np.float32), arrays["y_val"]))
        .batch(config.batch_size)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(options)
    )
    return train, val


def save_final_model(model_path: Path, weights_path: Path, config: TrainingConfig, target: Path) -> None:
    """Write the trained model as a ``.keras`` file outside the distribution strategy.

    The model is rebuilt from the bundle's file and loaded from the final checkpoint, so
    the saved file matches the checkpoint exactly and saving needs no collective with the
    other workers.
    """
    model = bundle.load_keras_model(model_path)
    compile_model(model, config)
    load_checkpoint(model, weights_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        model.save(str(partial))
        os.replace(partial, target)


class _ProgressCallback(keras.callbacks.Callback):
    """Saves a checkpoint after every epoch and reports progress as events."""

    def __init__(
        self,
        *,
        workdir: Path,
        events: EventWriter,
        start_time: float,
        on_first_step: Callable[[], None],
    ) -> None:
        super().__init__()
        self._workdir = workdir
        self._events = events
        self._start_time = start_time
        self._on_first_step = on_first_step
        self._first_step_done = False
        self._epoch_start = 0.0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._first_step_done:
            return
        self._first_step_done = True
        self._on_first_step()
        now = time.time()
        self._events.emit("first_step", time=now, elapsed_s=round(now - self._start_time, 3))

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_start = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = {name: float(value) for name, value in (logs or {}).items()}
        completed = epoch + 1
        path = checkpoint_path(self._workdir, completed)
        # Write under a temporary name first, so that a reader never sees a partial file.
        # Keras picks the file format from the ".weights.h5" suffix, so the temporary name keeps it.
        partial = path.with_name(f".partial-{path.name}")
        self.model.save_weights(str(partial))
        os.replace(partial, path)

        steps = int(self.model.optimizer.iterations.numpy())
        logger.info(
            "Epoch %d done in %.2f s: step %d, loss %.4f, val_loss %.4f; checkpoint %s",
            completed,
            time.monotonic() - self._epoch_start,
            steps,
            logs.get("loss", float("nan")),
            logs.get("val_loss", float("nan")),
            path,
        )
        self._events.emit(
            "checkpoint",
            epoch=completed,
            steps=steps,
            path=str(path),
            sha256=sha256_file(path),
            loss=logs.get("loss"),
            val_loss=logs.get("val_loss"),
            val_accuracy=logs.get("val_accuracy"),
            metrics=logs,
        )
