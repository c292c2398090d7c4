"""Start and stop a local development chain: Ganache (default) or anvil, both from npm."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import requests

from deepmarket.errors import ConfigError, ToolchainError
from deepmarket.toolchain import node_tool

logger = logging.getLogger(__name__)

# A standard BIP-39 test mnemonic, so the development accounts' keys can be derived in
# Python. Never use it on a public network.
DEV_MNEMONIC = "test test test test test test test test test test test junk"
DEV_CHAIN_ID = 1337
CHAIN_KINDS = ("ganache", "anvil")
START_TIMEOUT_S = 30.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rpc_ready(url: str, timeout_s: float = 1.0) -> bool:
    """Return whether a JSON-RPC node at `url` responds to ``eth_chainId``."""
    try:
        reply = requests.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
                              timeout=timeout_s)
        return reply.ok and "result" in reply.json()
    except (requests.RequestException, ValueError):
        return False


class LocalChain:
    """A Ganache or anvil process, by default on 127.0.0.1, with accounts funded from :data:`DEV_MNEMONIC`.

    `host` is the address the chain binds and :attr:`rpc_url` names. `command_prefix` is
    put in front of the chain's command line, e.g. ``["ip", "netns", "exec", "ns1"]`` to run
    it in another network namespace; that command must exec the chain in place, so that
    stopping its process group stops the chain. Without a given `port`, one that is free on
    127.0.0.1 of this host is picked.

    >>> with LocalChain(kind="ganache") as chain:   # doctest: +SKIP
    ...     print(chain.rpc_url)
    """

    def __init__(self, kind: str = "ganache", port: int | None = None, accounts: int = 10,
                 balance_eth: int = 10_000, log_path: Path | None = None, host: str = "127.0.0.1",
                 command_prefix: Sequence[str] = ()) -> None:
        if kind not in CHAIN_KINDS:
            raise ConfigError(f"chain kind {kind!r} is not supported: use one of {', '.join(CHAIN_KINDS)}")
        self.kind = kind
        self.host = host
        self.command_prefix = list(command_prefix)
        self.port = port or free_port()
        self.accounts = accounts
        self.balance_eth = balance_eth
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file = None

    @property
    def rpc_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        if self.kind == "ganache":
            return [
                *self.command_prefix,
                str(node_tool("ganache")),
                "--server.host", self.host,
                "--server.port", str(self.port),
                "--wallet.mnemonic", DEV_MNEMONIC,
                "--wallet.totalAccounts", str(self.accounts),
                "--wallet.defaultBalance", str(self.balance_eth),
                # Ganache 7.9 supports no fork after shanghai, so the contracts are compiled for it.
                "--chain.hardfork", "shanghai",
                "--chain.chainId", str(DEV_CHAIN_ID),
                "--chain.vmErrorsOnRPCResponse", "true",
                "--miner.blockGasLimit", "30000000",
                "--logging.quiet", "true",
            ]
        return [
            *self.command_prefix,
            str(node_tool("anvil")),
            "--host", self.host,
            "--port", str(self.port),
            "--mnemonic", DEV_MNEMONIC,
            "--accounts", str(self.accounts),
            "--balance", str(self.balance_eth),
            "--chain-id", str(DEV_CHAIN_ID),
            "--hardfork", "shanghai",
            "--silent",
        ]

    def start(self) -> LocalChain:
        if rpc_ready(self.rpc_url):
            raise ToolchainError(f"port {self.port} already serves a chain: stop it or choose another port")
        stdout = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
            stdout = self._log_file
        self._process = subprocess.Popen(self.command(), stdout=stdout, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ToolchainError(f"{self.kind} exited with code {self._process.returncode} at start"
                                     f"{f'; see {self.log_path}' if self.log_path else ''}")
            if rpc_ready(self.rpc_url):
                logger.info("chain started: %s pid %s on %s", self.kind, self._process.pid, self.rpc_url)
                return self
            time.sleep(0.1)
        self.stop()
        raise ToolchainError(f"{self.kind} did not respond on {self.rpc_url} within {START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
            except ProcessLookupError:
                pass
            logger.info("chain stopped: %s pid %s", self.kind, process.pid)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> LocalChain:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
