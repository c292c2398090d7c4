"""The end-to-end demo: a real distributed TensorFlow job bought with credits.

It runs on a :class:`~deepmarket.localnet.LocalMarketplace`: a local Ganache chain, a local
IPFS node, the contracts, and a coordinator and N lender daemons as separate processes with
their own encrypted keys. A borrower submits a signed job that trains a small Keras model
on scikit-learn's bundled handwritten digits across N workers. The demo follows its
checkpoints, evaluates the trained model on the held-out test split that never left the
borrower, checks that every credit is accounted for, prints a summary and writes it to
``build/demo-report.json``. Every process it starts is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from deepmarket.bundles import upload_bundle
from deepmarket.chain.client import CREDIT, MarketClient
from deepmarket.chain.typed_data import JobRequest
from deepmarket.errors import DeepMarketError
from deepmarket.localnet import LocalMarketplace
from deepmarket.market import operations
from deepmarket.toolchain import BUILD_DIR

logger = logging.getLogger(__name__)

BUDGET = 100 * CREDIT
PRICE_PER_CORE_HOUR = "60"  # credits: one credit per core-minute, so a short run shows visible pay
JOB_TIMEOUT_S = 600
JOB_COMPLETED, JOB_CANCELLED, JOB_FAILED, JOB_EXPIRED = 3, 4, 5, 6


def run_demo(workers: int = 3, epochs: int = 8, out_dir: Path | None = None, echo: Any = print,
             kill_lender_after_epoch: int | None = None, reclaim_lender_after_epoch: int | None = None,
             hang_lender_after_epoch: int | None = None) -> dict[str, Any]:
    """Run the demo job end to end and return its report.

    A fault hits the lender of slot 1 (slot 0 for a single worker) once the chief proved
    checkpoint K. With `kill_lender_after_epoch` K its daemon and worker are killed with
    SIGKILL. With `hang_lender_after_epoch` K they are frozen with SIGSTOP. With
    `reclaim_lender_after_epoch` K its owner reclaims the machine. A fault starts one
    spare lender so that a replacement exists.
    """
    requested = {"kill": kill_lender_after_epoch, "reclaim": reclaim_lender_after_epoch,
                 "hang": hang_lender_after_epoch}
    faults = [Fault(kind, epoch) for kind, epoch in requested.items() if epoch is not None]
    if len(faults) > 1:
        raise DeepMarketError("give at most one of --kill-, --hang- and --reclaim-lender-after-epoch")
    fault = faults[0] if faults else None
    if fault is not None and not 1 <= fault.after_epoch < epochs:
        raise DeepMarketError(f"a fault after epoch {fault.after_epoch} is invalid: give 1 <= K < --epochs ({epochs})")
    if workers < 1:
        raise DeepMarketError(f"--workers {workers} is invalid: give at least 1")
    if epochs < 1:
        raise DeepMarketError(f"--epochs {epochs} is invalid: give at least 1")
    root = out_dir or BUILD_DIR / "demo"
    if root.exists():
        shutil.rmtree(root)
    started = time.monotonic()
    net = LocalMarketplace(root)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C must still stop the demo cleanly.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        echo("starting the local chain and IPFS node, deploying the contracts ...")
        net.start()
        return _run(net, workers, epochs, started, echo, fault)
    finally:
        echo("stopping daemons, IPFS node and chain ...")
        net.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


class Fault:
    """A fault the demo injects into one assigned lender, and what it observed."""

    def __init__(self, kind: str, after_epoch: int) -> None:
        self.kind = kind  # "kill", "hang" or "reclaim"
        self.after_epoch = after_epoch
        self.lender: str | None = None
        self.machine_id: int | None = None
        self.injected_at: float | None = None

    def inject(self, net: LocalMarketplace, job_id: int, echo: Any) -> None:
        workers = net.client.get_workers(job_id)
        target = workers[1] if len(workers) > 1 else workers[0]
        self.machine_id = int(target["machine_id"])
        self.lender = next(name for name, a in net.accounts.items() if a.address == target["lender"])
        self.injected_at = time.time()
        if self.kind == "kill":
            net.stop_process(self.lender, sig=signal.SIGKILL)
            echo(f"\nfault: killed {self.lender} (machine {self.machine_id}), daemon and TF worker")
        elif self.kind == "hang":
            net.signal_process(self.lender, signal.SIGSTOP)
            echo(f"\nfault: froze {self.lender} (machine {self.machine_id}), daemon and TF worker, with SIGSTOP")
        else:
            (net.root / self.lender / "reclaim.request").write_text(str(int(self.injected_at)))
            echo(f"\nfault: the owner of {self.lender} (machine {self.machine_id}) reclaims it")

    def report(self, client: MarketClient, job_id: int) -> dict[str, Any]:
        """Read back from the job's contract events what happened after the injection."""
        w3, market, start = client.w3, client.market, client.deployment.block
        block_time = lambda log: int(w3.eth.get_block(log["blockNumber"])["timestamp"])  # noqa: E731
        filters = {"jobId": job_id, "machineId": self.machine_id}
        lost = (market.events.WorkerLeft() if self.kind == "reclaim" else market.events.WorkerFaulted()).get_logs(
            from_block=start, argument_filters=filters)
        replaced = [log for log in market.events.WorkerReplaced().get_logs(
            from_block=start, argument_filters={"jobId": job_id}) if log["args"]["oldMachineId"] == self.machine_id]
        proofs = market.events.ProofRecorded().get_logs(from_block=start, argument_filters=filters)
        detected_at = block_time(lost[0]) if lost else None
        replaced_at = block_time(replaced[0]) if replaced else None
        recovered_at = None
        if replaced_at is not None:
            later = [log for log in market.events.ProofRecorded().get_logs(
                from_block=replaced[0]["blockNumber"], argument_filters={"jobId": job_id})]
            recovered_at = block_time(later[0]) if later else None
        assert self.injected_at is not None
        return {
            "kind": self.kind,
            "after_epoch": self.after_epoch,
            "lender": self.lender,
            "machine_id": self.machine_id,
            "injected_at": round(self.injected_at, 3),
            "detected_at": detected_at,
            "detection_s": None if detected_at is None else round(detected_at - self.injected_at, 1),
            "replacement_machine_id": int(replaced[0]["args"]["newMachineId"]) if replaced else None,
            "recovered_at": recovered_at,
            "recovery_s": None if recovered_at is None else round(recovered_at - self.injected_at, 1),
            "slashed": int(lost[0]["args"]["slashed"]) if lost and self.kind != "reclaim" else 0,
            "proofs_by_lost_lender": sorted(int(log["args"]["checkpointIndex"]) for log in proofs),
            "paid_to_lost_lender": sum(int(log["args"]["payment"]) for log in proofs),
        }


def _run(net: LocalMarketplace, workers: int, epochs: int, started: float, echo: Any,
         fault: Fault | None = None) -> dict[str, Any]:
    from deepmarket.results import download_result, fetch_result_manifest
    from deepmarket.training import digits
    from deepmarket.training.bundle import load_config

    client, store = net.client, net.store
    borrower = net.accounts["borrower"]
    net.start_coordinator()
    lenders = workers + (1 if fault else 0)  # a spare lender, so that a replacement exists
    for index in range(lenders):
        net.start_lender(f"lender{index + 1}", price=PRICE_PER_CORE_HOUR)
    net.wait_for(lambda: client.machine_count() >= lenders, 120, "lender machines to register")
    echo(f"coordinator and {lenders} lender daemons running; market {client.market.address}")
    balances_before = net.balances()

    inputs = digits.write_demo_inputs(net.root / "borrower")
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

    def inject(index: int) -> None:
        if fault is not None and fault.injected_at is None and index >= fault.after_epoch:
            fault.inject(net, job_id, echo)

    follow_job(net, job_id, epochs, echo, on_checkpoint=inject)
    wall_time_s = time.time() - submitted_at
    job = client.get_job(job_id)
    result = fetch_result_manifest(client, store, job_id)
    model_path = download_result(client, store, job_id, net.root / "borrower" / "trained-model.keras")
    trained_model_cid = store.add_file(model_path)
    accuracy = digits.evaluate(model_path, inputs.dataset_path)
    echo(f"held-out accuracy of the trained model: {accuracy:.4f}")

    lenders = {name: a.address for name, a in net.accounts.items() if name.startswith("lender")}
    assigned = [w["lender"] for w in client.get_workers(job_id)]
    # A killed lender's pay stays withdrawable until its owner runs `deepmarket lender claim`.
    running = {net.accounts[name].address for name in net.processes if name.startswith("lender")}
    net.wait_for(lambda: all(client.withdrawable(a) == 0 for a in assigned if a in running), 60,
                 "lenders to claim their payouts")
    refund = operations.claim_payout(client, borrower)
    balances_after = net.balances()
    report = {
        "job_id": job_id,
        "status": "completed" if job["status"] == JOB_COMPLETED else str(job["status"]),
        "workers": assigned,
        "epochs": result["epochs"],
        "test_accuracy": accuracy,
        "wall_time_s": round(wall_time_s, 2),
        "demo_time_s": round(time.monotonic() - started, 2),
        "dataset_cid": dataset_cid,
        "bundle_cid": bundle_cid,
        "model_cid": trained_model_cid,
        "result_cid": job["result_cid"],
        "weights_cid": result["weights_cid"],
        "checkpoint_cids": result["checkpoint_cids"],
        "balances_before": balances_before,
        "balances_after": balances_after,
        "lender_earnings": {name: balances_after[name] - balances_before[name] for name in lenders},
        "borrower_refund": refund,
        "paid_to_lenders": job["paid"],
        "gas_used": gas_by_call(client, {name: a.address for name, a in net.accounts.items()}),
        "addresses": {name: a.address for name, a in net.accounts.items()},
        "faults": [fault.report(client, job_id)] if fault else [],
        "restarts": int(job["round"]) - 1,
    }
    _print_summary(report, echo)
    if sum(balances_before.values()) != sum(balances_after.values()):
        raise DeepMarketError("credit conservation violated: the sum of all balances changed")
    report_path = BUILD_DIR / "demo-report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    echo(f"report written to {report_path}")
    return report


def follow_job(net: LocalMarketplace, job_id: int, epochs: int, echo: Any = print,
               timeout_s: float = JOB_TIMEOUT_S, on_checkpoint: Any = None) -> dict[str, Any]:
    """Show a progress bar of the chief's proved checkpoints until the job completes; return the job."""
    from tqdm import tqdm

    client, store = net.client, net.store
    deadline = time.monotonic() + timeout_s
    seen: set[int] = set()
    with tqdm(total=epochs, desc=f"job {job_id}", unit="epoch", file=sys.stdout, dynamic_ncols=True) as bar:
        while time.monotonic() < deadline:
            net.check_alive()
            job = client.get_job(job_id)
            for index, cid in _chief_checkpoints(client, job_id).items():
                if index not in seen:
                    seen.add(index)
                    metrics = store.get_json(cid).get("metrics", {})
                    if "val_accuracy" in metrics:
                        bar.set_postfix(val_accuracy=f"{metrics['val_accuracy']:.3f}")
                    bar.update(1)
                    if on_checkpoint is not None:
                        on_checkpoint(index)
            if job["status"] == JOB_COMPLETED:
                return job
            if job["status"] in (JOB_CANCELLED, JOB_FAILED, JOB_EXPIRED):
                raise DeepMarketError(f"job {job_id} ended with status {job['status']}; coordinator log:\n"
                                      f"{net.log_tail('coordinator')}")
            time.sleep(1.0)
    raise DeepMarketError(f"job {job_id} did not complete within {timeout_s:.0f} s")


def _chief_checkpoints(client: MarketClient, job_id: int) -> dict[int, str]:
    """checkpoint index -> CID of the receipts recorded by whichever machine held slot 0."""
    workers = client.get_workers(job_id)
    if not workers:
        return {}
    logs = client.market.events.ProofRecorded().get_logs(
        from_block=client.deployment.block, argument_filters={"jobId": job_id})
    found: dict[int, str] = {}
    for log in logs:
        found.setdefault(int(log["args"]["checkpointIndex"]), str(log["args"]["checkpointCid"]))
    return found


def gas_by_call(client: MarketClient, addresses: dict[str, str]) -> dict[str, Any]:
    """Gas used by each named account and by each contract function, over the whole chain."""
    w3 = client.w3
    by_address = {a: n for n, a in addresses.items()}
    contracts = {c.address: c for c in (client.token, client.registry, client.market)}
    by_account: dict[str, int] = defaultdict(int)
    by_call: dict[str, list[int]] = defaultdict(list)
    for number in range(client.deployment.block, w3.eth.block_number + 1):
        for tx in w3.eth.get_block(number, full_transactions=True)["transactions"]:
            gas = int(w3.eth.get_transaction_receipt(tx["hash"])["gasUsed"])
            name = by_address.get(tx["from"])
            if name is not None:
                by_account[name] += gas
            contract = contracts.get(tx["to"]) if tx["to"] else None
            if contract is not None:
                try:
                    function, _ = contract.decode_function_input(tx["input"])
                    by_call[function.fn_name].append(gas)
                except ValueError:
                    continue
    return {"by_account": dict(by_account),
            "by_call": {k: {"calls": len(v), "mean": sum(v) // len(v), "max": max(v)} for k, v in sorted(by_call.items())}}


def _print_summary(report: dict[str, Any], echo: Any) -> None:
    fmt = operations.format_credits
    gas = report["gas_used"]["by_account"]
    echo("")
    echo(f"job {report['job_id']} {report['status']}: {report['epochs']} epochs on {len(report['workers'])} lenders, "
         f"held-out accuracy {report['test_accuracy']:.4f}, {report['wall_time_s']:.1f} s from submission")
    echo(f"{'account':<18}{'before':>16}{'after':>16}{'change':>16}{'gas used':>12}")
    for name, before in report["balances_before"].items():
        after = report["balances_after"][name]
        echo(f"{name:<18}{fmt(before):>16}{fmt(after):>16}{fmt(after - before):>16}{gas.get(name, ''):>12}")
    echo(f"{'sum':<18}{fmt(sum(report['balances_before'].values())):>16}"
         f"{fmt(sum(report['balances_after'].values())):>16}")
    echo(f"paid to lenders {fmt(report['paid_to_lenders'])}, refunded to the borrower {fmt(report['borrower_refund'])}")
    echo(f"dataset {report['dataset_cid']}")
    echo(f"trained model {report['model_cid']} (result manifest {report['result_cid']}, "
         f"final weights {report['weights_cid']})")
    for fault in report["faults"]:
        echo(f"fault: {fault['kind']} of {fault['lender']} (machine {fault['machine_id']}) after epoch "
             f"{fault['after_epoch']}: detected after {fault['detection_s']} s, replaced by machine "
             f"{fault['replacement_machine_id']}, training resumed {fault['recovery_s']} s after the fault; "
             f"it proved checkpoints {fault['proofs_by_lost_lender']} and was paid {fmt(fault['paid_to_lost_lender'])}, "
             f"slashed {fmt(fault['slashed'])}")
    if report["faults"]:
        echo(f"cluster restarts: {report['restarts']}")
