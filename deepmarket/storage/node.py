"""Run a private js-ipfs daemon that listens on one address (127.0.0.1 by default) and contacts no other peer.

:class:`IpfsNode` initialises a repo, rewrites its config so the daemon stays local and starts
``jsipfs daemon`` in its own process group, logging to ``daemon.log`` in the repo directory.
:func:`run_forever` runs one in the foreground until SIGINT or SIGTERM.

The daemon is configured for js-ipfs 0.66.1 (it reports version 0.18.1): no bootstrap peers,
no delegate routers, MDNS and NAT port mapping off, routing ``none``, no gRPC endpoint, and
preloading off through ``NODE_ENV=test`` and ``--enable-preload=false``. It therefore serves
only content that was added to it, and a CID it does not have never resolves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

from deepmarket.errors import ConfigError, ToolchainError

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JSIPFS = PROJECT_ROOT / "node_modules" / ".bin" / "jsipfs"
HOST = "127.0.0.1"

LOG_FILE_NAME = "daemon.log"
# Printed by `jsipfs daemon` (js-ipfs 0.66.1) once it has started and handles SIGINT.
READY_LINE = "Daemon is ready"
PID_FILE_NAME = "daemon.pid"
# proper-lockfile, which js-ipfs uses, keeps this directory while the daemon runs.
LOCK_DIR_NAME = "repo.lock"
# js-ipfs treats a lock whose mtime is older than this as stale (ipfs-repo STALE_TIME).
LOCK_STALE_S = 20.0

_INIT_TIMEOUT_S = 60.0
_POLL_INTERVAL_S = 0.1
_LOG_TAIL_BYTES = 4000
# Index of "starttime" (field 22 of proc(5)) among the fields after the command name.
_STARTTIME_INDEX = 19


class IpfsNode:
    """A js-ipfs daemon on a private repo, started and stopped by this process.

    >>> with IpfsNode("/tmp/ipfs-repo") as node:
    ...     store = IpfsStore(node.api_multiaddr)

    Ports that are not given are picked from the free ports on 127.0.0.1 when the object is
    created, and kept across restarts so that :attr:`api_multiaddr` stays valid.

    :param repo_dir: the IPFS repo; created and initialised on the first :meth:`start`.
    :param api_port: TCP port of the HTTP RPC API.
    :param gateway_port: TCP port of the read-only HTTP gateway.
    :param swarm_port: TCP port for libp2p connections.
    :param jsipfs: path of the ``jsipfs`` executable; defaults to the project's npm install.
    :param host: IPv4 address the API, gateway and swarm listen on, and that
        :attr:`api_multiaddr` names.
    :param command_prefix: put in front of the daemon's command line, e.g.
        ``["ip", "netns", "exec", "ns1"]`` to run it in another network namespace. That command
        must exec the daemon in place, so that signals to its process group reach the daemon.
        With a prefix, :meth:`start` does not check here that the ports are free, because the
        daemon binds them wherever the prefix runs it; a taken port still fails the start.
    :param startup_timeout_s: seconds :meth:`start` waits for the daemon to become ready.
    :param stop_timeout_s: seconds :meth:`stop` waits after SIGINT before sending SIGKILL.
    """

    def __init__(
        self,
        repo_dir: str | os.PathLike[str],
        *,
        api_port: int | None = None,
        gateway_port: int | None = None,
        swarm_port: int | None = None,
        jsipfs: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 60.0,
        stop_timeout_s: float = 10.0,
        host: str = HOST,
        command_prefix: Sequence[str] = (),
    ) -> None:
        self.repo_dir = Path(repo_dir).resolve()
        self.host = host
        self.command_prefix = list(command_prefix)
        self.jsipfs = Path(jsipfs) if jsipfs is not None else DEFAULT_JSIPFS
        self.api_port = _check_port("api_port", api_port)
        self.gateway_port = _check_port("gateway_port", gateway_port)
        self.swarm_port = _check_port("swarm_port", swarm_port)
        ports = [self.api_port, self.gateway_port, self.swarm_port]
        if len(set(ports)) != len(ports):
            raise ConfigError(
                f"IPFS node ports must differ, got api {self.api_port}, gateway {self.gateway_port}, "
                f"swarm {self.swarm_port}."
            )
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.startup_duration_s: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_offset = 0

    @property
    def api_multiaddr(self) -> str:
        """Multiaddr of the HTTP RPC API, as ipfshttpclient expects it."""
        return f"/ip4/{self.host}/tcp/{self.api_port}/http"

    @property
    def api_url(self) -> str:
        """Base URL of the HTTP RPC API, without the ``/api/v0`` path."""
        return f"http://{self.host}:{self.api_port}"

    @property
    def gateway_url(self) -> str:
        """Base URL of the read-only HTTP gateway."""
        return f"http://{self.host}:{self.gateway_port}"

    @property
    def log_path(self) -> Path:
        """File that receives the daemon's stdout and stderr, appended to on every start."""
        return self.repo_dir / LOG_FILE_NAME

    @property
    def pid(self) -> int | None:
        """Process id of the running daemon, which is also its process group id."""
        if self.is_running:
            assert self._process is not None
            return self._process.pid
        return None

    @property
    def is_running(self) -> bool:
        """Whether the daemon process started by :meth:`start` is still alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Initialise the repo if needed, configure it and start the daemon.

        Returns once the daemon reports that it is ready and its HTTP API returns this repo's
        peer id. Does nothing if the daemon is already running.

        :raises ToolchainError: if ``jsipfs`` is missing, ``init`` fails, the repo is locked by
            a live daemon, or the daemon exits or is not ready within ``startup_timeout_s``.
        """
        if self.is_running:
            return
        # A daemon of ours that exited by itself: clear its pid file, log and repo lock.
        self.stop()
        if not os.access(self.jsipfs, os.X_OK):
            raise ToolchainError(
                f"jsipfs executable not found at {self.jsipfs}; run `npm ci` in {PROJECT_ROOT} "
                "or pass the path with jsipfs=."
            )

        began = time.monotonic()
        self.repo_dir.mkdir(parents=True, exist_ok=True)
        if not (self.repo_dir / "config").exists():
            self._init_repo()
        self._release_stale_lock()
        self._check_ports_free()
        peer_id = self._write_config()

        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - stays open while the daemon runs
        self._log_offset = self._log_file.tell()
        self._log_file.write(f"--- jsipfs daemon start {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
        self._log_file.flush()
        try:
            self._process = subprocess.Popen(
                [*self.command_prefix, str(self.jsipfs), "daemon", "--enable-preload=false"],
                env=self._environment(),
                cwd=self.repo_dir,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as error:
            self._close_log()
            raise ToolchainError(f"Cannot run {self.jsipfs}: {error}.") from error
        self._write_pid_file(self._process.pid)
        logger.debug("Started jsipfs daemon PID %d on repo %s", self._process.pid, self.repo_dir)

        try:
            self._wait_until_ready(peer_id, began + self.startup_timeout_s)
        except BaseException:
            self._kill()
            raise
        self.startup_duration_s = time.monotonic() - began
        logger.info(
            "IPFS node started: PID %d, API %s, repo %s, %.1f s",
            self._process.pid,
            self.api_multiaddr,
            self.repo_dir,
            self.startup_duration_s,
        )

    def stop(self) -> None:
        """Stop the daemon: SIGINT to its process group, then SIGKILL after ``stop_timeout_s``.

        Safe to call when the daemon is not running.
        """
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "jsipfs daemon PID %d ignored SIGINT for %.0f s; sending SIGKILL",
                    process.pid,
                    self.stop_timeout_s,
                )
                self._kill()
            level = logging.INFO if process.returncode == 0 else logging.WARNING
            logger.log(level, "IPFS node stopped: PID %d, exit code %s", process.pid, process.returncode)
        else:
            logger.warning(
                "jsipfs daemon PID %d had already exited with code %s", process.pid, process.returncode
            )
            self._remove_lock_of_exited_daemon(process.pid)
        self._process = None
        self._remove_pid_file()
        self._close_log()

    def log_tail(self) -> str:
        """Return the end of what the daemon wrote to its log since the last :meth:`start`."""
        try:
            size = self.log_path.stat().st_size
        except FileNotFoundError:
            return ""
        return self._read_log(max(self._log_offset, size - _LOG_TAIL_BYTES))

    def __enter__(self) -> IpfsNode:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"PID {self.pid}" if self.is_running else "stopped"
        return f"IpfsNode({str(self.repo_dir)!r}, api={self.api_multiaddr}, {state})"

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["IPFS_PATH"] = str(self.repo_dir)
        # With NODE_ENV=test js-ipfs skips the public preload nodes.
        env["NODE_ENV"] = "test"
        return env

    def _init_repo(self) -> None:
        logger.info("Initialising IPFS repo %s", self.repo_dir)
        try:
            result = subprocess.run(
                [str(self.jsipfs), "init", "--profile", "test"],
                env=self._environment(),
                cwd=self.repo_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=_INIT_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise ToolchainError(
                f"`jsipfs init` on {self.repo_dir} did not finish within {_INIT_TIMEOUT_S:.0f} s."
            ) from error
        if result.returncode != 0 or not (self.repo_dir / "config").exists():
            output = (result.stdout + result.stderr).decode("utf-8", errors="replace")[-_LOG_TAIL_BYTES:]
            raise ToolchainError(
                f"`jsipfs init` on {self.repo_dir} failed with exit code {result.returncode}:\n{output}"
            )

    def _write_config(self) -> str:
        """Rewrite the repo config so the daemon listens only on its host address; return the peer id."""
        config_path = self.repo_dir / "config"
        try:
            config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
            peer_id = str(config["Identity"]["PeerID"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ToolchainError(
                f"IPFS repo config {config_path} is unreadable ({error}); delete {self.repo_dir} "
                "to create a new repo."
            ) from error

        addresses = config.setdefault("Addresses", {})
        addresses["Swarm"] = [f"/ip4/{self.host}/tcp/{self.swarm_port}"]
        addresses["API"] = f"/ip4/{self.host}/tcp/{self.api_port}"
        addresses["Gateway"] = f"/ip4/{self.host}/tcp/{self.gateway_port}"
        addresses["Announce"] = []
        addresses["NoAnnounce"] = []
        addresses["Delegates"] = []
        # Without an RPC address js-ipfs starts no gRPC-over-websocket server.
        addresses.pop("RPC", None)
        config["Bootstrap"] = []
        discovery = config.setdefault("Discovery", {})
        discovery.setdefault("MDNS", {})["Enabled"] = False
        discovery.setdefault("webRTCStar", {})["Enabled"] = False
        config.setdefault("Swarm", {})["DisableNatPortMap"] = True
        config["Routing"] = {"Type": "none"}

        temporary = config_path.with_name("config.tmp")
        temporary.write_text(json.dumps(config, indent=2), encoding="utf-8")
        os.replace(temporary, config_path)
        return peer_id

    def _release_stale_lock(self) -> None:
        """Remove the repo lock left by a daemon that was killed, or raise if one still runs."""
        lock_dir = self.repo_dir / LOCK_DIR_NAME
        if not lock_dir.exists():
            return

        recorded = self._read_pid_file()
        if recorded is not None:
            pid, start_ticks = recorded
            if _is_same_process_alive(pid, start_ticks):
                raise ToolchainError(
                    f"IPFS repo {self.repo_dir} is in use by jsipfs daemon PID {pid}; stop that "
                    "daemon first or use another repo directory."
                )
            shutil.rmtree(lock_dir, ignore_errors=True)
            self._remove_pid_file()
            logger.warning(
                "Removed stale lock of IPFS repo %s left by daemon PID %d, which no longer runs",
                self.repo_dir,
                pid,
            )
            return

        # No daemon of ours is recorded, so another program may have the lock. js-ipfs itself
        # ignores a lock whose mtime was not refreshed for LOCK_STALE_S.
        age_s = time.time() - lock_dir.stat().st_mtime
        if age_s < LOCK_STALE_S:
            raise ToolchainError(
                f"IPFS repo {self.repo_dir} is locked by another process (lock refreshed {age_s:.0f} s "
                f"ago); stop that daemon, or delete {lock_dir} if none runs."
            )

    def _remove_lock_of_exited_daemon(self, pid: int) -> None:
        # Only called after this object reaped the daemon, so no live process owns the lock.
        lock_dir = self.repo_dir / LOCK_DIR_NAME
        if lock_dir.exists():
            shutil.rmtree(lock_dir, ignore_errors=True)
            logger.warning(
                "Removed stale lock of IPFS repo %s left by exited daemon PID %d", self.repo_dir, pid
            )

    def _check_ports_free(self) -> None:
        # js-ipfs 0.66.1 logs EADDRINUSE for a taken API port but keeps running,
        # so a taken port would otherwise only show up as a start-up timeout.
        if self.command_prefix:
            return  # the ports are bound wherever the prefix runs the daemon, not necessarily here
        for name, port in (
            ("API", self.api_port),
            ("gateway", self.gateway_port),
            ("swarm", self.swarm_port),
        ):
            if not _is_port_free(port, self.host):
                raise ToolchainError(
                    f"Cannot start the IPFS node on {self.repo_dir}: {name} port {port} on {self.host} is "
                    "in use by another process. Choose another port or stop that process."
                )

    def _wait_until_ready(self, peer_id: str, deadline: float) -> None:
        # Ready means the API returns this repo's peer id (another program may listen on
        # the port) and the daemon printed READY_LINE: js-ipfs installs its SIGINT handler
        # only after that line, and an earlier SIGINT kills it without a clean shutdown.
        assert self._process is not None
        url = f"{self.api_url}/api/v0/id"
        while True:
            exit_code = self._process.poll()
            if exit_code is not None:
                raise ToolchainError(
                    f"jsipfs daemon on {self.repo_dir} exited with code {exit_code} during start-up. "
                    f"Log tail:\n{self.log_tail()}"
                )
            output = self._read_log(self._log_offset)
            if READY_LINE in output and _fetch_peer_id(url) == peer_id:
                return
            if "EADDRINUSE" in output:
                raise ToolchainError(
                    f"jsipfs daemon on {self.repo_dir} could not bind a port that another process "
                    f"took after the check. Log tail:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise ToolchainError(
                    f"jsipfs daemon on {self.repo_dir} did not become ready on {self.api_url} within "
                    f"{self.startup_timeout_s:g} s. Log tail:\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def _kill(self) -> None:
        process = self._process
        if process is None:
            return
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()
        self._remove_lock_of_exited_daemon(process.pid)
        self._process = None
        self._remove_pid_file()
        self._close_log()

    def _write_pid_file(self, pid: int) -> None:
        record = {"pid": pid, "start_ticks": _process_start_ticks(pid)}
        (self.repo_dir / PID_FILE_NAME).write_text(json.dumps(record), encoding="utf-8")

    def _read_pid_file(self) -> tuple[int, int | None] | None:
        try:
            record = json.loads((self.repo_dir / PID_FILE_NAME).read_text(encoding="utf-8"))
            return int(record["pid"]), record.get("start_ticks")
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _remove_pid_file(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.repo_dir / PID_FILE_NAME).unlink()

    def _read_log(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def run_forever(
    repo_dir: str | os.PathLike[str],
    *,
    api_port: int | None = None,
    gateway_port: int | None = None,
    swarm_port: int | None = None,
    jsipfs: str | os.PathLike[str] | None = None,
) -> None:
    """Run an :class:`IpfsNode` in the foreground until SIGINT or SIGTERM, then stop it.

    :raises ToolchainError: if the daemon fails to start or exits by itself.
    """
    node = IpfsNode(
        repo_dir, api_port=api_port, gateway_port=gateway_port, swarm_port=swarm_port, jsipfs=jsipfs
    )
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("Received %s, stopping the IPFS node", signal.Signals(signum).name)
        stop_requested.set()

    installed: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            installed[signum] = signal.signal(signum, request_stop)
    try:
        node.start()
        logger.info(
            "IPFS API at %s, gateway at %s; press Ctrl-C to stop", node.api_multiaddr, node.gateway_url
        )
        while not stop_requested.wait(0.5):
            if not node.is_running:
                raise ToolchainError(
                    f"jsipfs daemon on {node.repo_dir} exited unexpectedly. Log tail:\n{node.log_tail()}"
                )
    finally:
        node.stop()
        for signum, handler in installed.items():
            signal.signal(signum, handler)


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now; another program may take it later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _is_port_free(port: int, host: str = HOST) -> bool:
    # SO_REUSEADDR as Node.js sets it, so that connections in TIME_WAIT do not count as use.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _check_port(name: str, port: int | None) -> int:
    if port is None:
        return find_free_port()
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"Invalid {name} {port!r}: expected a TCP port from 1 to 65535.")
    return port


def _fetch_peer_id(url: str) -> str | None:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=2.0) as response:
            return str(json.load(response).get("ID"))
    except (OSError, ValueError, AttributeError):
        # Not listening yet (URLError is an OSError), or another program replied.
        return None


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _process_start_ticks(pid: int) -> int | None:
    """Return the start time of ``pid`` in clock ticks since boot, or None without /proc."""
    fields = _read_proc_stat(pid)
    return int(fields[_STARTTIME_INDEX]) if fields is not None else None


def _is_same_process_alive(pid: int, start_ticks: int | None) -> bool:
    """Return True if ``pid`` runs and, where /proc exists, is the process recorded at start."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if start_ticks is None:
        return True  # recorded without /proc: the signal check is all there is
    fields = _read_proc_stat(pid)
    if fields is None or fields[0] == "Z":  # gone, or exited and not yet reaped
        return False
    return int(fields[_STARTTIME_INDEX]) == start_ticks


def _read_proc_stat(pid: int) -> list[str] | None:
    """Return the fields of /proc/PID/stat after the command name, or None if unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name in parentheses may contain spaces; the fields after it do not.
    return stat.rsplit(")", 1)[1].split()
