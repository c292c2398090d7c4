"""The end-to-end demo: a real distributed TensorFlow job bought with credits.

It starts a local Ganache chain and a local IPFS node, deploys the contracts, creates
encrypted keystores for a coordinator, a borrower and N lenders, funds them, starts the
coordinator and N lender daemons as separate processes, and submits a borrower-signed job
that trains a small Keras model on scikit-learn's bundled handwritten digits across N
workers. It then evaluates the trained model on the held-out test split that never left
the borrower, checks that every credit is accounted for, prints a summary and writes it
to ``build/demo-report.json``. Every process it starts is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from deepmarket.bundles import upload_bundle
from deepmarket.chain.client import CREDIT, MarketClient, connect
from deepmarket.chain.node import DEV_MNEMONIC, LocalChain, free_port
from deepmarket.chain.typed_data import JobRequest
from deepmarket.chain.wallet import create_keystore, dev_account
from deepmarket.errors import DeepMarketError
from deepmarket.market import operations
from deepmarket.storage.node import IpfsNode
from deepmarket.storage.store import IpfsStore
from deepmarket.toolchain import BUILD_DIR, tool_env

logger = logging.getLogger(__name__)

ETH_FUNDING = 10 * 10**18  # wei sent to each demo account for gas
BORROWER_GRANT = 500 * CREDIT
LENDER_GRANT = 50 * CREDIT
LENDER_STAKE = "20"
PRICE_PER_CORE_HOUR = "60"  # credits: one credit per core-minute, so short runs show visible pay
BUDGET = 100 * CREDIT
JOB_TIMEOUT_S = 600


class DemoProcesses:
    """Child daemons of the demo; :meth:`stop_all` ends each one and its descendants."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        process = subprocess.Popen([sys.executable, "-m", "deepmarket", *argv], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()
        self.children[name] = process
        logger.info("started %s: pid %s", name, process.pid)
        return process

    def check_alive(self) -> None:
        for name, process in self.children.items():
            if process.poll() is not None:
                raise DeepMarketError(f"{name} exited with code {process.returncode}; see {self.log_dir / name}.log")

    def stop_all(self, grace_s: float = 10.0) -> None:
        for name, process in self.children.items():
            descendants = _descendants(process.pid)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s; killing it", name, grace_s)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            for child in descendants:
                with contextlib.suppress(psutil.Error):
                    child.kill()
        self.children.clear()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def run_demo(workers: int = 3, epochs: int = 8, out_dir: Path | None = None, echo: Any = print) -> dict[str, Any]:
    """Run the demo job end to end and return its report."""
    if workers < 1:
        raise DeepMarketError(f"--workers {workers} must be at least 1")
    if epochs < 1:
        raise DeepMarketError(f"--epochs {epochs} must be at least 1")
    root = out_dir or BUILD_DIR / "demo"
    if root.exists():
        shutil.rmtree(root)
    (root / "logs").mkdir(parents=True)
    started = time.monotonic()
    processes = DemoProcesses(root / "logs")
    chain = LocalChain(kind=os.environ.get("DEEPMARKET_CHAIN", "ganache"), log_path=root / "logs" / "chain.log")
    ipfs = IpfsNode(root / "ipfs")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        echo("starting the local chain and IPFS node ...")
        chain.start()
        ipfs.start()
        return _run(root, workers, epochs, chain, ipfs, processes, started, echo)
    finally:
        echo("stopping daemons, IPFS node and chain ...")
        processes.stop_all()
        ipfs.stop()
        chain.stop()
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _run(root: Path, workers: int, epochs: int, chain: LocalChain, ipfs: IpfsNode, processes: DemoProcesses,
         started: float, echo: Any) -> dict[str, Any]:
    from deepmarket.training import digits
    from deepmarket.training.bundle import load_config

    w3 = connect(chain.rpc_url)
    store = IpfsStore(ipfs.api_multiaddr)
    funder = dev_account(DEV_MNEMONIC, 0)
    password = secrets.token_urlsafe(16)
    keys = root / "keystores"
    coordinator = create_keystore(keys / "coordinator.json", password)
    borrower = create_keystore(keys / "borrower.json", password)
    lenders = [create_keystore(keys / f"lender{i + 1}.json", password) for i in range(workers)]

    client = operations.deploy(w3, funder, coordinator.address, root / "deployment.json")
    for account in [coordinator, borrower, *lenders]:
        _send_eth(w3, funder, account.address, ETH_FUNDING)
    client.mint(funder, borrower.address, BORROWER_GRANT, "onboarding")
    for lender in lenders:
        client.mint(funder, lender.address, LENDER_GRANT, "onboarding")
    echo(f"contracts deployed; market {client.market.address}")

    env = tool_env()
    env.update({"DEEPMARKET_RPC_URL": chain.rpc_url, "DEEPMARKET_IPFS_API": ipfs.api_multiaddr,
                "DEEPMARKET_DEPLOYMENT": str(root / "deployment.json"), "DEEPMARKET_HOME": str(root),
                "DEEPMARKET_PASSWORD": password, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"})
    processes.start("coordinator", ["coordinator", "run", "--keystore", str(keys / "coordinator.json")], env)
    for index in range(workers):
        processes.start(f"lender{index + 1}", [
            "lender", "start", "--keystore", str(keys / f"lender{index + 1}.json"),
            "--work-dir", str(root / f"lender{index + 1}"), "--tf-port", str(free_port()), "--cores", "1",
            "--memory-mib", "2048", "--price", PRICE_PER_CORE_HOUR, "--stake", LENDER_STAKE, "--windows", "always"],
            env)
    _wait_for(lambda: client.machine_count() >= workers, 120, "lender machines to register", processes)
    echo(f"{workers} lender daemons registered their machines")

    names = {"borrower": borrower.address, **{f"lender{i + 1}": a.address for i, a in enumerate(lenders)},
             "coordinator": coordinator.address}
    balances_before = _balances(client, names)
    gas_before = {a: _gas_spent(w3, a) for a in names.values()}

    inputs = digits.write_demo_inputs(root / "borrower")
    config = load_config(inputs.config_path)
    config = type(config)(**{**config.__dict__, "epochs": epochs})
    bundle_cid = upload_bundle(store, inputs.model_path, inputs.dataset_path, config)
    dataset_cid = store.get_json(bundle_cid)["dataset_cid"]
    request = JobRequest(bundleCid=bundle_cid, budget=BUDGET, maxPricePerCoreHour=100 * CREDIT, workers=workers,
                         minCores=1, minMemoryMib=1024, jobDeadline=client.latest_timestamp() + 3600)
    submitted_at = time.time()
    job_id = operations.submit_signed_job(client, borrower, borrower, request)
    echo(f"job {job_id} submitted: bundle {bundle_cid}, {workers} workers, {epochs} epochs, "
         f"{BUDGET / CREDIT:.0f} credits escrowed")

    _follow_job(client, store, job_id, epochs, processes, echo)
    job = client.get_job(job_id)
    wall_time_s = time.time() - submitted_at
    from deepmarket.results import download_result, fetch_result_manifest

    result = fetch_result_manifest(client, store, job_id)
    model_path = download_result(client, store, job_id, root / "borrower" / "trained-model.keras")
    accuracy = digits.evaluate(model_path, inputs.dataset_path)
    echo(f"held-out accuracy of the trained model: {accuracy:.4f}")

    assigned = [w["lender"] for w in client.get_workers(job_id)]
    _wait_for(lambda: all(client.withdrawable(a) == 0 for a in assigned), 60, "lenders to claim their payouts",
              processes)
    refund = operations.claim_payout(client, borrower)
    balances_after = _balances(client, names)
    earnings = {name: balances_after[name] - balances_before[name] for name in names if name.startswith("lender")}
    report = {
        "job_id": job_id,
        "status": "completed" if job["status"] == 3 else str(job["status"]),
        "workers": assigned,
        "epochs": result["epochs"],
        "test_accuracy": accuracy,
        "wall_time_s": round(wall_time_s, 2),
        "demo_time_s": round(time.monotonic() - started, 2),
        "dataset_cid": dataset_cid,
        "bundle_cid": bundle_cid,
        "model_cid": job["result_cid"],
        "weights_cid": result["weights_cid"],
        "checkpoint_cids": result["checkpoint_cids"],
        "balances_before": balances_before,
        "balances_after": balances_after,
        "lender_earnings": earnings,
        "borrower_refund": refund,
        "paid_to_lenders": job["paid"],
        "gas_used": {name: _gas_spent(w3, addr) - gas_before[addr] for name, addr in names.items()},
        "addresses": names,
    }
    _print_summary(report, echo)
    if sum(balances_before.values()) != sum(balances_after.values()):
        raise DeepMarketError("credit conservation violated: the sum of balances changed")
    report_path = BUILD_DIR / "demo-report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    echo(f"report written to {report_path}")
    return report


def _follow_job(client: MarketClient, store: IpfsStore, job_id: int, epochs: int, processes: DemoProcesses,
                echo: Any) -> None:
    from tqdm import tqdm

    deadline = time.monotonic() + JOB_TIMEOUT_S
    seen: set[int] = set()
    with tqdm(total=epochs, desc=f"job {job_id}", unit="epoch", file=sys.stdout, dynamic_ncols=True) as bar:
        while time.monotonic() < deadline:
            processes.check_alive()
            job = client.get_job(job_id)
            workers = client.get_workers(job_id)
            if workers:
                chief = workers[0]["machine_id"]
                logs = client.market.events.ProofRecorded().get_logs(
                    from_block=client.deployment.block, argument_filters={"jobId": job_id, "machineId": chief})
                for log in logs:
                    index = int(log["args"]["checkpointIndex"])
                    if index not in seen:
                        seen.add(index)
                        metrics = store.get_json(log["args"]["checkpointCid"]).get("metrics", {})
                        bar.set_postfix(val_accuracy=f"{metrics.get('val_accuracy', float('nan')):.3f}")
                        bar.update(1)
            if job["status"] == 3:
                return
            if job["status"] in (4, 5, 6):
                raise DeepMarketError(f"job {job_id} ended with status {job['status']} (see the coordinator log)")
            time.sleep(1.0)
    raise DeepMarketError(f"job {job_id} did not complete within {JOB_TIMEOUT_S} s")


def _wait_for(condition: Any, timeout_s: float, what: str, processes: DemoProcesses) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        processes.check_alive()
        if condition():
            return
        time.sleep(0.5)
    raise DeepMarketError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _send_eth(w3: Any, sender: Any, to: str, value: int) -> None:
    tx = {"to": to, "value": value, "nonce": w3.eth.get_transaction_count(sender.address, "pending"),
          "chainId": w3.eth.chain_id, "gas": 21_000, "maxFeePerGas": 4 * 10**9, "maxPriorityFeePerGas": 10**9}
    w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(sender.sign_transaction(tx).raw_transaction))


def _gas_spent(w3: Any, address: str) -> int:
    """Gas units an account has paid for, from its transaction count is not enough; sum receipts instead."""
    total = 0
    for number in range(w3.eth.block_number + 1):
        block = w3.eth.get_block(number, full_transactions=True)
        for tx in block["transactions"]:
            if tx["from"] == address:
                total += int(w3.eth.get_transaction_receipt(tx["hash"])["gasUsed"])
    return total


def _balances(client: MarketClient, names: dict[str, str]) -> dict[str, int]:
    balances = client.tracked_balances(names)
    return balances


def _print_summary(report: dict[str, Any], echo: Any) -> None:
    fmt = operations.format_credits
    echo("")
    echo(f"job {report['job_id']} {report['status']}: {report['epochs']} epochs on {len(report['workers'])} lenders, "
         f"test accuracy {report['test_accuracy']:.4f}, {report['wall_time_s']:.1f} s from submission")
    echo(f"{'account':<18}{'before':>16}{'after':>16}{'change':>16}{'gas used':>12}")
    for name, before in report["balances_before"].items():
        after = report["balances_after"][name]
        gas = report["gas_used"].get(name, "")
        echo(f"{name:<18}{fmt(before):>16}{fmt(after):>16}{fmt(after - before):>16}{gas:>12}")
    echo(f"{'sum':<18}{fmt(sum(report['balances_before'].values())):>16}"
         f"{fmt(sum(report['balances_after'].values())):>16}")
    echo(f"paid to lenders {fmt(report['paid_to_lenders'])}, refunded to the borrower {fmt(report['borrower_refund'])}")
    echo(f"dataset {report['dataset_cid']}")
    echo(f"result  {report['model_cid']} (weights {report['weights_cid']})")
