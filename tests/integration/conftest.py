"""Fixtures for the integration tests: one local marketplace (chain, IPFS node, contracts and a
running coordinator) for the whole session, the digits bundle, and a per-test handle."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from market_support import MarketTest, wait_until

from deepmarket.localnet import LocalMarketplace
from deepmarket.training import digits


@pytest.fixture(scope="session")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMarketplace]:
    """The shared marketplace with its coordinator running, stopped even when a test or the start fails."""
    marketplace = LocalMarketplace(tmp_path_factory.mktemp("marketplace"))
    try:
        marketplace.start()
        marketplace.start_coordinator()
        wait_until(marketplace, lambda: "coordinator started" in marketplace.log_tail("coordinator"), 120,
                   "the coordinator to start")
        yield marketplace
    finally:
        marketplace.stop()


@pytest.fixture(scope="session")
def demo_inputs(tmp_path_factory: pytest.TempPathFactory) -> digits.DemoInputs:
    """The digits model, the borrower's dataset (with the held-out test split) and the lender copy."""
    return digits.write_demo_inputs(tmp_path_factory.mktemp("borrower"))


@pytest.fixture
def market(net: LocalMarketplace) -> Iterator[MarketTest]:
    """Yield this test's handle, then end its jobs and stop its lenders, also when the test fails."""
    handle = MarketTest(net)
    try:
        yield handle
    finally:
        handle.cleanup()
