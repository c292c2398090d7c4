"""Add and fetch datasets, job bundles and checkpoints by CID through an IPFS node's HTTP API.

Every add uses CIDv1 with raw leaves, 256 KiB chunks and the balanced layout, and returns the
CID in base32. Every fetch recomputes the CID of the bytes it received (see
:mod:`deepmarket.storage.cid`) and raises :class:`ContentMismatchError` if it differs, so a
caller gets either the content it requested or an exception.

Errors::

    ConfigError             a CID string is invalid, or an argument cannot be stored
    StorageError            the API is unreachable, a CID does not resolve in time, a request fails
    └── ContentMismatchError   fetched bytes do not hash to the requested CID
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import ipfshttpclient
import requests
from ipfshttpclient import exceptions as ipfs_errors

from deepmarket.errors import ConfigError, ContentMismatchError, StorageError
from deepmarket.storage.cid import (
    CHUNK_SIZE,
    FileCidBuilder,
    compute_cid,
    compute_file_cid,
    encode_cid,
    normalize_cid,
    parse_cid,
)

logger = logging.getLogger(__name__)

# ipfshttpclient 0.8.0a2 passes urllib3's removed `strict` argument on every request; the
# FutureWarning it triggers is not about DeepMarket and would flood the output.
warnings.filterwarnings("ignore", message="The 'strict' parameter is no longer needed", category=FutureWarning)

T = TypeVar("T")

_CONNECT_TIMEOUT_S = 5.0
# Extra HTTP wait beyond the node's own timeout, so that the node's error message arrives first.
_NODE_TIMEOUT_GRACE_S = 5.0
_ADD_OPTIONS: dict[str, Any] = {"cid_version": 1, "raw_leaves": True, "chunker": f"size-{CHUNK_SIZE}"}


class IpfsStore:
    """Content-addressed storage on one IPFS node, reached through its HTTP RPC API.

    >>> store = IpfsStore("/ip4/127.0.0.1/tcp/5001/http")
    >>> cid = store.add_json({"epochs": 3})
    >>> store.get_json(cid)
    {'epochs': 3}

    :param api_addr: multiaddr of the node's RPC API, e.g. ``/ip4/127.0.0.1/tcp/5001/http``.
    :param resolve_timeout_s: seconds a fetch or pin waits for a CID to resolve, and the longest
        pause allowed while content streams in.
    :param request_timeout_s: seconds an add, pin or unpin may wait for the node's response.
    :param connect_attempts: attempts per request while the API refuses connections.
    :param backoff_s: wait before the second attempt, doubled for each later one.
    """

    def __init__(
        self,
        api_addr: str,
        *,
        resolve_timeout_s: float = 30.0,
        request_timeout_s: float = 600.0,
        connect_attempts: int = 4,
        backoff_s: float = 0.5,
    ) -> None:
        if connect_attempts < 1:
            raise ConfigError(f"connect_attempts must be at least 1, got {connect_attempts}.")
        if resolve_timeout_s <= 0 or request_timeout_s <= 0 or backoff_s < 0:
            raise ConfigError(
                f"Invalid IpfsStore timing: resolve_timeout_s={resolve_timeout_s}, "
                f"request_timeout_s={request_timeout_s}, backoff_s={backoff_s}."
            )
        self.api_addr = api_addr
        self.resolve_timeout_s = resolve_timeout_s
        self.request_timeout_s = request_timeout_s
        self.connect_attempts = connect_attempts
        self.backoff_s = backoff_s
        try:
            # The constructor skips the version query that connect() makes: ipfshttpclient
            # 0.8.0a2 warns about every current daemon version.
            self._client = ipfshttpclient.Client(api_addr, session=True)
        except ipfs_errors.AddressError as error:
            raise ConfigError(
                f"Invalid IPFS API address {api_addr!r}: expected a multiaddr such as "
                "/ip4/127.0.0.1/tcp/5001/http."
            ) from error

    # Adding content

    def add_bytes(self, data: bytes | bytearray | memoryview, *, pin: bool = True) -> str:
        """Add ``data`` as one file and return its CID (base32 CIDv1); pinned unless ``pin`` is False."""
        content = bytes(data)
        expected = compute_cid(content)
        cid = self._add(lambda: io.BytesIO(content), expected, pin)
        logger.info("Added CID %s (%d bytes, pinned: %s)", cid, len(content), pin)
        return cid

    def add_file(self, path: str | os.PathLike[str], *, pin: bool = True) -> str:
        """Add the file at ``path`` and return its CID (base32 CIDv1); pinned unless ``pin`` is False.

        :raises OSError: if ``path`` is missing, a directory or unreadable.
        """
        path = Path(path)
        expected = compute_file_cid(path)
        cid = self._add(lambda: str(path), expected, pin)
        logger.info("Added CID %s from %s (%d bytes, pinned: %s)", cid, path, path.stat().st_size, pin)
        return cid

    def add_json(self, obj: Any, *, pin: bool = True) -> str:
        """Add ``obj`` as canonical JSON (see :func:`canonical_json`) and return its CID."""
        return self.add_bytes(canonical_json(obj), pin=pin)

    # Fetching content

    def cat(self, cid: str) -> bytes:
        """Return the content of ``cid`` after checking that it hashes to ``cid``.

        :raises ContentMismatchError: if the bytes from the node hash to another CID.
        :raises StorageError: if ``cid`` does not resolve within ``resolve_timeout_s``.
        """
        cid, version = self._parse(cid)
        self._resolve(cid)
        data: bytes = self._call(
            "cat",
            cid,
            lambda: self._client.cat(cid, timeout=(_CONNECT_TIMEOUT_S, self.resolve_timeout_s)),
        )
        self._verify(cid, compute_cid(data, version), len(data))
        logger.debug("Fetched CID %s (%d bytes)", cid, len(data))
        return data

    def get_file(self, cid: str, dest_path: str | os.PathLike[str]) -> Path:
        """Stream the content of ``cid`` into ``dest_path`` and return that path.

        The content goes to a temporary file in the same directory, which replaces
        ``dest_path`` only after the CID check passes; missing parent directories are created.

        :raises ContentMismatchError: if the bytes from the node hash to another CID.
        :raises StorageError: if ``cid`` does not resolve, or the stream pauses for longer than
            ``resolve_timeout_s``.
        """
        cid, version = self._parse(cid)
        dest = Path(dest_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._resolve(cid)

        builder = FileCidBuilder(version)
        size = 0
        # Created like any new file, so the umask sets its mode; the random part keeps
        # concurrent fetches to the same path apart.
        temporary_path = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        temporary_path.touch(exist_ok=False)
        try:
            with open(temporary_path, "wb") as temporary:
                stream = self._call(
                    "cat",
                    cid,
                    lambda: self._client.cat(
                        cid, stream=True, timeout=(_CONNECT_TIMEOUT_S, self.resolve_timeout_s)
                    ),
                )
                for piece in self._read_stream(cid, stream):
                    builder.update(piece)
                    temporary.write(piece)
                    size += len(piece)
            self._verify(cid, builder.cid(), size)
            os.replace(temporary_path, dest)
        finally:
            temporary_path.unlink(missing_ok=True)
        logger.debug("Fetched CID %s into %s (%d bytes)", cid, dest, size)
        return dest

    def get_json(self, cid: str) -> Any:
        """Return the JSON value stored at ``cid``, checked as :meth:`cat` does.

        :raises ConfigError: if the content is not UTF-8 JSON.
        """
        data = self.cat(cid)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise ConfigError(f"Content of CID {cid} is not UTF-8 JSON: {error}.") from error

    # Pinning

    def pin(self, cid: str) -> None:
        """Pin ``cid`` and every block below it, so garbage collection keeps them.

        :raises StorageError: if ``cid`` does not resolve within ``resolve_timeout_s``.
        """
        cid, _ = self._parse(cid)
        self._resolve(cid)
        self._call(
            "pin",
            cid,
            lambda: self._client.pin.add(
                cid,
                opts={"timeout": _duration(self.request_timeout_s)},
                timeout=(_CONNECT_TIMEOUT_S, self.request_timeout_s + _NODE_TIMEOUT_GRACE_S),
            ),
        )
        logger.info("Pinned CID %s", cid)

    def unpin(self, cid: str) -> bool:
        """Remove the pin of ``cid``; return False if ``cid`` was not pinned."""
        cid, _ = self._parse(cid)

        def remove_pin() -> bool:
            try:
                self._client.pin.rm(cid, timeout=(_CONNECT_TIMEOUT_S, self.request_timeout_s))
            except ipfs_errors.ErrorResponse as error:
                if "not pinned" in str(error):
                    return False
                raise
            return True

        removed = self._call("unpin", cid, remove_pin)
        if removed:
            logger.info("Unpinned CID %s", cid)
        else:
            logger.debug("CID %s was not pinned", cid)
        return removed

    def is_pinned(self, cid: str) -> bool:
        """Return True if ``cid`` itself is pinned, directly or recursively.

        A CID that is only reachable from another pinned CID (an indirect pin) counts as not
        pinned, because :meth:`unpin` could not remove that pin.
        """
        cid, _ = self._parse(cid)

        def read_pin_type() -> str | None:
            try:
                response = self._client.pin.ls(
                    cid, type="all", timeout=(_CONNECT_TIMEOUT_S, self.request_timeout_s)
                )
            except ipfs_errors.ErrorResponse as error:
                if "not pinned" in str(error):
                    return None
                raise
            # The node keys the response by the CID in its own multibase, so take the only entry.
            entries = list(response["Keys"].values())
            return str(entries[0]["Type"]) if entries else None

        return self._call("pin ls", cid, read_pin_type) in ("recursive", "direct")

    # Lifecycle

    def close(self) -> None:
        """Close the pooled HTTP connections; later calls open new ones."""
        self._client.close()

    def __enter__(self) -> IpfsStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"IpfsStore({self.api_addr!r})"

    # Helpers

    def _add(self, make_input: Callable[[], Any], expected: str, pin: bool) -> str:
        # make_input builds a fresh file object per attempt, since a failed attempt may have
        # consumed part of the previous one.
        response = self._call(
            "add",
            None,
            lambda: self._client.add(
                make_input(),
                pin=pin,
                timeout=(_CONNECT_TIMEOUT_S, self.request_timeout_s),
                **_ADD_OPTIONS,
            ),
        )
        cid = normalize_cid(str(response["Hash"]))
        if cid != expected:
            raise StorageError(
                f"IPFS node at {self.api_addr} returned CID {cid} for content whose CID is {expected} "
                "with 256 KiB chunks and the balanced layout; the node builds DAGs differently, so "
                "fetches of its CIDs would fail verification."
            )
        return cid

    def _resolve(self, cid: str) -> None:
        """Wait until the node has the root block of ``cid``, at most ``resolve_timeout_s``."""

        def stat_block() -> None:
            self._client.block.stat(
                cid,
                opts={"timeout": _duration(self.resolve_timeout_s)},
                timeout=(_CONNECT_TIMEOUT_S, self.resolve_timeout_s + _NODE_TIMEOUT_GRACE_S),
            )

        self._call(
            "block stat",
            cid,
            stat_block,
            timeout_message=(
                f"CID {cid} did not resolve within {self.resolve_timeout_s:g} s: the IPFS node at "
                f"{self.api_addr} does not have it and found no peer that does. Check the CID, or "
                "add the content to a node this one can reach."
            ),
        )

    def _read_stream(self, cid: str, stream: Any) -> Iterator[bytes]:
        try:
            yield from stream
        except ipfs_errors.TimeoutError as error:
            raise StorageError(
                f"Fetching CID {cid} from {self.api_addr} stalled for more than {self.resolve_timeout_s:g} s."
            ) from error
        except (ipfs_errors.Error, requests.RequestException) as error:
            raise StorageError(f"Fetching CID {cid} from {self.api_addr} failed: {error}") from error
        finally:
            with contextlib.suppress(Exception):
                stream.close()

    def _verify(self, cid: str, actual: str, size: int) -> None:
        if actual != cid:
            logger.warning("Content of CID %s hashes to %s (%d bytes); rejected", cid, actual, size)
            raise ContentMismatchError(
                f"Content fetched for CID {cid} from {self.api_addr} hashes to {actual} instead "
                f"({size} bytes): the node returned other bytes, or the content was added with "
                "settings other than 256 KiB chunks and the balanced layout."
            )

    def _parse(self, cid: str) -> tuple[str, int]:
        parsed = parse_cid(cid)
        return encode_cid(parsed.buffer), parsed.version

    def _call(
        self,
        operation: str,
        cid: str | None,
        request: Callable[[], T],
        *,
        timeout_message: str | None = None,
    ) -> T:
        """Run ``request``, retrying while the API refuses connections, and map client errors.

        ``timeout_message`` replaces the default message when the HTTP request or the node's
        own ``timeout`` option expires.
        """
        subject = f"IPFS {operation} of CID {cid}" if cid else f"IPFS {operation}"
        for attempt in range(1, self.connect_attempts + 1):
            try:
                return request()
            except ipfs_errors.ConnectionError as error:
                if attempt == self.connect_attempts:
                    raise StorageError(
                        f"IPFS API at {self.api_addr} is unreachable after {attempt} attempts "
                        f"({_root_cause(error)}). "
                        "Start the IPFS node or fix the configured API address."
                    ) from error
                delay_s = self.backoff_s * 2 ** (attempt - 1)
                logger.warning(
                    "%s: IPFS API at %s is unreachable (attempt %d of %d), retrying in %.2f s: %s",
                    subject,
                    self.api_addr,
                    attempt,
                    self.connect_attempts,
                    delay_s,
                    _root_cause(error),
                )
                time.sleep(delay_s)
            except ipfs_errors.TimeoutError as error:
                raise StorageError(
                    timeout_message or f"{subject} timed out at {self.api_addr}: {error}"
                ) from error
            except ipfs_errors.Error as error:
                # js-ipfs reports its own ``timeout`` option expiring as "request timed out".
                if timeout_message is not None and "timed out" in str(error):
                    raise StorageError(timeout_message) from error
                raise StorageError(f"{subject} failed at {self.api_addr}: {error}") from error
        raise AssertionError("unreachable: the last attempt returns or raises")


def canonical_json(obj: Any) -> bytes:
    """Encode ``obj`` as canonical JSON: sorted keys, no spaces, UTF-8, no NaN or infinity.

    The same value therefore always gets the same bytes and the same CID.

    :raises ConfigError: if ``obj`` contains a value JSON cannot represent.
    """
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"Value cannot be stored as canonical JSON: {error}.") from error
    return text.encode("utf-8")


def _duration(seconds: float) -> str:
    """Format ``seconds`` as the duration string the node's ``timeout`` option reads."""
    return f"{max(1, round(seconds * 1000))}ms"


def _root_cause(error: BaseException) -> str:
    """Return the message of the innermost exception behind ``error``, e.g. "Connection refused"."""
    while True:
        inner = error.__cause__ or error.__context__
        if inner is None:
            return str(error) or type(error).__name__
        error = inner
