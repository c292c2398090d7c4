"""Compare one training job run through the marketplace with the same TF cluster launched by hand.

    .venv/bin/python bench/marketplace_vs_manual.py [--workers 3] [--epochs 8]

Both runs use the same digits bundle files, worker count and epochs, on this machine, one
after the other in one invocation. The manual run starts the workers directly with
TF_CONFIG (no chain, no IPFS, no daemons). The marketplace run starts a LocalMarketplace
(chain, IPFS, coordinator, lender daemons) first and times from the job's submission.
Figures: time to the first training step and total job time for each, and their ratio.
Results go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import replace_section  # noqa: E402

from deepmarket.chain.client import CREDIT  # noqa: E402
from deepmarket.chain.node import free_port  # noqa: E402
from deepmarket.chain.typed_data import JobRequest  # noqa: E402
from deepmarket.demo import follow_job  # noqa: E402
from deepmarket.localnet import LocalMarketplace  # noqa: E402
from deepmarket.market import operations  # noqa: E402
from deepmarket.training import digits  # noqa: E402
from deepmarket.training.bundle import TrainingConfig, load_config, write_config  # noqa: E402
from deepmarket.training.protocol import tf_config_for  # noqa: E402

FIRST_STEP = re.compile(r"first training step: job (\d+) round \d+ machine \d+ at unix time ([0-9.]+)")


def run_manual(inputs: digits.DemoInputs, config_path: Path, workers: int, workdir: Path) -> dict[str, float]:
    """Launch `workers` runner processes by hand; return seconds to first step and to the chief's exit."""
    endpoints = [f"127.0.0.1:{free_port()}" for _ in range(workers)]
    started = time.time()
    processes = []
    for index in range(workers):
        env = dict(os.environ, TF_CONFIG=tf_config_for(endpoints, index), TF_USE_LEGACY_KERAS="1",
                   TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "deepmarket.training.runner", "--model", str(inputs.model_path), "--dataset",
             str(inputs.lender_dataset_path), "--config", str(config_path), "--workdir", str(workdir / f"w{index}")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, text=True))
    first_step = None
    try:
        assert processes[0].stdout is not None
        for line in processes[0].stdout:
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "first_step" and first_step is None:
                first_step = float(event["time"]) - started
        if processes[0].wait() != 0:
            raise SystemExit("the chief of the manual run failed")
        finished = time.time() - started
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    return {"first_step_s": first_step or float("nan"), "job_s": finished}


def run_marketplace(inputs: digits.DemoInputs, config: TrainingConfig, workers: int, root: Path) -> dict[str, float]:
    """Run the job through a LocalMarketplace; times count from the submission transaction."""
    from deepmarket.bundles import upload_bundle

    with LocalMarketplace(root) as net:
        net.start_coordinator()
        for index in range(workers):
            net.start_lender(f"lender{index + 1}")
        net.wait_for(lambda: net.client.machine_count() >= workers, 120, "lenders to register")
        bundle_cid = upload_bundle(net.store, inputs.model_path, inputs.dataset_path, config)
        request = JobRequest(bundleCid=bundle_cid, budget=100 * CREDIT, maxPricePerCoreHour=100 * CREDIT,
                             workers=workers, minCores=1, minMemoryMib=1024,
                             jobDeadline=net.client.latest_timestamp() + 3600)
        submitted = time.time()
        job_id = operations.submit_signed_job(net.client, net.accounts["borrower"], net.accounts["borrower"], request)
        follow_job(net, job_id, config.epochs, echo=lambda *_: None)
        # The job completes on chain once the coordinator has received every final receipt.
        finished = time.time() - submitted
        first_steps = []
        for index in range(workers):
            for match in FIRST_STEP.finditer(net.log_tail(f"lender{index + 1}", lines=10_000)):
                if int(match.group(1)) == job_id:
                    first_steps.append(float(match.group(2)))
    return {"first_step_s": (min(first_steps) - submitted) if first_steps else float("nan"), "job_s": finished}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="deepmarket-bench-") as tmp:
        root = Path(tmp)
        inputs = digits.write_demo_inputs(root / "inputs")
        base = load_config(inputs.config_path)
        config = TrainingConfig(**{**base.__dict__, "epochs": args.epochs})
        config_path = write_config(config, root / "config.json")
        manual = run_manual(inputs, config_path, args.workers, root / "manual")
        market = run_marketplace(inputs, config, args.workers, root / "market")
    ratio = market["job_s"] / manual["job_s"]
    body = "\n".join([
        f"Measured {datetime.date.today()} with `bench/marketplace_vs_manual.py --workers {args.workers} "
        f"--epochs {args.epochs}` on {os.cpu_count()} cores ({platform.machine()}), every process on this one "
        "machine; digits bundle, batch 32.",
        "",
        "| run | submission (or launch) to first training step | job time |",
        "|---|---:|---:|",
        f"| {args.workers} workers launched by hand with TF_CONFIG | {manual['first_step_s']:.1f} s | {manual['job_s']:.1f} s |",
        f"| the same job through the marketplace | {market['first_step_s']:.1f} s | {market['job_s']:.1f} s |",
        "",
        f"**Marketplace / by hand: {ratio:.2f}x.** The marketplace time adds the coordinator's poll and bundle "
        "check, the assignment transaction, each lender fetching the bundle from IPFS, per-epoch checkpoint "
        "pinning and receipts, and the wait for every final receipt before completion.",
    ])
    replace_section("marketplace-vs-manual", body)
    print(body)


if __name__ == "__main__":
    main()
