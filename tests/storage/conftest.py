"""Fixtures that run a real js-ipfs daemon on free ports in a temporary directory."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepmarket.storage.node import LOG_FILE_NAME, IpfsNode
from deepmarket.storage.store import IpfsStore


@pytest.fixture(scope="session")
def ipfs_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IpfsNode]:
    """One daemon shared by the whole session, stopped even when a test or the start fails."""
    node = IpfsNode(tmp_path_factory.mktemp("ipfs") / "repo")
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture
def store(ipfs_node: IpfsNode) -> Iterator[IpfsStore]:
    with IpfsStore(ipfs_node.api_multiaddr, resolve_timeout_s=2.0) as store:
        yield store


@pytest.fixture(scope="session")
def repo_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised repo to copy, which saves each test the 2 s of ``jsipfs init``."""
    node = IpfsNode(tmp_path_factory.mktemp("ipfs-template") / "repo")
    try:
        node.start()
    finally:
        node.stop()
    (node.repo_dir / LOG_FILE_NAME).unlink()
    return node.repo_dir


@pytest.fixture
def own_node(tmp_path: Path, repo_template: Path) -> Iterator[IpfsNode]:
    """A daemon for one test that stops, kills or restarts it; not started yet."""
    shutil.copytree(repo_template, tmp_path / "repo")
    node = IpfsNode(tmp_path / "repo")
    try:
        yield node
    finally:
        node.stop()
