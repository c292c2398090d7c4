"""A contract-level walkthrough of one job's life on a fresh local chain.

It starts a chain, deploys the contracts, grants credits, registers three machines with
availability windows, relays a borrower-signed job order, assigns it, records two signed
work receipts per worker and completes the job. Three more jobs then take every other
path once. One is cancelled. One loses a worker that is faulted, replaced, restarted,
reclaimed and failed. One has a silent worker, so the job expires. Last, every balance is withdrawn. It prints credit
balances before and after, and the gas of every call. Checkpoint intervals are simulated
with ``evm_increaseTime`` (30 minutes each) so that payments are visible; no training runs.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from deepmarket.chain.client import CREDIT, MarketClient, connect
from deepmarket.chain.node import DEV_MNEMONIC, LocalChain
from deepmarket.chain.typed_data import (
    JobRequest,
    WorkReceipt,
    job_order_message,
    sign_typed,
    work_receipt_message,
)
from deepmarket.chain.wallet import dev_account
from deepmarket.errors import ContractRevert, DeepMarketError
from deepmarket.market.machines import ALWAYS, MachineSpec, hour_of_week

logger = logging.getLogger(__name__)

GRANT = 1_000 * CREDIT
STAKE = 20 * CREDIT
BUDGET = 50 * CREDIT
INTERVAL_S = 1_800  # simulated seconds of training per checkpoint


def credits(amount: int) -> str:
    return f"{amount / CREDIT:,.6f}"


def run_walkthrough(chain_kind: str = "ganache", report_path: Path | None = None,
                    echo: Any = print) -> dict[str, Any]:
    """Run the walkthrough and return its report (balances, payments, gas per call)."""
    with LocalChain(kind=chain_kind) as chain:
        w3 = connect(chain.rpc_url)
        admin, coordinator, borrower = (dev_account(DEV_MNEMONIC, i) for i in range(3))
        lenders = [dev_account(DEV_MNEMONIC, i) for i in range(3, 6)]
        names = {"borrower": borrower.address, **{f"lender{i + 1}": lender.address for i, lender in enumerate(lenders)}}

        echo(f"chain: {chain_kind} at {chain.rpc_url} (chain id {w3.eth.chain_id})")
        client = MarketClient.deploy(w3, admin, coordinator=coordinator.address)
        echo(f"deployed: CreditToken {client.token.address}, MachineRegistry {client.registry.address}, "
             f"JobMarket {client.market.address}")

        for address in names.values():
            client.mint(admin, address, GRANT)
        supply_before = client.token.functions.totalSupply().call()
        before = client.tracked_balances(names)

        machine_ids = _register_machines(client, lenders, echo)
        job_id = _submit_signed_job(client, borrower, coordinator, echo)
        _show_rejected_assignment(client, coordinator, job_id, machine_ids, echo)

        client.assign_job(coordinator, job_id, machine_ids, "bafkreiclusterspecwalkthrough")
        echo(f"job {job_id} assigned to machines {machine_ids} (slot 0 is the chief)")
        payments = _prove_checkpoints(client, job_id, machine_ids, lenders, echo, checkpoints=2)

        completed = client.complete_job(coordinator, job_id, "bafkreitrainedmodelwalkthrough")
        echo(f"job {job_id} completed: paid {credits(completed['paid'])}, refund {credits(completed['refund'])}")
        _exercise_failure_paths(client, coordinator, borrower, lenders, machine_ids, echo)
        for account in [borrower, *lenders]:
            client.withdraw(account)

        after = client.tracked_balances(names)
        supply_after = client.token.functions.totalSupply().call()
        report = {
            "chain": chain_kind,
            "job_id": job_id,
            "machine_ids": machine_ids,
            "balances_before": before,
            "balances_after": after,
            "lender_earnings": payments,
            "borrower_refund": completed["refund"],
            "total_supply_before": supply_before,
            "total_supply_after": supply_after,
            "gas": client.gas.summary(),
        }
    _print_report(report, echo)
    if sum(before.values()) != sum(after.values()) or supply_before != supply_after:
        raise DeepMarketError("credit conservation violated: balances or supply changed outside mint")
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _register_machines(client: MarketClient, lenders: list[Any], echo: Any) -> list[int]:
    now_hour = hour_of_week(client.latest_timestamp())
    day_start = now_hour - now_hour % 24
    windows = {
        "always": ALWAYS,
        "the whole current UTC day": sum(1 << h for h in range(day_start, day_start + 24)),
        "the current UTC hour and the next": (1 << now_hour) | (1 << ((now_hour + 1) % 168)),
    }
    ids = []
    for index, (lender, (label, mask)) in enumerate(zip(lenders, windows.items(), strict=True)):
        spec = MachineSpec(cores=2 + index, memory_mib=4096, gpus=0, benchmark_score=100,
                           price_per_core_hour=CREDIT * (index + 1) // 2, availability_mask=mask,
                           endpoint=f"127.0.0.1:{20_000 + index}")
        machine_id = client.register_machine(lender, spec.as_tuple(), STAKE)
        ids.append(machine_id)
        echo(f"machine {machine_id}: lender{index + 1}, {spec.cores} cores, "
             f"{credits(spec.price_per_core_hour)} credits per core-hour, available {label}")
    return ids


def _submit_signed_job(client: MarketClient, borrower: Any, relayer: Any, echo: Any) -> int:
    now = client.latest_timestamp()
    request = JobRequest(bundleCid="bafkreijobbundlewalkthrough", budget=BUDGET,
                         maxPricePerCoreHour=2 * CREDIT, workers=3, minCores=2, minMemoryMib=2048,
                         jobDeadline=now + 24 * 3600)
    nonce = client.order_nonce(borrower.address)
    deadline = now + 600
    message = job_order_message(borrower.address, request, nonce, deadline, client.deployment.chain_id,
                                client.market.address)
    signature = sign_typed(borrower, message)
    client.approve(borrower, client.market.address, request.budget)
    job_id = client.submit_signed_order(relayer, borrower.address, request, nonce, deadline, signature)
    echo(f"job {job_id} submitted by a relayer with the borrower's EIP-712 signature; "
         f"{credits(request.budget)} credits escrowed")
    try:
        client.submit_signed_order(relayer, borrower.address, request, nonce, deadline, signature)
    except ContractRevert as exc:
        echo(f"replaying the same signed order is rejected: {exc.name}")
    return job_id


def _show_rejected_assignment(client: MarketClient, coordinator: Any, job_id: int, machine_ids: list[int],
                              echo: Any) -> None:
    try:
        client.assign_job(coordinator, job_id, [machine_ids[0], machine_ids[0], machine_ids[1]], "bafkreibadspec")
    except ContractRevert as exc:
        echo(f"assigning one machine twice is rejected: {exc.name}")


def _prove_checkpoints(client: MarketClient, job_id: int, machine_ids: list[int], lenders: list[Any],
                       echo: Any, checkpoints: int) -> dict[str, int]:
    payments: dict[str, int] = {lender.address: 0 for lender in lenders}
    for index in range(1, checkpoints + 1):
        client.w3.provider.make_request("evm_increaseTime", [INTERVAL_S])
        client.w3.provider.make_request("evm_mine", [])
        checkpoint_cid = f"bafkreicheckpoint{index:04d}walkthrough"
        for machine_id, lender in zip(machine_ids, lenders, strict=True):
            worker = next(w for w in client.get_workers(job_id) if w["machine_id"] == machine_id)
            core_seconds = worker["cores"] * (client.latest_timestamp() - worker["since"])
            receipt = WorkReceipt(job_id, machine_id, index, index * 100, checkpoint_cid, core_seconds)
            signature = sign_typed(lender, work_receipt_message(receipt, client.deployment.chain_id,
                                                                client.market.address))
            paid = client.record_proof(lender, receipt, signature)
            payments[lender.address] += paid
            echo(f"proof recorded: job {job_id} machine {machine_id} checkpoint {index}, "
                 f"{core_seconds} core-seconds, paid {credits(paid)}")
    return payments


def _exercise_failure_paths(client: MarketClient, coordinator: Any, borrower: Any, lenders: list[Any],
                            machine_ids: list[int], echo: Any) -> None:
    """Run every settlement and recovery call once, so the gas table covers them too."""
    def request(workers: int) -> JobRequest:
        return JobRequest(bundleCid="bafkreijobbundlewalkthrough", budget=5 * CREDIT, maxPricePerCoreHour=2 * CREDIT,
                          workers=workers, minCores=1, minMemoryMib=1024,
                          jobDeadline=client.latest_timestamp() + 24 * 3600)

    cancelled = client.submit_job(borrower, request(1))
    client.cancel_job(borrower, cancelled)
    echo(f"job {cancelled} submitted and cancelled by its borrower: full refund")

    # A lost worker: ready, stopped, faulted, replaced; then a restart, a reclaim and a failure.
    job_id = client.submit_job(borrower, request(1))
    first, second = machine_ids[0], machine_ids[1]
    client.assign_job(coordinator, job_id, [first], "bafkreiclusterspecfailures1")
    client.report_ready(lenders[0], job_id, first)
    client.report_stopped(lenders[0], job_id, first)
    slashed = client.report_fault(coordinator, job_id, first)
    client.replace_worker(coordinator, job_id, 0, second, "bafkreiclusterspecfailures2")
    client.restart_cluster(coordinator, job_id, "bafkreiclusterspecfailures3")
    client.leave_job(lenders[1], job_id, second)
    client.fail_job(coordinator, job_id, "walkthrough: no machine left")
    echo(f"job {job_id}: machine {first} lost ({credits(slashed)} slashed to the borrower), replaced by machine "
         f"{second}, restarted, reclaimed by its owner, then failed with a full refund of the escrow")

    # A silent worker: the job expires after the proof timeout and the worker is slashed.
    job_id = client.submit_job(borrower, request(1))
    client.assign_job(coordinator, job_id, [second], "bafkreiclusterspecfailures4")
    client.w3.provider.make_request("evm_increaseTime", [client.market.functions.proofTimeout().call() + 1])
    client.w3.provider.make_request("evm_mine", [])
    expired = client.expire_job(coordinator, job_id)
    echo(f"job {job_id} expired after the proof timeout: refund {credits(expired['refund'])}, "
         f"slashed {credits(expired['slashed'])}")


def _print_report(report: dict[str, Any], echo: Any) -> None:
    echo("")
    echo(f"{'account':<18}{'before':>20}{'after':>20}{'change':>20}")
    for name, before in report["balances_before"].items():
        after = report["balances_after"][name]
        echo(f"{name:<18}{credits(before):>20}{credits(after):>20}{credits(after - before):>20}")
    echo(f"{'sum':<18}{credits(sum(report['balances_before'].values())):>20}"
         f"{credits(sum(report['balances_after'].values())):>20}")
    echo("")
    echo(f"{'call':<26}{'calls':>6}{'gas (mean)':>12}{'min':>10}{'max':>10}")
    for name, row in report["gas"].items():
        echo(f"{name:<26}{row['calls']:>6}{row['mean']:>12}{row['min']:>10}{row['max']:>10}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    run_walkthrough()
    print(f"walkthrough finished in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
