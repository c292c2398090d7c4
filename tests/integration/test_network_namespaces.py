"""Lenders on hosts of their own, emulated with Linux network namespaces.

The chain, the IPFS node and the coordinator run in one namespace and every lender in
another. Each of these namespaces is joined by a veth pair to a bridge in a namespace of
its own, so the parts reach each other only over the bridge, at addresses in
10.231.0.0/24. The test process reaches the bridge through one more veth pair. One lender's link goes down
mid-job: the job completes on the other lenders plus a spare.

Needs root (or CAP_NET_ADMIN) for ``ip netns``; the test is skipped where ``ip netns add``
fails. It creates only namespaces and links whose names start with ``dm<pid>`` and deletes
them when it ends.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from market_support import (
    BUDGET,
    FAULT_EPOCHS,
    JOB_COMPLETED,
    MarketTest,
    checkpoint_cids,
    job_events,
    job_logs,
    log_tails,
    machines_locked_by,
    market_shortfall,
    upload_digits_bundle,
    wait_until,
)

from deepmarket.localnet import LocalMarketplace
from deepmarket.results import download_result
from deepmarket.training import digits

WORKERS = 3
SUBNET = "10.231.0"
PREFIX_LENGTH = 24
CORE_ADDRESS = f"{SUBNET}.1"
HOST_ADDRESS = f"{SUBNET}.254"  # the test process's end of its link to the bridge
FIRST_LENDER_HOST = 11  # lender i gets SUBNET.(11 + i)
MIN_ACCURACY = 0.85
IP_TIMEOUT_S = 30


def ip(*args: str) -> None:
    """Run ``ip ARGS``; raise with its output if it fails."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed with exit code {result.returncode}: {result.stderr.strip()}")


def netns_exec(namespace: str) -> list[str]:
    """Return the command prefix that runs a command in `namespace` (``ip netns exec`` execs it in place)."""
    return ["ip", "netns", "exec", namespace]


@dataclass
class Network:
    """The namespaces and links one test created, and what is attached where."""

    tag: str
    namespaces: list[str] = field(default_factory=list)
    host_link: str | None = None
    bridge_ports: dict[str, str] = field(default_factory=dict)  # namespace -> its port on the bridge
    addresses: dict[str, str] = field(default_factory=dict)  # namespace -> its address

    @property
    def bridge(self) -> str:
        return f"{self.tag}-bridge"

    def add_namespace(self, suffix: str) -> str:
        name = f"{self.tag}-{suffix}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def attach(self, namespace: str, address: str) -> None:
        """Join `namespace` to the bridge through a veth pair: `eth0` inside it, a bridge port outside."""
        port = f"port{len(self.bridge_ports)}"
        ip("-n", self.bridge, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        ip("-n", self.bridge, "link", "set", port, "master", "br0")
        ip("-n", self.bridge, "link", "set", port, "up")
        ip("-n", namespace, "addr", "add", f"{address}/{PREFIX_LENGTH}", "dev", "eth0")
        ip("-n", namespace, "link", "set", "eth0", "up")
        self.bridge_ports[namespace] = port
        self.addresses[namespace] = address

    def cut(self, namespace: str) -> None:
        ip("-n", self.bridge, "link", "set", self.bridge_ports[namespace], "down")

    def delete(self) -> None:
        """Delete the host link and every namespace (which deletes the veth pairs inside them)."""
        errors = []
        if self.host_link is not None:
            try:
                ip("link", "del", self.host_link)
            except RuntimeError as exc:
                errors.append(str(exc))
        for namespace in reversed(self.namespaces):
            try:
                ip("netns", "del", namespace)
            except RuntimeError as exc:
                errors.append(str(exc))
        if errors:
            raise RuntimeError("; ".join(errors))


def build_network(network: Network, lenders: int) -> tuple[str, list[str]]:
    """Create the bridge, the core namespace, `lenders` lender namespaces and this process's link."""
    bridge = network.add_namespace("bridge")
    ip("-n", bridge, "link", "add", "br0", "type", "bridge")
    ip("-n", bridge, "link", "set", "br0", "up")
    core = network.add_namespace("core")
    network.attach(core, CORE_ADDRESS)
    lender_namespaces = []
    for index in range(lenders):
        namespace = network.add_namespace(f"lender{index}")
        network.attach(namespace, f"{SUBNET}.{FIRST_LENDER_HOST + index}")
        lender_namespaces.append(namespace)
    # This process's end is created straight in its own namespace (`netns PID`), with a name
    # unique to the test, because it shares that namespace with every other program here.
    host_link = f"{network.tag}h"
    ip("-n", bridge, "link", "add", "porthost", "type", "veth", "peer", "name", host_link, "netns", str(os.getpid()))
    network.host_link = host_link
    ip("-n", bridge, "link", "set", "porthost", "master", "br0")
    ip("-n", bridge, "link", "set", "porthost", "up")
    ip("addr", "add", f"{HOST_ADDRESS}/{PREFIX_LENGTH}", "dev", network.host_link)
    ip("link", "set", network.host_link, "up")
    return core, lender_namespaces


@pytest.fixture
def network() -> Iterator[Network]:
    """A fresh, empty set of namespaces for this test, all deleted afterwards, also on failure."""
    tag = f"dm{os.getpid()}"
    probe = f"{tag}-probe"
    try:
        ip("netns", "add", probe)
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"network namespaces are not available here (`ip netns add` failed: {exc})")
    ip("netns", "del", probe)
    in_use = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                            timeout=IP_TIMEOUT_S, check=True).stdout
    if f" {SUBNET}." in in_use:
        pytest.fail(f"{SUBNET}.0/{PREFIX_LENGTH} is already in use on this host; change SUBNET in this test")
    created = Network(tag)
    try:
        yield created
    finally:
        created.delete()


@pytest.mark.integration
def test_lender_link_cut_mid_job(network: Network, demo_inputs: digits.DemoInputs, tmp_path: Path) -> None:
    core, lender_namespaces = build_network(network, WORKERS + 1)
    net = LocalMarketplace(tmp_path / "marketplace", host=CORE_ADDRESS, command_prefix=netns_exec(core))
    net.start()  # stops what it started if it fails
    market = MarketTest(net)
    try:
        net.start_coordinator()
        wait_until(net, lambda: "coordinator started" in net.log_tail("coordinator"), 120,
                   "the coordinator to start")
        client = market.client
        lenders = market.start_lenders_each([
            {"host": network.addresses[namespace], "command_prefix": netns_exec(namespace)}
            for namespace in lender_namespaces])
        namespace_of = {lender.machine_id: namespace for lender, namespace in zip(lenders, lender_namespaces,
                                                                                   strict=True)}
        for lender in lenders:
            endpoint = client.get_machine(lender.machine_id)["endpoint"]
            assert endpoint.split(":")[0] == network.addresses[namespace_of[lender.machine_id]]
        bundle_cid = upload_digits_bundle(net.store, demo_inputs)
        borrower_credit_before = client.withdrawable(market.borrower.address)

        job_id = market.submit_job(bundle_cid, workers=WORKERS)
        market.wait_for_assignment(job_id)
        cut = market.lender_in_slot(job_id, 1)
        market.wait_for_checkpoint(job_id, 1, cut.machine_id)
        network.cut(namespace_of[cut.machine_id])

        job = market.wait_for_status(job_id, JOB_COMPLETED)
        logs = log_tails(net, market.daemon_names())

        # The cut-off machine was faulted, and the spare in its own namespace took its slot.
        initial = list(job_events(client, "JobAssigned", job_id)[0]["machineIds"])
        [spare] = [lender for lender in lenders if lender.machine_id not in initial]
        faulted = job_logs(client, "WorkerFaulted", job_id)
        assert [log["args"]["machineId"] for log in faulted] == [cut.machine_id], logs
        replaced = job_events(client, "WorkerReplaced", job_id)
        assert len(replaced) == 1, logs
        assert replaced[0]["oldMachineId"] == cut.machine_id
        assert replaced[0]["newMachineId"] == spare.machine_id
        final_cluster = [w["machine_id"] for w in client.get_workers(job_id)]
        assert sorted(final_cluster) == sorted(m for m in initial + [spare.machine_id] if m != cut.machine_id)

        # Every checkpoint was proved with one CID; the final cluster proved the last one.
        proofs = job_events(client, "ProofRecorded", job_id)
        cids = checkpoint_cids(proofs)
        assert sorted(cids) == list(range(1, FAULT_EPOCHS + 1)), logs
        for index, found in cids.items():
            assert len(found) == 1, f"checkpoint {index} has CIDs {found}"
        for machine_id in final_cluster:
            assert FAULT_EPOCHS in [p["checkpointIndex"] for p in proofs if p["machineId"] == machine_id]
        cut_proofs = [log for log in job_logs(client, "ProofRecorded", job_id)
                      if log["args"]["machineId"] == cut.machine_id]
        assert all(log["blockNumber"] < faulted[0]["blockNumber"] for log in cut_proofs)
        model_path = download_result(client, net.store, job_id, tmp_path / "trained-model.keras")
        assert digits.evaluate(model_path, demo_inputs.dataset_path) >= MIN_ACCURACY

        completed = job_events(client, "JobCompleted", job_id)
        assert len(completed) == 1
        assert job["paid"] == sum(p["payment"] for p in proofs)
        assert completed[0]["refund"] == BUDGET - job["paid"]
        slashed = faulted[0]["args"]["slashed"]
        assert client.withdrawable(market.borrower.address) - borrower_credit_before == BUDGET - job["paid"] + slashed
        assert machines_locked_by(client, job_id) == []
        assert market_shortfall(client) == 0
    finally:
        try:
            market.cleanup()
        finally:
            net.stop()
