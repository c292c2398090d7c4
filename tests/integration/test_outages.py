"""The chain's RPC endpoint and the IPFS API each go away for a while during a job.

Every daemon reaches the chain and the IPFS node through a TCP proxy that the test owns.
Stopping a proxy refuses new connections and drops open ones, as a restarting node or a
broken link would. The daemons log their retries and carry on, and the job completes with
every epoch proved by every worker.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from market_support import (
    BUDGET,
    FAULT_EPOCHS,
    JOB_COMPLETED,
    MarketTest,
    coordinator_log,
    daemon_log,
    job_events,
    log_tails,
    machines_locked_by,
    market_shortfall,
    upload_digits_bundle,
    wait_until,
)

from deepmarket.chain.node import free_port
from deepmarket.localnet import LocalMarketplace
from deepmarket.training import digits

WORKERS = 2
OUTAGE_S = 10  # the shortest outage; it lasts until the daemons logged that they retry
RETRY_LOG_TIMEOUT_S = 90
ACCEPT_POLL_S = 0.2
PROXY_HOST = "127.0.0.1"


class TcpProxy:
    """Forwards TCP connections from 127.0.0.1:`port` to 127.0.0.1:`target_port`.

    :meth:`stop` closes the listening socket and every forwarded connection, so that clients
    see refused connections until :meth:`start` listens on the same port again.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Forwarded connections that the proxy closed linger in TIME_WAIT on this port.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((PROXY_HOST, self.port))
        listener.listen(128)
        listener.settimeout(ACCEPT_POLL_S)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True,
                         name=f"proxy-{self.port}-accept").start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            _close(connection)

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            client.settimeout(None)
            try:
                upstream = socket.create_connection((PROXY_HOST, self.target_port), timeout=10)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._connections.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True,
                                 name=f"proxy-{self.port}-pump").start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy bytes from `source` to `sink`; when either side ends, close both."""
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                _close(sock)
            with self._lock:
                self._connections.difference_update((source, sink))


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.fixture(scope="module")
def proxied_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMarketplace, TcpProxy, TcpProxy]]:
    """A marketplace of its own whose daemons reach the chain and IPFS only through proxies."""
    net = LocalMarketplace(tmp_path_factory.mktemp("proxied-marketplace"))
    rpc_proxy = TcpProxy(net.chain.port)
    ipfs_proxy = TcpProxy(net.ipfs.api_port)
    try:
        rpc_proxy.start()
        ipfs_proxy.start()
        net.env_overrides = {"DEEPMARKET_RPC_URL": f"http://{PROXY_HOST}:{rpc_proxy.port}",
                             "DEEPMARKET_IPFS_API": f"/ip4/{PROXY_HOST}/tcp/{ipfs_proxy.port}/http"}
        net.start()
        net.start_coordinator()
        wait_until(net, lambda: "coordinator started" in net.log_tail("coordinator"), 120,
                   "the coordinator to start")
        yield net, rpc_proxy, ipfs_proxy
    finally:
        net.stop()
        rpc_proxy.stop()
        ipfs_proxy.stop()


def has_line(text: str, *parts: str) -> bool:
    """Whether one line of `text` contains every one of `parts`."""
    return any(all(part in line for part in parts) for line in text.splitlines())


def outage(net: LocalMarketplace, proxy: TcpProxy, retried: Callable[[], bool], what: str,
           log_names: list[str]) -> None:
    """Stop `proxy` for OUTAGE_S seconds and at least until `retried()` holds, then start it again."""
    started = time.monotonic()
    proxy.stop()
    try:
        wait_until(net, retried, RETRY_LOG_TIMEOUT_S, what, log_names)
        time.sleep(max(0.0, started + OUTAGE_S - time.monotonic()))
    finally:
        proxy.start()


@pytest.mark.integration
def test_job_survives_rpc_and_ipfs_outages(proxied_net: tuple[LocalMarketplace, TcpProxy, TcpProxy],
                                           demo_inputs: digits.DemoInputs) -> None:
    net, rpc_proxy, ipfs_proxy = proxied_net
    market = MarketTest(net)
    try:
        client = market.client
        lenders = market.start_lenders(WORKERS)
        bundle_cid = upload_digits_bundle(net.store, demo_inputs)
        borrower_credit_before = client.withdrawable(market.borrower.address)
        names = market.daemon_names()

        job_id = market.submit_job(bundle_cid, workers=WORKERS)
        market.wait_for_assignment(job_id)
        chief = market.lender_in_slot(job_id, 0)
        market.wait_for_checkpoint(job_id, 1, chief.machine_id)

        # IPFS goes away while the chief pins its next checkpoints.
        ipfs_unreachable = f"IPFS API at /ip4/{PROXY_HOST}/tcp/{ipfs_proxy.port}/http is unreachable"
        checkpoint_retry = ("proving checkpoint", "failed (attempt", ipfs_unreachable)
        outage(net, ipfs_proxy, lambda: has_line(daemon_log(net, chief.name), *checkpoint_retry),
               f"{chief.name} to retry a checkpoint while IPFS is unreachable", names)

        # The chain goes away; every daemon polls it, so every daemon retries.
        def all_retried_rpc() -> bool:
            return ("coordinator step failed, retrying" in coordinator_log(net)
                    and all("lender step failed, retrying" in daemon_log(net, lender.name) for lender in lenders))

        outage(net, rpc_proxy, all_retried_rpc, "every daemon to retry while the chain is unreachable", names)

        job = market.wait_for_status(job_id, JOB_COMPLETED)
        logs = log_tails(net, names)

        # No daemon exited; each one logged its retries.
        for name in names:
            assert net.processes[name].poll() is None, f"{name} exited\n{logs}"
        assert has_line(daemon_log(net, chief.name), *checkpoint_retry)
        assert "coordinator step failed, retrying" in coordinator_log(net)
        for lender in lenders:
            assert "lender step failed, retrying" in daemon_log(net, lender.name)

        # Nothing was skipped or repeated: one round, every worker proved every epoch once.
        assert job["round"] == 1, logs
        assert len(job_events(client, "JobAssigned", job_id)) == 1
        assert job_events(client, "WorkerFaulted", job_id) == []
        assert job_events(client, "WorkerStopped", job_id) == []
        proofs = job_events(client, "ProofRecorded", job_id)
        assert max(Counter((p["machineId"], p["checkpointIndex"]) for p in proofs).values()) == 1
        for lender in lenders:
            indexes = [p["checkpointIndex"] for p in proofs if p["machineId"] == lender.machine_id]
            assert indexes == list(range(1, FAULT_EPOCHS + 1)), f"{lender.name}\n{logs}"
        completed = job_events(client, "JobCompleted", job_id)
        assert len(completed) == 1
        assert job["paid"] == sum(p["payment"] for p in proofs)
        assert completed[0]["refund"] == BUDGET - job["paid"]
        assert client.withdrawable(market.borrower.address) - borrower_credit_before == BUDGET - job["paid"]
        assert machines_locked_by(client, job_id) == []
        assert market_shortfall(client) == 0
    finally:
        market.cleanup()
