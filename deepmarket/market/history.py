"""A job's history as log lines, read from the contract events that concern it.

The chain is the one log every party shares: lenders' worker logs stay on their machines.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from typing import Any

from deepmarket.chain.client import CREDIT, MarketClient

JOB_EVENTS = ("JobSubmitted", "JobAssigned", "WorkerReady", "WorkerStopped", "ProofRecorded", "WorkerFaulted",
              "WorkerLeft", "WorkerReplaced", "JobCompleted", "JobCancelled", "JobFailed", "JobExpired")
TERMINAL_EVENTS = {"JobCompleted", "JobCancelled", "JobFailed", "JobExpired"}
POLL_S = 1.0


def job_history(client: MarketClient, job_id: int, follow: bool = False) -> Iterator[str]:
    """Yield one line per event of job `job_id`, oldest first; with `follow`, wait for more until the job ends."""
    client.get_job(job_id)  # raises ContractRevert(MarketJobNotFound) for an unknown id
    from_block = client.deployment.block
    while True:
        latest = client.w3.eth.block_number
        entries = []
        for name in JOB_EVENTS:
            event = getattr(client.market.events, name)()
            for log in event.get_logs(from_block=from_block, to_block=latest, argument_filters={"jobId": job_id}):
                entries.append((log["blockNumber"], log["logIndex"], name, dict(log["args"])))
        entries.sort()
        ended = False
        for block, _, name, args in entries:
            stamp = datetime.datetime.fromtimestamp(client.w3.eth.get_block(block)["timestamp"], datetime.UTC)
            yield f"{stamp:%Y-%m-%d %H:%M:%S} block {block} {name}: {_describe(name, args)}"
            ended = ended or name in TERMINAL_EVENTS
        if not follow or ended:
            return
        from_block = latest + 1
        time.sleep(POLL_S)


def _describe(name: str, args: dict[str, Any]) -> str:
    def credits(amount: int) -> str:
        return f"{amount / CREDIT:.6f} credits"

    if name == "JobSubmitted":
        return (f"borrower {args['borrower']} escrowed {credits(args['budget'])} for {args['workers']} workers, "
                f"bundle {args['bundleCid']}")
    if name == "JobAssigned":
        return f"round {args['round']} on machines {list(args['machineIds'])}, cluster spec {args['clusterSpecCid']}"
    if name == "ProofRecorded":
        return (f"machine {args['machineId']} proved checkpoint {args['checkpointIndex']} ({args['steps']} steps, "
                f"{args['coreSeconds']} core-seconds), paid {credits(args['payment'])}, {args['checkpointCid']}")
    if name == "WorkerFaulted":
        return f"machine {args['machineId']} lost, {credits(args['slashed'])} of its stake slashed to the borrower"
    if name == "WorkerReplaced":
        return f"slot {args['slot']}: machine {args['oldMachineId']} replaced by machine {args['newMachineId']}"
    if name == "JobCompleted":
        return f"result {args['resultCid']}, paid {credits(args['paid'])}, refunded {credits(args['refund'])}"
    if name in ("JobCancelled", "JobExpired"):
        return f"refunded {credits(args['refund'])}"
    if name == "JobFailed":
        return f"{args['reason']}; refunded {credits(args['refund'])}"
    return ", ".join(f"{key} {value}" for key, value in args.items() if key != "jobId")
