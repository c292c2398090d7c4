"""Demo workload: scikit-learn's handwritten digits and a small dense classifier.

The data ships with scikit-learn (``load_digits``: 1797 grayscale 8x8 images of the
digits 0-9), so the demo runs offline. Pixels are scaled to [0, 1] and split, stratified
and with a fixed seed, into train, validation and held-out test sets.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepmarket.errors import BundleError
from deepmarket.training.bundle import (
    OptimizerConfig,
    TrainingConfig,
    import_tf_keras,
    load_dataset,
    load_keras_model,
    write_config,
    write_lender_dataset,
    write_npz,
)

logger = logging.getLogger(__name__)

NUM_FEATURES = 64
NUM_CLASSES = 10
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1
DEFAULT_SEED = 0

DEMO_CONFIG = TrainingConfig(
    epochs=5,
    batch_size=32,
    optimizer=OptimizerConfig(name="adam", learning_rate=0.01),
    loss="sparse_categorical_crossentropy",
    metrics=("accuracy",),
    shuffle_seed=DEFAULT_SEED,
)


@dataclass(frozen=True)
class DemoInputs:
    """Paths of the demo bundle files written by :func:`write_demo_inputs`."""

    model_path: Path
    dataset_path: Path
    lender_dataset_path: Path
    config_path: Path


def load_splits(seed: int = DEFAULT_SEED) -> dict[str, np.ndarray]:
    """Return the digits as ``x_*`` (float32, N x 64, in [0, 1]) and ``y_*`` (int32) arrays.

    The held-out test set is 20% of the images and the validation set 10%, both
    stratified by class. The remaining 1257 images form the training set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)

    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed
    )
    val_share_of_rest = VAL_FRACTION / (1 - TEST_FRACTION)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_share_of_rest, stratify=y_rest, random_state=seed
    )
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_val": x_val,
        "y_val": y_val,
        "x_test": x_test,
        "y_test": y_test,
    }


def build_model(seed: int = DEFAULT_SEED) -> Any:
    """Build the uncompiled tf_keras classifier: 64 inputs, one hidden ReLU layer, softmax over 10 classes."""
    keras = import_tf_keras()
    return keras.Sequential(
        [
            keras.Input(shape=(NUM_FEATURES,), name="pixels"),
            keras.layers.Dense(
                64,
                activation="relu",
                kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                name="hidden",
            ),
            keras.layers.Dense(
                NUM_CLASSES,
                activation="softmax",
                kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1),
                name="digit",
            ),
        ],
        name="digits_mlp",
    )


def write_demo_inputs(directory: str | os.PathLike[str], *, seed: int = DEFAULT_SEED) -> DemoInputs:
    """Write the demo model, datasets and config into ``directory`` and return their paths.

    ``dataset.npz`` is the borrower's copy with the held-out test set;
    ``dataset-lender.npz`` is the copy without it that lenders train on.
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    inputs = DemoInputs(
        model_path=target / "model.keras",
        dataset_path=target / "dataset.npz",
        lender_dataset_path=target / "dataset-lender.npz",
        config_path=target / "config.json",
    )
    build_model(seed).save(inputs.model_path)
    write_npz(inputs.dataset_path, load_splits(seed))
    write_lender_dataset(inputs.dataset_path, inputs.lender_dataset_path)
    write_config(DEMO_CONFIG, inputs.config_path)
    logger.info("Wrote the digits demo bundle to %s", target)
    return inputs


def evaluate(
    model_or_weights_path: str | os.PathLike[str],
    dataset_path: str | os.PathLike[str],
    *,
    model_path: str | os.PathLike[str] | None = None,
) -> float:
    """Return the accuracy of a trained model on the dataset's held-out ``x_test``/``y_test``.

    ``model_or_weights_path`` is either a ``.keras`` model or a ``.weights.h5`` checkpoint.
    A checkpoint's weights go into the architecture of ``model_path`` when given, else into
    :func:`build_model`.
    """
    arrays = load_dataset(dataset_path)
    if "x_test" not in arrays or "y_test" not in arrays:
        raise BundleError(
            f"dataset {dataset_path} has no x_test/y_test; evaluate on the borrower's copy, not the lender's"
        )

    path = Path(model_or_weights_path)
    if path.name.endswith(".weights.h5"):
        model = load_keras_model(model_path) if model_path is not None else build_model()
        # The uncompiled model has no optimizer or metrics, so their state in the file is skipped.
        model.load_weights(path)
    else:
        model = load_keras_model(path)

    probabilities = model.predict(arrays["x_test"], verbose=0)
    predictions = np.argmax(probabilities, axis=-1)
    return float(np.mean(predictions == arrays["y_test"].reshape(-1)))
