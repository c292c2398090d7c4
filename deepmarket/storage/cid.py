"""Compute the CID that an IPFS node's ``add`` assigns to a file, without a node.

The layout reproduced here is the one Kubo and js-ipfs use by default. The bytes are cut into
fixed 256 KiB chunks and each chunk becomes a leaf. Leaves are joined into a balanced DAG of
UnixFS ``File`` nodes with at most 174 links each, and every block is hashed with sha2-256.
A CIDv1 file uses raw leaves (codec ``raw``) and a CIDv0 file dag-pb leaves, which is what
both nodes do unless told otherwise. A file that fits in one chunk is its own root.

Content added with another chunker, the trickle layout or other leaf settings gets a
different CID, so :func:`compute_cid` cannot reproduce it.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

import cid as pycid

from deepmarket.errors import ConfigError

CHUNK_SIZE = 256 * 1024
MAX_LINKS = 174

RAW_CODEC = 0x55
DAG_PB_CODEC = 0x70
SHA2_256_CODE = 0x12

# UnixFS ``Data.DataType.File``.
_UNIXFS_FILE = 2
_READ_SIZE = 1024 * 1024


@dataclass(frozen=True)
class _DagNode:
    """One node of the file DAG as its parent links to it."""

    cid: bytes  # binary CID: the bare multihash for CIDv0, version + codec + multihash for CIDv1
    tsize: int  # size of the encoded block plus the tsize of every node below it
    file_size: int  # bytes of file content under this node


class FileCidBuilder:
    """Incremental CID of a file's bytes, fed in pieces of any size.

    >>> builder = FileCidBuilder()
    >>> builder.update(b"hel")
    >>> builder.update(b"lo")
    >>> builder.cid()
    'bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq'

    Memory stays bounded by one chunk plus one pending node per link, per tree level.

    :param cid_version: 1 for raw leaves and a base32 CIDv1, 0 for dag-pb leaves and a
        base58btc CIDv0.
    """

    def __init__(self, cid_version: int = 1) -> None:
        if cid_version not in (0, 1):
            raise ConfigError(f"Unsupported CID version {cid_version!r}: use 0 or 1.")
        self._cid_version = cid_version
        self._buffer = bytearray()
        self._leaf_count = 0
        # _levels[0] contains leaves, and _levels[k] the nodes k levels above the leaves.
        self._levels: list[list[_DagNode]] = [[]]
        self._result: str | None = None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` to the file content."""
        if self._result is not None:
            raise ConfigError("FileCidBuilder.update() called after cid(); create a new builder.")
        self._buffer += data
        if len(self._buffer) < CHUNK_SIZE:
            return
        whole = len(self._buffer) - len(self._buffer) % CHUNK_SIZE
        view = memoryview(self._buffer)
        for start in range(0, whole, CHUNK_SIZE):
            self._add_leaf(bytes(view[start : start + CHUNK_SIZE]))
        view.release()
        del self._buffer[:whole]

    def cid(self) -> str:
        """Finish the DAG and return the root CID, base32 for CIDv1, base58btc for CIDv0.

        Later calls return the same string.
        """
        if self._result is None:
            # An empty file is still one (empty) leaf, as the nodes store it.
            if self._buffer or self._leaf_count == 0:
                self._add_leaf(bytes(self._buffer))
                self._buffer.clear()
            self._result = encode_cid(self._finish().cid)
        return self._result

    def _add_leaf(self, chunk: bytes) -> None:
        if self._cid_version == 1:
            leaf = _DagNode(_make_cid(RAW_CODEC, chunk, 1), len(chunk), len(chunk))
        else:
            block = _encode_pb_node([], _encode_unixfs_file(len(chunk), [], chunk))
            leaf = _DagNode(_make_cid(DAG_PB_CODEC, block, 0), len(block), len(chunk))
        self._leaf_count += 1
        self._push(0, leaf)

    def _push(self, level: int, node: _DagNode) -> None:
        # A full group of MAX_LINKS nodes is final: the nodes batch each level in order, so
        # it becomes one parent one level up, and only the last group of a level is partial.
        if level == len(self._levels):
            self._levels.append([])
        self._levels[level].append(node)
        if len(self._levels[level]) == MAX_LINKS:
            parent = self._make_parent(self._levels[level])
            self._levels[level] = []
            self._push(level + 1, parent)

    def _finish(self) -> _DagNode:
        # Fold the partial group of each level into a parent, bottom up, until one node is
        # left. A lone node becomes the root only when no level above it contains a node.
        level = 0
        while True:
            pending = self._levels[level]
            has_higher = any(self._levels[level + 1 :])
            if len(pending) == 1 and not has_higher:
                return pending[0]
            if pending:
                self._levels[level] = []
                self._push(level + 1, self._make_parent(pending))
            level += 1

    def _make_parent(self, children: list[_DagNode]) -> _DagNode:
        file_size = sum(child.file_size for child in children)
        data = _encode_unixfs_file(file_size, [child.file_size for child in children], b"")
        block = _encode_pb_node(children, data)
        tsize = len(block) + sum(child.tsize for child in children)
        return _DagNode(_make_cid(DAG_PB_CODEC, block, self._cid_version), tsize, file_size)


def compute_cid(data: bytes | bytearray | memoryview, cid_version: int = 1) -> str:
    """Return the CID a node's ``add`` gives ``data`` with default chunking and layout.

    :param cid_version: 1 (raw leaves, base32 result) or 0 (dag-pb leaves, base58btc result).
    """
    builder = FileCidBuilder(cid_version)
    builder.update(data)
    return builder.cid()


def compute_file_cid(path: str | Path, cid_version: int = 1) -> str:
    """Return the CID a node's ``add`` gives the file at ``path``, read in 1 MiB pieces."""
    builder = FileCidBuilder(cid_version)
    with open(path, "rb") as file:
        while piece := file.read(_READ_SIZE):
            builder.update(piece)
    return builder.cid()


def parse_cid(value: str) -> pycid.CIDv0 | pycid.CIDv1:
    """Parse a CID string in any multibase, raising :class:`ConfigError` if it is invalid.

    Paths such as ``/ipfs/<cid>/file`` are rejected: pass the bare CID.
    """
    if not isinstance(value, str) or not value or "/" in value:
        raise ConfigError(f"Invalid CID {value!r}: expected a bare CID string such as 'bafy...'.")
    try:
        return pycid.from_string(value)
    except Exception as error:  # py-cid and py-multihash raise several unrelated types
        raise ConfigError(f"Invalid CID {value!r}: {error}.") from error


def normalize_cid(value: str) -> str:
    """Return ``value`` in the canonical text form: base32 for CIDv1, base58btc for CIDv0."""
    return encode_cid(parse_cid(value).buffer)


def encode_cid(binary: bytes) -> str:
    """Return the text form of a binary CID: base32 for CIDv1, base58btc for CIDv0."""
    if binary[0] == 0x01:
        return "b" + base64.b32encode(binary).decode("ascii").lower().rstrip("=")
    return pycid.CIDv0(binary).encode().decode("ascii")


def _make_cid(codec: int, block: bytes, cid_version: int) -> bytes:
    multihash = bytes([SHA2_256_CODE, 32]) + hashlib.sha256(block).digest()
    if cid_version == 0:
        return multihash
    return bytes([0x01]) + _varint(codec) + multihash


def _encode_unixfs_file(file_size: int, block_sizes: list[int], data: bytes) -> bytes:
    # UnixFS Data message: Type = 1, Data = 2, filesize = 3, blocksizes = 4 (repeated, unpacked).
    # The nodes omit an empty Data field but always write filesize.
    out = bytearray(_varint_field(1, _UNIXFS_FILE))
    if data:
        out += _bytes_field(2, data)
    out += _varint_field(3, file_size)
    for size in block_sizes:
        out += _varint_field(4, size)
    return bytes(out)


def _encode_pb_node(links: list[_DagNode], data: bytes) -> bytes:
    # dag-pb PBNode: Links = 2 come before Data = 1 in the canonical encoding. Each PBLink is
    # Hash = 1, Name = 2 (written empty), Tsize = 3.
    out = bytearray()
    for link in links:
        encoded_link = _bytes_field(1, link.cid) + _bytes_field(2, b"") + _varint_field(3, link.tsize)
        out += _bytes_field(2, encoded_link)
    out += _bytes_field(1, data)
    return bytes(out)


def _bytes_field(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
