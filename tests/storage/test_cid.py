"""Local CID computation, checked against fixed vectors and against a real js-ipfs node."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path

import ipfshttpclient
import pytest

from deepmarket.errors import ConfigError
from deepmarket.storage.cid import (
    CHUNK_SIZE,
    MAX_LINKS,
    FileCidBuilder,
    compute_cid,
    compute_file_cid,
    normalize_cid,
    parse_cid,
)
from deepmarket.storage.node import IpfsNode

MIB = 1024 * 1024

# CIDs that js-ipfs 0.66.1 returned for these bytes; Kubo returns the same ones.
KNOWN_CIDS = [
    pytest.param(b"", 1, "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku", id="empty-v1"),
    pytest.param(b"hello", 1, "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq", id="hello-v1"),
    pytest.param(b"", 0, "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH", id="empty-v0"),
    pytest.param(b"hello", 0, "QmWfVY9y3xjsixTgbd9AorQxH7VtMpzfx2HaWtsoUYecaX", id="hello-v0"),
    pytest.param(b"x" * 600_000, 0, "QmWaFjtmiNKM4z2GkDuVqoLhyBdq5amu7cP2jCYYxzvG8F", id="3-chunks-v0"),
]

# Sizes at every boundary of the layout: one chunk, several, a full first level of
# MAX_LINKS leaves, one leaf more (a second tree level) and a file of about 45 MiB.
NODE_SIZES = {
    "empty": 0,
    "one-byte": 1,
    "tiny": 5,
    "chunk-minus-1": CHUNK_SIZE - 1,
    "one-chunk": CHUNK_SIZE,
    "chunk-plus-1": CHUNK_SIZE + 1,
    "1MiB-plus-1": MIB + 1,
    "174-chunks": MAX_LINKS * CHUNK_SIZE,
    "175-chunks": MAX_LINKS * CHUNK_SIZE + 1,
    "45MiB": 45 * MIB,
}


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module")
def node_client(ipfs_node: IpfsNode) -> Iterator[ipfshttpclient.Client]:
    """A plain ipfshttpclient client, so the node's CIDs do not pass through IpfsStore."""
    client = ipfshttpclient.Client(ipfs_node.api_multiaddr, session=True)
    try:
        yield client
    finally:
        client.close()


def add_to_node(client: ipfshttpclient.Client, data: bytes, cid_version: int) -> str:
    options = {"cid_version": 1, "raw_leaves": True} if cid_version == 1 else {}
    response = client.add(io.BytesIO(data), pin=False, **options)
    return normalize_cid(response["Hash"])


@pytest.mark.parametrize(("data", "cid_version", "expected"), KNOWN_CIDS)
def test_compute_cid_known_vectors(data: bytes, cid_version: int, expected: str) -> None:
    assert compute_cid(data, cid_version) == expected


@pytest.mark.parametrize("piece_size", [1, 1000, CHUNK_SIZE - 7, CHUNK_SIZE, 3 * CHUNK_SIZE + 5])
def test_builder_independent_of_piece_size(piece_size: int) -> None:
    data = random_bytes(3 * CHUNK_SIZE + 17)
    builder = FileCidBuilder()
    for start in range(0, len(data), piece_size):
        builder.update(data[start : start + piece_size])

    assert builder.cid() == compute_cid(data)


def test_builder_cid_is_stable_and_final() -> None:
    builder = FileCidBuilder()
    builder.update(b"abc")
    first = builder.cid()

    assert builder.cid() == first
    with pytest.raises(ConfigError, match="after cid"):
        builder.update(b"more")


def test_builder_rejects_unknown_version() -> None:
    with pytest.raises(ConfigError, match="CID version 2"):
        FileCidBuilder(2)


def test_compute_file_cid_matches_bytes(tmp_path: Path) -> None:
    data = random_bytes(2 * CHUNK_SIZE + 3)
    path = tmp_path / "data.bin"
    path.write_bytes(data)

    assert compute_file_cid(path) == compute_cid(data)
    assert compute_file_cid(path, 0) == compute_cid(data, 0)


def test_normalize_cid_converts_to_base32() -> None:
    base58_v1 = "zb2rhZfjRh2FHHB2RkHVEvL2vJnCTcu7kwRqgVsf9gpkLgteo"

    assert normalize_cid(base58_v1) == "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
    assert normalize_cid("QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH") == (
        "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
    )


@pytest.mark.parametrize(
    "value", ["", "hello", "bafy", "Qm123", "/ipfs/QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"]
)
def test_parse_cid_rejects_invalid(value: str) -> None:
    with pytest.raises(ConfigError, match="Invalid CID"):
        parse_cid(value)


@pytest.mark.integration
@pytest.mark.parametrize("size", list(NODE_SIZES.values()), ids=list(NODE_SIZES))
def test_cidv1_matches_node(node_client: ipfshttpclient.Client, size: int) -> None:
    data = random_bytes(size, seed=size)

    assert compute_cid(data) == add_to_node(node_client, data, cid_version=1)


@pytest.mark.integration
@pytest.mark.parametrize(
    "size",
    [NODE_SIZES[name] for name in ("empty", "tiny", "one-chunk", "1MiB-plus-1", "175-chunks")],
    ids=["empty", "tiny", "one-chunk", "1MiB-plus-1", "175-chunks"],
)
def test_cidv0_matches_node(node_client: ipfshttpclient.Client, size: int) -> None:
    data = random_bytes(size, seed=size + 1)

    assert compute_cid(data, 0) == add_to_node(node_client, data, cid_version=0)
