"""The deepmarket command: one entry point for the chain, contracts, lenders, coordinator and jobs."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from deepmarket.config import Settings, load_settings
from deepmarket.errors import DeepMarketError

logger = logging.getLogger(__name__)

MAX_WORKERS = 64  # JobMarket.MAX_WORKERS


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        settings = load_settings()
        result = args.handler(args, settings)
        return int(result or 0)
    except DeepMarketError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: give an integer of at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepmarket", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(title="commands")

    chain = commands.add_parser("chain", help="local development chain").add_subparsers(title="chain commands")
    start = chain.add_parser("start", help="run Ganache (or anvil) on 127.0.0.1 until interrupted")
    start.add_argument("--kind", choices=("ganache", "anvil"), help="chain to run (default: $DEEPMARKET_CHAIN or ganache)")
    start.add_argument("--port", type=int, default=8545, help="RPC port (default 8545)")
    start.set_defaults(handler=cmd_chain_start)

    deploy = commands.add_parser("deploy", help="deploy the contracts to $DEEPMARKET_RPC_URL")
    deploy.add_argument("--grant", default="1000", help="credits minted to each development role (local chains only)")
    deploy.set_defaults(handler=cmd_deploy)

    status = commands.add_parser("status", help="machines, jobs and balances of the deployment")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=cmd_status)

    walkthrough = commands.add_parser("walkthrough", help="contract-level walkthrough of one job on a fresh chain")
    walkthrough.add_argument("--chain", choices=("ganache", "anvil"), help="chain to start")
    walkthrough.add_argument("--report", type=Path, default=Path("build/walkthrough-report.json"),
                             help="where to write the JSON report")
    walkthrough.set_defaults(handler=cmd_walkthrough)

    wallet = commands.add_parser("wallet", help="encrypted keystores").add_subparsers(title="wallet commands")
    create = wallet.add_parser("create", help="create an encrypted keystore (password from $DEEPMARKET_PASSWORD)")
    create.add_argument("path", type=Path, help="keystore file to write")
    create.add_argument("--password-file", type=Path, help="file holding the password")
    create.set_defaults(handler=cmd_wallet_create)

    register_daemon_commands(commands)
    register_demo_command(commands)
    return parser


def cmd_chain_start(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.chain.node import LocalChain

    chain = LocalChain(kind=args.kind or settings.chain_kind, port=args.port,
                       log_path=settings.log_dir / "chain.log")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())  # also when started with SIGINT ignored
    with chain:
        print(f"{chain.kind} serving {chain.rpc_url}; Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


def cmd_deploy(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.chain.client import connect
    from deepmarket.chain.node import DEV_CHAIN_ID
    from deepmarket.market import operations
    from deepmarket.market.scripting import DEV_ROLES, parse_credits, role_account

    w3 = connect(settings.rpc_url)
    admin = role_account("admin")
    client = operations.deploy(w3, admin, role_account("coordinator").address, settings.deployment_file)
    if w3.eth.chain_id == DEV_CHAIN_ID:
        for role in DEV_ROLES:
            if role not in ("admin", "coordinator"):
                client.mint(admin, role_account(role).address, parse_credits(args.grant, "grant"), "onboarding")
    print(json.dumps({"deployment": str(settings.deployment_file), **client.deployment.__dict__}, indent=2))
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.chain.client import connect
    from deepmarket.market import operations
    from deepmarket.market.scripting import DEV_ROLES, role_account

    client = operations.open_client(connect(settings.rpc_url), settings.deployment_file)
    status = operations.market_status(client, {role: role_account(role).address for role in DEV_ROLES})
    print(json.dumps(status, indent=2, default=str) if args.json else _format_status(status))
    return 0


def _format_status(status: dict[str, Any]) -> str:
    from deepmarket.market.operations import format_credits as fmt

    lines = [f"escrowed {fmt(status['escrowed'])}  withdrawable {fmt(status['withdrawable'])}  "
             f"staked {fmt(status['staked'])}"]
    for m in status["machines"]:
        lines.append(f"machine {m['machine_id']}: {m['status']} lender {m['lender']} {m['cores']} cores "
                     f"price {fmt(m['price_per_core_hour'])} job {m['locked_by'] or '-'} endpoint {m['endpoint']}")
    for j in status["jobs"]:
        lines.append(f"job {j['job_id']}: {j['status']} workers {j['workers']} budget {fmt(j['budget'])} "
                     f"paid {fmt(j['paid'])} result {j['result_cid'] or '-'}")
    for role, row in status["accounts"].items():
        lines.append(f"{role}: {fmt(row['balance'])} credits, {fmt(row['withdrawable'])} withdrawable")
    return "\n".join(lines)


def cmd_walkthrough(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.walkthrough import run_walkthrough

    logging.getLogger().setLevel(logging.WARNING)
    run_walkthrough(chain_kind=args.chain or settings.chain_kind, report_path=args.report)
    print(f"report written to {args.report}")
    return 0


def cmd_wallet_create(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.chain.wallet import create_keystore, read_password

    account = create_keystore(args.path, read_password("DEEPMARKET_PASSWORD", args.password_file))
    print(account.address)
    return 0


# ---------------------------------------------------------------------- daemons and jobs


def _add_key_args(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument("--keystore", type=Path, help=f"encrypted keystore of the {role} "
                        f"(password from $DEEPMARKET_PASSWORD or --password-file); default: the development key")
    parser.add_argument("--password-file", type=Path, help="file holding the keystore password")


def _account(args: argparse.Namespace, role: str) -> Any:
    from deepmarket.chain.wallet import load_keystore, read_password
    from deepmarket.market.scripting import role_account

    if args.keystore is None:
        return role_account(role)
    return load_keystore(args.keystore, read_password("DEEPMARKET_PASSWORD", args.password_file))


def _client(settings: Settings) -> Any:
    from deepmarket.chain.client import connect
    from deepmarket.market import operations

    return operations.open_client(connect(settings.rpc_url), settings.deployment_file)


def _store(settings: Settings) -> Any:
    from deepmarket.storage.store import IpfsStore

    return IpfsStore(settings.ipfs_api)


def _run_until_signal(target: Any) -> None:
    """Run `target(stop_event)` in this thread until SIGINT or SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    target(stop)


def register_daemon_commands(commands: Any) -> None:
    ipfs = commands.add_parser("ipfs", help="local IPFS node").add_subparsers(title="ipfs commands")
    start = ipfs.add_parser("start", help="run a private js-ipfs node on 127.0.0.1 until interrupted")
    start.add_argument("--repo", type=Path, help="repo folder (default: $DEEPMARKET_HOME/ipfs)")
    start.add_argument("--api-port", type=int, default=5001, help="RPC API port (default 5001)")
    start.set_defaults(handler=cmd_ipfs_start)

    coordinator = commands.add_parser("coordinator", help="job coordinator").add_subparsers(title="coordinator commands")
    run = coordinator.add_parser("run", help="schedule and settle jobs until interrupted")
    _add_key_args(run, "coordinator")
    run.add_argument("--state", type=Path, help="SQLite state file (default: $DEEPMARKET_HOME/coordinator.sqlite)")
    run.add_argument("--formation-timeout-s", type=int, default=120,
                     help="seconds a (re)assigned worker has to report ready before it is faulted (default 120)")
    run.set_defaults(handler=cmd_coordinator_run)

    lender = commands.add_parser("lender", help="lend a machine").add_subparsers(title="lender commands")
    start = lender.add_parser("start", help="register this machine and serve assignments until interrupted")
    _add_key_args(start, "lender")
    start.add_argument("--work-dir", type=Path, required=True, help="folder for the daemon's state and job files")
    start.add_argument("--host", default="127.0.0.1",
                       help="address other workers reach this machine at (default 127.0.0.1)")
    start.add_argument("--tf-port", type=positive_int, required=True, help="port of this machine's TensorFlow server")
    start.add_argument("--cores", type=positive_int, help="cores to lend (default: all)")
    start.add_argument("--memory-mib", type=positive_int,
                       help="memory to lend, MiB (default: the host's total memory)")
    start.add_argument("--cpus", help="comma-separated CPU ids the worker runs on, e.g. 2,3 "
                       "(default: the first --cores CPUs)")
    start.add_argument("--price", default="1", help="credits per core-hour (default 1)")
    start.add_argument("--stake", default="20", help="credits bonded at registration (default 20)")
    start.add_argument("--windows", default="always",
                       help="weekly UTC availability, e.g. 'mon-fri 18-24, sat-sun 0-24' (default: always)")
    start.set_defaults(handler=cmd_lender_start)
    reclaim = lender.add_parser("reclaim", help="take the machine back: the running worker leaves after its "
                                "next checkpoint, then the machine is paused")
    reclaim.add_argument("--work-dir", type=Path, required=True, help="the running daemon's work dir")
    reclaim.set_defaults(handler=cmd_lender_request, request="reclaim.request")
    resume = lender.add_parser("resume", help="lend a reclaimed (paused) machine again")
    resume.add_argument("--work-dir", type=Path, required=True, help="the running daemon's work dir")
    resume.set_defaults(handler=cmd_lender_request, request="resume.request")
    claim = lender.add_parser("claim", help="withdraw every credit the market owes this lender")
    _add_key_args(claim, "lender")
    claim.set_defaults(handler=cmd_lender_claim)

    job = commands.add_parser("job", help="borrow machines for a training job").add_subparsers(title="job commands")
    submit = job.add_parser("submit", help="upload a bundle and submit a signed job order")
    _add_key_args(submit, "borrower")
    submit.add_argument("--model", type=Path, required=True, help=".keras model file (no custom layers)")
    submit.add_argument("--dataset", type=Path, required=True,
                        help=".npz with x_train, y_train, x_val, y_val (x_test, y_test stay local)")
    submit.add_argument("--config", type=Path, required=True, help="training config JSON (epochs, batch_size, ...)")
    submit.add_argument("--workers", type=positive_int, default=1, help="machines in the cluster (default 1)")
    submit.add_argument("--budget", default="50", help="credits to escrow (default 50)")
    submit.add_argument("--max-price", default="100", help="price cap, credits per core-hour (default 100)")
    submit.add_argument("--min-cores", type=positive_int, default=1, help="minimum cores per machine (default 1)")
    submit.add_argument("--min-memory-mib", type=positive_int, default=1024, help="minimum memory per machine (default 1024)")
    submit.add_argument("--deadline-hours", type=float, default=24, help="hours until the job may expire (default 24)")
    submit.set_defaults(handler=cmd_job_submit)
    cancel = job.add_parser("cancel", help="cancel a queued job and get its whole budget back")
    _add_key_args(cancel, "borrower")
    cancel.add_argument("job_id", type=positive_int, help="the job's id")
    cancel.set_defaults(handler=cmd_job_cancel)
    status = job.add_parser("status", help="a job's state, workers and proofs")
    status.add_argument("job_id", type=positive_int, help="the job's id")
    status.set_defaults(handler=cmd_job_status)
    logs = job.add_parser("logs", help="a job's history from its contract events (--follow to stream it)")
    logs.add_argument("job_id", type=positive_int, help="the job's id")
    logs.add_argument("--follow", action="store_true", help="keep printing new events until the job ends")
    logs.set_defaults(handler=cmd_job_logs)
    result = job.add_parser("result", help="download a completed job's trained model")
    result.add_argument("job_id", type=positive_int, help="the job's id")
    result.add_argument("--out", type=Path, default=Path("trained-model.keras"), help="model file to write")
    result.set_defaults(handler=cmd_job_result)


def cmd_ipfs_start(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.storage.node import run_forever

    run_forever(args.repo or settings.home / "ipfs", api_port=args.api_port)
    return 0


def cmd_coordinator_run(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.coordinator.service import Coordinator, CoordinatorConfig

    config = CoordinatorConfig(state_path=args.state or settings.home / "coordinator.sqlite",
                               formation_timeout_s=args.formation_timeout_s,
                               work_dir=settings.home / "coordinator")
    coordinator = Coordinator(_client(settings), _account(args, "coordinator"), _store(settings), config)
    _run_until_signal(coordinator.run)
    return 0


def cmd_lender_start(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.lender.daemon import LenderConfig, LenderDaemon
    from deepmarket.market.scripting import parse_credits

    config = LenderConfig(work_dir=args.work_dir, tf_port=args.tf_port, host=args.host, cores=args.cores,
                          memory_mib=args.memory_mib, price_per_core_hour=parse_credits(args.price, "price"),
                          windows=args.windows, stake=parse_credits(args.stake, "stake"),
                          cpus=_parse_cpus(args.cpus))
    config.machine_spec()  # raises ConfigError for an offer this host cannot honour, before any connection
    daemon = LenderDaemon(_client(settings), _account(args, "lender1"), _store(settings), config)
    _run_until_signal(daemon.run)
    return 0


def _parse_cpus(text: str | None) -> list[int] | None:
    from deepmarket.errors import ConfigError

    if not text:
        return None
    try:
        cpus = [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise ConfigError(f"--cpus {text!r} is invalid: give CPU ids separated by commas, e.g. 0,1") from exc
    available = sorted(os.sched_getaffinity(0))
    unknown = [cpu for cpu in cpus if cpu not in available]
    if unknown:
        raise ConfigError(f"--cpus {text!r} names CPUs {unknown} that this process cannot use; available: {available}")
    return cpus


def cmd_lender_request(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.errors import ConfigError

    if not (args.work_dir / "lender.sqlite").exists():
        raise ConfigError(f"{args.work_dir} is not a lender daemon's work dir (no lender.sqlite): "
                          "pass the --work-dir the daemon was started with")
    from deepmarket.lender.daemon import running_daemon_pid

    if running_daemon_pid(args.work_dir) is None:
        raise ConfigError(f"no lender daemon is running for {args.work_dir}: start it with `deepmarket lender start` "
                          "first (a stopped daemon serves no job, so there is nothing to reclaim)")
    (args.work_dir / args.request).write_text(str(int(time.time())))
    print(f"request written; the daemon serving {args.work_dir} acts on it within a few seconds")
    return 0


def cmd_lender_claim(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.market.operations import claim_payout, format_credits

    amount = claim_payout(_client(settings), _account(args, "lender1"))
    print(f"withdrew {format_credits(amount)} credits")
    return 0


def cmd_job_submit(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.bundles import upload_bundle
    from deepmarket.chain.typed_data import JobRequest
    from deepmarket.errors import ConfigError
    from deepmarket.market import operations
    from deepmarket.market.scripting import parse_credits
    from deepmarket.training.bundle import load_config

    # Check every number before anything is uploaded, so a typo pins nothing and escrows nothing.
    budget = parse_credits(args.budget, "budget")
    max_price = parse_credits(args.max_price, "max-price")
    if budget == 0:
        raise ConfigError("--budget 0 is invalid: escrow a positive number of credits")
    if args.workers > MAX_WORKERS:
        raise ConfigError(f"--workers {args.workers} is invalid: a job may use 1 to {MAX_WORKERS} machines")
    if not args.deadline_hours > 0:
        raise ConfigError(f"--deadline-hours {args.deadline_hours} is invalid: give a positive number of hours")
    client = _client(settings)
    borrower = _account(args, "borrower")
    config = load_config(args.config)
    bundle_cid = upload_bundle(_store(settings), args.model, args.dataset, config)
    request = JobRequest(bundleCid=bundle_cid, budget=budget, maxPricePerCoreHour=max_price, workers=args.workers,
                         minCores=args.min_cores, minMemoryMib=args.min_memory_mib,
                         jobDeadline=client.latest_timestamp() + int(args.deadline_hours * 3600))
    job_id = operations.submit_signed_job(client, borrower, borrower, request)
    print(json.dumps({"job_id": job_id, "bundle_cid": bundle_cid}))
    return 0


def cmd_job_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.market.operations import claim_payout, format_credits

    client = _client(settings)
    borrower = _account(args, "borrower")
    refund = client.cancel_job(borrower, args.job_id)
    withdrawn = claim_payout(client, borrower)
    print(f"job {args.job_id} cancelled: {format_credits(refund)} credits refunded, "
          f"{format_credits(withdrawn)} credits withdrawn to {borrower.address}")
    return 0


def cmd_job_status(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.chain.errors import JOB_STATUS_NAMES

    client = _client(settings)
    job = client.get_job(args.job_id)
    job["status"] = JOB_STATUS_NAMES[job["status"]]
    job["workers_detail"] = client.get_workers(args.job_id)
    proofs = client.market.events.ProofRecorded().get_logs(from_block=client.deployment.block,
                                                            argument_filters={"jobId": args.job_id})
    job["proofs"] = [{k: log["args"][k] for k in ("machineId", "checkpointIndex", "steps", "payment", "checkpointCid")}
                     for log in proofs]
    print(json.dumps(job, indent=2, default=str))
    return 0


def cmd_job_logs(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.market.history import job_history

    client = _client(settings)
    for line in job_history(client, args.job_id, follow=args.follow):
        print(line, flush=True)
    return 0


def cmd_job_result(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.results import download_result

    path = download_result(_client(settings), _store(settings), args.job_id, args.out)
    print(f"trained model written to {path}")
    return 0


def register_demo_command(commands: Any) -> None:
    demo = commands.add_parser("demo", help="run a real distributed training job end to end on local defaults")
    demo.add_argument("--workers", type=positive_int, default=3, help="lenders (and TF workers) in the job (default 3)")
    demo.add_argument("--epochs", type=positive_int, default=8, help="training epochs (default 8)")
    faults = demo.add_mutually_exclusive_group()
    faults.add_argument("--kill-lender-after-epoch", type=int, metavar="K",
                        help="kill one assigned lender (daemon and worker) after checkpoint K; starts a spare lender")
    faults.add_argument("--hang-lender-after-epoch", type=int, metavar="K",
                        help="freeze one assigned lender (daemon and worker, SIGSTOP) after checkpoint K; "
                        "starts a spare lender")
    faults.add_argument("--reclaim-lender-after-epoch", type=int, metavar="K",
                        help="have one lender's owner reclaim the machine after checkpoint K; starts a spare lender")
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.demo import run_demo

    logging.getLogger().setLevel(logging.WARNING)
    report = run_demo(workers=args.workers, epochs=args.epochs, kill_lender_after_epoch=args.kill_lender_after_epoch,
                      reclaim_lender_after_epoch=args.reclaim_lender_after_epoch,
                      hang_lender_after_epoch=args.hang_lender_after_epoch)
    return 0 if report["status"] == "completed" else 1
