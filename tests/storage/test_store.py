"""IpfsStore against a real js-ipfs node: round trips, pins, verification and failures."""

from __future__ import annotations

import io
import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ipfshttpclient
import pytest

from deepmarket.errors import ConfigError, ContentMismatchError, StorageError
from deepmarket.storage.cid import CHUNK_SIZE, compute_cid
from deepmarket.storage.node import IpfsNode, find_free_port
from deepmarket.storage.store import IpfsStore, canonical_json

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def never_added_cid() -> str:
    """Return a valid CID of content that no test adds, so no node has it."""
    return compute_cid(f"never added {uuid.uuid4()}".encode())


def flip_first_byte(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:]


@pytest.fixture
def corrupting_store(store: IpfsStore, monkeypatch: pytest.MonkeyPatch) -> IpfsStore:
    """The store, with the client's cat flipping the first byte the node sends."""
    original_cat = store._client.cat

    def corrupted_cat(cid: str, *args: Any, **kwargs: Any) -> Any:
        result = original_cat(cid, *args, **kwargs)
        if not kwargs.get("stream"):
            return flip_first_byte(result)

        def corrupted_stream() -> Iterator[bytes]:
            pieces = iter(result)
            yield flip_first_byte(next(pieces))
            yield from pieces

        return corrupted_stream()

    monkeypatch.setattr(store._client, "cat", corrupted_cat)
    return store


# Round trips


@pytest.mark.parametrize(
    "size", [0, 5, CHUNK_SIZE, MIB + 1], ids=["empty", "tiny", "one-chunk", "1MiB-plus-1"]
)
def test_add_bytes_then_cat(store: IpfsStore, size: int) -> None:
    data = random_bytes(size, seed=size)

    cid = store.add_bytes(data)

    assert cid == compute_cid(data)
    assert cid.startswith("b")
    assert store.cat(cid) == data


def test_add_file_then_get_file(store: IpfsStore, tmp_path: Path) -> None:
    data = random_bytes(MIB + 1, seed=1)
    source = tmp_path / "dataset.bin"
    source.write_bytes(data)

    cid = store.add_file(source)
    dest = store.get_file(cid, tmp_path / "fetched" / "nested" / "dataset.bin")

    assert cid == compute_cid(data)
    assert dest == tmp_path / "fetched" / "nested" / "dataset.bin"
    assert dest.read_bytes() == data
    assert sorted(path.name for path in dest.parent.iterdir()) == ["dataset.bin"]


def test_get_file_replaces_existing_file(store: IpfsStore, tmp_path: Path) -> None:
    dest = tmp_path / "checkpoint.h5"
    dest.write_bytes(b"old checkpoint")
    cid = store.add_bytes(b"new checkpoint")

    store.get_file(cid, dest)

    assert dest.read_bytes() == b"new checkpoint"


def test_add_file_missing_path(store: IpfsStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.add_file(tmp_path / "missing.bin")


def test_add_json_is_canonical(store: IpfsStore) -> None:
    cid = store.add_json({"b": [1, 2], "a": "é"})

    assert store.cat(cid) == b'{"a":"\xc3\xa9","b":[1,2]}'
    assert store.get_json(cid) == {"a": "é", "b": [1, 2]}
    assert store.add_json({"a": "é", "b": [1, 2]}) == cid


@pytest.mark.parametrize("value", [{"loss": float("nan")}, {"model": object()}], ids=["nan", "object"])
def test_add_json_rejects_unencodable(store: IpfsStore, value: Any) -> None:
    with pytest.raises(ConfigError, match="canonical JSON"):
        store.add_json(value)


def test_canonical_json_bytes() -> None:
    assert canonical_json({"z": 1, "a": {"y": None, "b": True}}) == b'{"a":{"b":true,"y":null},"z":1}'


def test_get_json_rejects_non_json(store: IpfsStore) -> None:
    cid = store.add_bytes(b"\x00not json")

    with pytest.raises(ConfigError, match=cid):
        store.get_json(cid)


def test_cat_accepts_cidv0_and_base58(store: IpfsStore, ipfs_node: IpfsNode) -> None:
    data = random_bytes(CHUNK_SIZE + 9, seed=2)
    with ipfshttpclient.Client(ipfs_node.api_multiaddr) as client:
        cid_v0 = client.add(io.BytesIO(data), pin=False)["Hash"]
        cid_v1_base58 = client.add(io.BytesIO(data), pin=False, cid_version=1, raw_leaves=True)["Hash"]

    assert cid_v0.startswith("Qm")
    assert cid_v1_base58.startswith("z")
    assert store.cat(cid_v0) == data
    assert store.cat(cid_v1_base58) == data


@pytest.mark.parametrize(
    "value", ["", "not-a-cid", "/ipfs/bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"]
)
def test_fetch_rejects_invalid_cid(store: IpfsStore, value: str) -> None:
    with pytest.raises(ConfigError, match="Invalid CID"):
        store.cat(value)


def test_store_rejects_invalid_api_address() -> None:
    with pytest.raises(ConfigError, match="Invalid IPFS API address"):
        IpfsStore("127.0.0.1:5001")


# Pinning


def test_add_pins_by_default(store: IpfsStore) -> None:
    cid = store.add_bytes(random_bytes(100, seed=3))

    assert store.is_pinned(cid)


def test_add_without_pin(store: IpfsStore) -> None:
    cid = store.add_bytes(random_bytes(100, seed=4), pin=False)

    assert not store.is_pinned(cid)
    assert store.cat(cid) == random_bytes(100, seed=4)


def test_pin_unpin_cycle(store: IpfsStore) -> None:
    cid = store.add_bytes(random_bytes(MIB + 1, seed=5), pin=False)

    store.pin(cid)
    assert store.is_pinned(cid)

    assert store.unpin(cid) is True
    assert not store.is_pinned(cid)
    assert store.unpin(cid) is False


def test_leaf_of_pinned_file_is_not_pinned_itself(store: IpfsStore) -> None:
    data = random_bytes(CHUNK_SIZE + 1, seed=6)
    store.add_bytes(data)

    first_leaf = compute_cid(data[:CHUNK_SIZE])

    assert not store.is_pinned(first_leaf)


def test_pin_unknown_cid_times_out(store: IpfsStore) -> None:
    cid = never_added_cid()

    started = time.monotonic()
    with pytest.raises(StorageError, match=cid):
        store.pin(cid)

    assert time.monotonic() - started < store.resolve_timeout_s + 3


def test_is_pinned_unknown_cid(store: IpfsStore) -> None:
    assert not store.is_pinned(never_added_cid())


# Verification


def test_cat_detects_corruption(corrupting_store: IpfsStore) -> None:
    data = random_bytes(MIB + 1, seed=7)
    cid = corrupting_store.add_bytes(data)

    with pytest.raises(ContentMismatchError, match=cid):
        corrupting_store.cat(cid)


def test_get_file_detects_corruption(corrupting_store: IpfsStore, tmp_path: Path) -> None:
    cid = corrupting_store.add_bytes(random_bytes(MIB + 1, seed=8))
    dest = tmp_path / "dataset.bin"

    with pytest.raises(ContentMismatchError, match=cid):
        corrupting_store.get_file(cid, dest)

    assert list(tmp_path.iterdir()) == []


def test_get_json_detects_corruption(corrupting_store: IpfsStore) -> None:
    cid = corrupting_store.add_json({"epochs": 3})

    with pytest.raises(ContentMismatchError, match=cid):
        corrupting_store.get_json(cid)


# Failures


@pytest.mark.parametrize("operation", ["cat", "get_file", "get_json"])
def test_unresolved_cid_times_out(store: IpfsStore, tmp_path: Path, operation: str) -> None:
    cid = never_added_cid()
    fetch = {
        "cat": lambda: store.cat(cid),
        "get_file": lambda: store.get_file(cid, tmp_path / "out.bin"),
        "get_json": lambda: store.get_json(cid),
    }[operation]

    started = time.monotonic()
    with pytest.raises(StorageError, match="did not resolve within 2 s") as raised:
        fetch()
    elapsed_s = time.monotonic() - started

    assert cid in str(raised.value)
    assert not isinstance(raised.value, ContentMismatchError)
    assert store.resolve_timeout_s <= elapsed_s < store.resolve_timeout_s + 3
    assert list(tmp_path.iterdir()) == []


def test_unreachable_api_retries_then_fails(caplog: pytest.LogCaptureFixture) -> None:
    closed_port = find_free_port()
    api_addr = f"/ip4/127.0.0.1/tcp/{closed_port}/http"
    store = IpfsStore(api_addr, connect_attempts=3, backoff_s=0.05)
    caplog.set_level(logging.WARNING, logger="deepmarket.storage.store")

    started = time.monotonic()
    with pytest.raises(StorageError, match="unreachable after 3 attempts") as raised:
        store.add_bytes(b"checkpoint")
    elapsed_s = time.monotonic() - started

    message = str(raised.value)
    assert api_addr in message
    assert "Start the IPFS node" in message
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "attempt 1 of 3" in warnings[0]
    assert "attempt 2 of 3" in warnings[1]
    # Backoff of 0.05 s, then 0.1 s.
    assert elapsed_s >= 0.15


def test_unreachable_api_fails_fetch(caplog: pytest.LogCaptureFixture) -> None:
    api_addr = f"/ip4/127.0.0.1/tcp/{find_free_port()}/http"
    store = IpfsStore(api_addr, connect_attempts=2, backoff_s=0.01)
    cid = compute_cid(b"hello")

    with pytest.raises(StorageError, match="unreachable after 2 attempts") as raised:
        store.cat(cid)

    assert api_addr in str(raised.value)
    assert any(cid in record.getMessage() for record in caplog.records)


def test_retry_succeeds_once_node_starts(own_node: IpfsNode) -> None:
    # Initialise the repo first, so that the start below takes about 2 s instead of 4 s.
    own_node.start()
    own_node.stop()
    store = IpfsStore(own_node.api_multiaddr, connect_attempts=8, backoff_s=0.25)
    starter = threading.Thread(target=own_node.start)

    starter.start()
    try:
        # Waits up to 0.25 * (2**7 - 1) s in total, far longer than the node needs to start.
        cid = store.add_bytes(b"added while the node was starting")
    finally:
        starter.join()

    assert store.cat(cid) == b"added while the node was starting"
