"""IpfsNode lifecycle with a real js-ipfs daemon: start, stop, restart, crash recovery."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from deepmarket.errors import ConfigError, ToolchainError
from deepmarket.storage.node import LOCK_DIR_NAME, PID_FILE_NAME, IpfsNode, find_free_port
from deepmarket.storage.store import IpfsStore

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def api_answers(url: str) -> bool:
    request = urllib.request.Request(f"{url}/api/v0/version", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=2):
            return True
    except OSError:
        return False


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_start_serves_api_and_stop_ends_daemon(own_node: IpfsNode) -> None:
    own_node.start()
    pid = own_node.pid

    assert own_node.is_running
    assert pid is not None
    assert os.getpgid(pid) == pid
    assert own_node.api_multiaddr == f"/ip4/127.0.0.1/tcp/{own_node.api_port}/http"
    assert api_answers(own_node.api_url)
    assert (own_node.repo_dir / PID_FILE_NAME).exists()
    assert "Daemon is ready" in own_node.log_tail()

    own_node.stop()

    assert not own_node.is_running
    assert own_node.pid is None
    assert not process_exists(pid)
    assert not api_answers(own_node.api_url)
    assert not (own_node.repo_dir / PID_FILE_NAME).exists()
    assert not (own_node.repo_dir / LOCK_DIR_NAME).exists()


def test_start_and_stop_are_idempotent(own_node: IpfsNode) -> None:
    own_node.stop()
    own_node.start()
    pid = own_node.pid

    own_node.start()

    assert own_node.pid == pid
    own_node.stop()
    own_node.stop()
    assert not own_node.is_running


def test_context_manager_stops_on_error(tmp_path: Path) -> None:
    node = IpfsNode(tmp_path / "repo")

    with pytest.raises(RuntimeError, match="job failed"), node:
        pid = node.pid
        raise RuntimeError("job failed")

    assert pid is not None
    assert not node.is_running
    assert not process_exists(pid)


def test_config_binds_everything_to_localhost(own_node: IpfsNode) -> None:
    own_node.start()

    config = json.loads((own_node.repo_dir / "config").read_text())
    addresses = config["Addresses"]

    assert addresses["API"] == f"/ip4/127.0.0.1/tcp/{own_node.api_port}"
    assert addresses["Gateway"] == f"/ip4/127.0.0.1/tcp/{own_node.gateway_port}"
    assert addresses["Swarm"] == [f"/ip4/127.0.0.1/tcp/{own_node.swarm_port}"]
    assert "RPC" not in addresses
    assert addresses["Delegates"] == []
    assert config["Bootstrap"] == []
    assert config["Discovery"]["MDNS"]["Enabled"] is False
    assert config["Routing"] == {"Type": "none"}
    assert "gRPC" not in own_node.log_tail()


def test_restart_keeps_content_and_pins(own_node: IpfsNode) -> None:
    own_node.start()
    with IpfsStore(own_node.api_multiaddr) as store:
        cid = store.add_bytes(b"checkpoint epoch 3")
    api_port = own_node.api_port

    own_node.stop()
    own_node.start()

    assert own_node.api_port == api_port
    with IpfsStore(own_node.api_multiaddr) as store:
        assert store.cat(cid) == b"checkpoint epoch 3"
        assert store.is_pinned(cid)


def test_start_recovers_stale_lock_after_kill(own_node: IpfsNode, caplog: pytest.LogCaptureFixture) -> None:
    own_node.start()
    with IpfsStore(own_node.api_multiaddr) as store:
        cid = store.add_bytes(b"dataset shard 0")
    pid = own_node.pid
    assert pid is not None

    os.killpg(pid, signal.SIGKILL)
    assert wait_for(lambda: not own_node.is_running, timeout_s=5)
    assert (own_node.repo_dir / LOCK_DIR_NAME).exists()

    caplog.set_level(logging.WARNING, logger="deepmarket.storage.node")
    started = time.monotonic()
    own_node.start()

    # js-ipfs alone would reject the lock until it is 20 s old.
    assert time.monotonic() - started < 15
    assert any("stale lock" in record.getMessage() for record in caplog.records)
    with IpfsStore(own_node.api_multiaddr) as store:
        assert store.cat(cid) == b"dataset shard 0"


def test_new_node_object_recovers_stale_lock(own_node: IpfsNode) -> None:
    own_node.start()
    pid = own_node.pid
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    assert wait_for(lambda: not own_node.is_running, timeout_s=5)

    with IpfsNode(own_node.repo_dir) as second:
        assert api_answers(second.api_url)


def test_stop_after_kill_clears_lock(own_node: IpfsNode) -> None:
    own_node.start()
    pid = own_node.pid
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    assert wait_for(lambda: not own_node.is_running, timeout_s=5)

    own_node.stop()

    assert not (own_node.repo_dir / LOCK_DIR_NAME).exists()
    assert not (own_node.repo_dir / PID_FILE_NAME).exists()
    own_node.start()
    assert api_answers(own_node.api_url)


def test_second_node_on_live_repo_is_rejected(own_node: IpfsNode) -> None:
    own_node.start()
    intruder = IpfsNode(own_node.repo_dir)

    with pytest.raises(ToolchainError, match=f"in use by jsipfs daemon PID {own_node.pid}"):
        intruder.start()

    assert not intruder.is_running
    assert api_answers(own_node.api_url)


def test_start_rejects_taken_api_port(own_node: IpfsNode) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        node = IpfsNode(own_node.repo_dir, api_port=blocker.getsockname()[1])

        with pytest.raises(ToolchainError, match=f"API port {node.api_port} on 127.0.0.1 is in use"):
            node.start()

    assert not node.is_running


def test_start_fails_fast_on_bind_error(own_node: IpfsNode, monkeypatch: pytest.MonkeyPatch) -> None:
    # Injected fault: the free-port check passes although another process listens.
    monkeypatch.setattr("deepmarket.storage.node._is_port_free", lambda port, host="127.0.0.1": True)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        node = IpfsNode(own_node.repo_dir, api_port=blocker.getsockname()[1], startup_timeout_s=60)

        started = time.monotonic()
        with pytest.raises(ToolchainError, match="could not bind") as raised:
            node.start()

    assert time.monotonic() - started < 30
    assert "EADDRINUSE" in str(raised.value)
    assert not node.is_running
    assert not (node.repo_dir / PID_FILE_NAME).exists()


def test_start_timeout_kills_daemon(own_node: IpfsNode) -> None:
    node = own_node
    node.startup_timeout_s = 0.2

    with pytest.raises(ToolchainError, match=r"did not become ready .* within 0.2 s\. Log tail"):
        node.start()

    assert not node.is_running
    assert not api_answers(node.api_url)


def test_missing_jsipfs_is_reported(tmp_path: Path) -> None:
    node = IpfsNode(tmp_path / "repo", jsipfs=tmp_path / "no-such-jsipfs")

    with pytest.raises(ToolchainError, match="jsipfs executable not found"):
        node.start()


@pytest.mark.parametrize(
    "ports",
    [{"api_port": 0}, {"swarm_port": 70000}, {"api_port": 40001, "gateway_port": 40001}],
    ids=["zero", "too-large", "duplicate"],
)
def test_invalid_ports_are_rejected(tmp_path: Path, ports: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        IpfsNode(tmp_path / "repo", **ports)


def test_run_forever_stops_daemon_on_sigterm(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    api_port = find_free_port()
    script = (
        "import logging, sys\n"
        "from deepmarket.storage.node import run_forever\n"
        "logging.basicConfig(level=logging.INFO)\n"
        f"run_forever({str(repo)!r}, api_port={api_port})\n"
    )
    runner = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    daemon_pid: int | None = None
    try:
        assert wait_for(lambda: api_answers(f"http://127.0.0.1:{api_port}"), timeout_s=60)
        daemon_pid = json.loads((repo / PID_FILE_NAME).read_text())["pid"]

        runner.send_signal(signal.SIGTERM)
        output, _ = runner.communicate(timeout=30)
    finally:
        # The daemon runs in its own process group, so killing the runner does not end it.
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
        if daemon_pid is not None and process_exists(daemon_pid):
            os.killpg(daemon_pid, signal.SIGKILL)

    assert runner.returncode == 0, output.decode()
    assert b"IPFS node stopped" in output
    assert not process_exists(daemon_pid)
    assert not api_answers(f"http://127.0.0.1:{api_port}")
