"""Shared fixtures for the training tests: the digits demo bundle, written once per session."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from deepmarket.training import digits
from deepmarket.training.bundle import TrainingConfig, write_config


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> digits.DemoInputs:
    """The digits demo bundle: model, borrower and lender datasets, 5-epoch config."""
    return digits.write_demo_inputs(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def short_config(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainingConfig, Path]:
    """The demo config cut to 2 epochs, to keep multi-worker runs short."""
    config = dataclasses.replace(digits.DEMO_CONFIG, epochs=2)
    return config, write_config(config, tmp_path_factory.mktemp("config") / "config-2-epochs.json")
