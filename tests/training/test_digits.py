"""Digits demo workload: the data split, the model and held-out evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from deepmarket.errors import BundleError
from deepmarket.training import bundle, digits


def test_splits_are_stratified_and_disjoint() -> None:
    splits = digits.load_splits()

    sizes = {name: len(array) for name, array in splits.items() if name.startswith("x_")}
    assert sizes == {"x_train": 1257, "x_val": 180, "x_test": 360}
    for split in ("train", "val", "test"):
        x = splits[f"x_{split}"]
        assert x.dtype == np.float32
        assert x.shape[1] == 64
        assert x.min() >= 0.0
        assert x.max() <= 1.0
        # Stratified: every split has each digit in roughly its 10% share.
        counts = np.bincount(splits[f"y_{split}"], minlength=10)
        assert counts.min() >= 0.08 * len(x), counts
    train_rows = {row.tobytes() for row in splits["x_train"]}
    assert not any(row.tobytes() in train_rows for row in splits["x_test"])


def test_splits_are_reproducible() -> None:
    first, second = digits.load_splits(seed=3), digits.load_splits(seed=3)

    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_demo_inputs_are_valid(demo: digits.DemoInputs) -> None:
    config = bundle.load_config(demo.config_path)

    assert config == digits.DEMO_CONFIG
    bundle.validate_bundle(demo.model_path, demo.dataset_path, config, require_test=True)
    bundle.validate_bundle(demo.model_path, demo.lender_dataset_path, config)
    assert "x_test" not in bundle.load_dataset(demo.lender_dataset_path)


def test_untrained_model_scores_near_chance(demo: digits.DemoInputs) -> None:
    accuracy = digits.evaluate(demo.model_path, demo.dataset_path)

    assert 0.0 <= accuracy < 0.5


def test_evaluate_requires_held_out_arrays(demo: digits.DemoInputs) -> None:
    with pytest.raises(BundleError, match="has no x_test/y_test"):
        digits.evaluate(demo.model_path, demo.lender_dataset_path)
