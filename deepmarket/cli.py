"""The ``deepmarket`` command: one entry point for the chain, contracts, lenders, coordinator and jobs."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from deepmarket.config import Settings, load_settings
from deepmarket.errors import DeepMarketError

logger = logging.getLogger(__name__)


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
    return parser


def cmd_chain_start(args: argparse.Namespace, settings: Settings) -> int:
    from deepmarket.chain.node import LocalChain

    chain = LocalChain(kind=args.kind or settings.chain_kind, port=args.port,
                       log_path=settings.log_dir / "chain.log")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
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
