"""A whole marketplace on one machine: local chain, IPFS node, contracts, funded keystores,
and the coordinator and lender daemons as separate processes.

The demo, the integration tests and the benchmarks all start from this, so they exercise
the same processes a user runs by hand. Every process it starts is stopped by
:meth:`LocalMarketplace.stop`, including the TensorFlow workers of the lender daemons.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
from eth_account.signers.local import LocalAccount

from deepmarket.chain.client import CREDIT, MarketClient, connect
from deepmarket.chain.node import DEV_MNEMONIC, LocalChain, free_port
from deepmarket.chain.wallet import create_keystore, dev_account
from deepmarket.errors import DeepMarketError
from deepmarket.market import operations
from deepmarket.storage.node import IpfsNode
from deepmarket.storage.store import IpfsStore
from deepmarket.toolchain import tool_env

logger = logging.getLogger(__name__)

ETH_FUNDING = 10 * 10**18  # wei for gas, per account
BORROWER_GRANT = 500 * CREDIT
LENDER_GRANT = 50 * CREDIT


class LocalMarketplace:
    """Start with :meth:`start`, add daemons, stop with :meth:`stop` (or use it as a context manager).

    By default everything runs on this host and listens on 127.0.0.1. For a multi-host
    layout, `host` is the address the chain and the IPFS node bind (and that the daemons
    and this process use to reach them), and `command_prefix` runs the chain, the IPFS node
    and the coordinator under another command, e.g. ``["ip", "netns", "exec", "ns1"]``;
    :meth:`start_lender` takes its own prefix. A prefix must exec its command in place, so
    that signals reach the process it started.
    """

    def __init__(self, root: Path, chain_kind: str | None = None, proof_timeout_s: int = 600,
                 host: str = "127.0.0.1", command_prefix: Sequence[str] = ()) -> None:
        self.root = root
        self.log_dir = root / "logs"
        self.keys_dir = root / "keystores"
        self.command_prefix = list(command_prefix)
        self.chain = LocalChain(kind=chain_kind or os.environ.get("DEEPMARKET_CHAIN", "ganache"),
                                log_path=self.log_dir / "chain.log", host=host, command_prefix=command_prefix)
        self.ipfs = IpfsNode(root / "ipfs", host=host, command_prefix=command_prefix)
        self.proof_timeout_s = proof_timeout_s
        # Variables that replace the defaults in the environment of daemons started from now
        # on, e.g. a DEEPMARKET_RPC_URL that points at a proxy in front of the chain.
        self.env_overrides: dict[str, str] = {}
        self.password = secrets.token_urlsafe(16)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.accounts: dict[str, LocalAccount] = {}
        self.client: MarketClient
        self.store: IpfsStore
        self.funder = dev_account(DEV_MNEMONIC, 0)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalMarketplace:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.chain.start()
            self.ipfs.start()
            w3 = connect(self.chain.rpc_url)
            self.store = IpfsStore(self.ipfs.api_multiaddr)
            coordinator = self.new_account("coordinator")
            self.client = operations.deploy(w3, self.funder, coordinator.address, self.deployment_file,
                                            proof_timeout_s=self.proof_timeout_s)
            self.new_account("borrower", credits=BORROWER_GRANT)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        for name in list(self.processes):
            self.stop_process(name, grace_s)
        self.ipfs.stop()
        self.chain.stop()

    def __enter__(self) -> LocalMarketplace:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def deployment_file(self) -> Path:
        return self.root / "deployment.json"

    # ------------------------------------------------------------------ accounts

    def new_account(self, name: str, credits: int = 0) -> LocalAccount:
        """Create an encrypted keystore `name`, fund it with gas and `credits`, and remember it."""
        account = create_keystore(self.keystore(name), self.password)
        w3 = connect(self.chain.rpc_url)
        tx = {"to": account.address, "value": ETH_FUNDING, "gas": 21_000, "chainId": w3.eth.chain_id,
              "nonce": w3.eth.get_transaction_count(self.funder.address, "pending"),
              "maxFeePerGas": 4 * 10**9, "maxPriorityFeePerGas": 10**9}
        w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(self.funder.sign_transaction(tx).raw_transaction))
        if credits:
            self.client.mint(self.funder, account.address, credits, "onboarding")
        self.accounts[name] = account
        return account

    def keystore(self, name: str) -> Path:
        return self.keys_dir / f"{name}.json"

    # ------------------------------------------------------------------ daemons

    def env(self) -> dict[str, str]:
        env = tool_env()
        env.update({"DEEPMARKET_RPC_URL": self.chain.rpc_url, "DEEPMARKET_IPFS_API": self.ipfs.api_multiaddr,
                    "DEEPMARKET_DEPLOYMENT": str(self.deployment_file), "DEEPMARKET_HOME": str(self.root),
                    "DEEPMARKET_PASSWORD": self.password, "TF_CPP_MIN_LOG_LEVEL": "2",
                    "TF_ENABLE_ONEDNN_OPTS": "0", "PYTHONWARNINGS": "ignore::FutureWarning"})
        env.update(self.env_overrides)
        return env

    def start_process(self, name: str, argv: list[str],
                      command_prefix: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """Run ``[PREFIX...] python -m deepmarket ARGV`` in its own session, logging to logs/NAME.log."""
        if name in self.processes and self.processes[name].poll() is None:
            raise DeepMarketError(f"{name} is already running (pid {self.processes[name].pid})")
        with open(self.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen([*command_prefix, sys.executable, "-m", "deepmarket", *argv], stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env(),
                                       start_new_session=True)
        self.processes[name] = process
        logger.info("started %s: pid %s", name, process.pid)
        return process

    def stop_process(self, name: str, grace_s: float = 10.0, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop daemon `name` and every process it started (TF workers run in their own sessions)."""
        process = self.processes.pop(name, None)
        if process is None:
            return
        descendants = _descendants(process.pid)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
                os.killpg(process.pid, signal.SIGCONT)  # a frozen process acts on signals only once resumed
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s; killing it", name, grace_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for child in descendants:
            with contextlib.suppress(psutil.Error):
                child.kill()

    def signal_process(self, name: str, sig: signal.Signals) -> None:
        """Send `sig` to daemon `name` and every process it started (e.g. SIGSTOP to freeze a lender)."""
        process = self.processes[name]
        targets = [process.pid] + [child.pid for child in _descendants(process.pid)]
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def start_coordinator(self, *extra: str) -> subprocess.Popen[bytes]:
        return self.start_process("coordinator", ["coordinator", "run", "--keystore",
                                                  str(self.keystore("coordinator")), *extra],
                                  command_prefix=self.command_prefix)

    def start_lender(self, name: str, cores: int = 1, memory_mib: int = 2048, price: str = "60",
                     stake: str = "20", windows: str = "always", credits: int = LENDER_GRANT,
                     tf_port: int | None = None, host: str = "127.0.0.1",
                     command_prefix: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """Create (once) and fund lender `name`, then start its daemon (under `command_prefix`, if given)."""
        if name not in self.accounts:
            self.new_account(name, credits=credits)
        # Spread the lenders' workers over this host's CPUs as separate machines would be.
        cpus = sorted(os.sched_getaffinity(0))
        cpu = cpus[sum(1 for n in self.accounts if n.startswith("lender")) % len(cpus)]
        return self.start_process(name, [
            "lender", "start", "--keystore", str(self.keystore(name)), "--work-dir", str(self.root / name),
            "--tf-port", str(tf_port or free_port()), "--host", host, "--cores", str(cores),
            "--memory-mib", str(memory_mib), "--price", price, "--stake", stake, "--windows", windows,
            "--cpus", str(cpu)],
            command_prefix=command_prefix)

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise DeepMarketError(f"{name} exited with code {process.returncode}; see {self.log_dir / name}.log")

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str, check_alive: bool = True) -> None:
        """Poll `condition` every half second; raise DeepMarketError naming `what` after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check_alive:
                self.check_alive()
            if condition():
                return
            time.sleep(0.5)
        raise DeepMarketError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def balances(self) -> dict[str, int]:
        """Credits of every named account and of both contracts (base units)."""
        return self.client.tracked_balances({name: a.address for name, a in self.accounts.items()})

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []

