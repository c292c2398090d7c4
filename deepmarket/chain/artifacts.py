"""Contract artifacts (ABI and bytecode) from brownie's build folder, compiling when missing."""

from __future__ import annotations

import json
import logging
import subprocess
from functools import cache
from typing import Any

from deepmarket.errors import ToolchainError
from deepmarket.toolchain import CONTRACTS_BUILD_DIR, PROJECT_ROOT, tool_env

logger = logging.getLogger(__name__)

CONTRACT_NAMES = ("CreditToken", "MachineRegistry", "JobMarket")


def compile_contracts() -> None:
    """Run ``brownie compile`` for the project (solc-js through the project's launcher)."""
    logger.info("compiling contracts with brownie")
    result = subprocess.run(["brownie", "compile"], cwd=PROJECT_ROOT, env=tool_env(),
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ToolchainError(f"brownie compile failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


@cache
def load_artifact(name: str) -> dict[str, Any]:
    """Return the brownie build artifact of contract `name`, compiling the project first if needed."""
    path = CONTRACTS_BUILD_DIR / f"{name}.json"
    if not path.exists():
        compile_contracts()
    try:
        artifact: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ToolchainError(f"cannot read contract artifact {path}: {exc}; run `brownie compile`") from exc
    if not artifact.get("bytecode"):
        raise ToolchainError(f"artifact {path} has no bytecode: run `brownie compile --all`")
    return artifact


def abi(name: str) -> list[dict[str, Any]]:
    return list(load_artifact(name)["abi"])


def bytecode(name: str) -> str:
    return str(load_artifact(name)["bytecode"])
