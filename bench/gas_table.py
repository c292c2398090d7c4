"""Measure the gas of every contract call in the contract-level walkthrough.

    .venv/bin/python bench/gas_table.py [--chain ganache|anvil]

Runs the walkthrough on a fresh local chain and writes the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import replace_section  # noqa: E402

from deepmarket.walkthrough import run_walkthrough  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chain", choices=("ganache", "anvil"), default="ganache")
    args = parser.parse_args()
    report = run_walkthrough(chain_kind=args.chain, echo=lambda *_: None)
    lines = [
        f"Measured {datetime.date.today()} on {args.chain}, {platform.machine()}, solc 0.8.28 with the optimizer "
        "(200 runs), EVM shanghai. Gas does not depend on the machine.",
        "",
        "| call | calls | mean gas | min | max |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in report["gas"].items():
        lines.append(f"| `{name}` | {row['calls']} | {row['mean']:,} | {row['min']:,} | {row['max']:,} |")
    replace_section("gas-table", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
