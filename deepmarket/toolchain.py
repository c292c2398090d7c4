"""Paths to the tools the project installs itself (node packages, the solc launcher) and the
environment that subprocesses need to find them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from deepmarket.errors import ToolchainError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NODE_BIN = PROJECT_ROOT / "node_modules" / ".bin"
SOLCX_DIR = PROJECT_ROOT / "toolchain" / "solcx"
BUILD_DIR = PROJECT_ROOT / "build"
CONTRACTS_BUILD_DIR = BUILD_DIR / "contracts"


def node_tool(name: str) -> Path:
    """Return the path of an npm-installed command, e.g. ``ganache`` or ``jsipfs``."""
    path = NODE_BIN / name
    if not path.exists():
        raise ToolchainError(
            f"{name} is not installed at {path}: run `make setup` (npm ci) in {PROJECT_ROOT}"
        )
    return path


def tool_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Return an environment where brownie, py-solc-x and node tools resolve to the project's copies."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(NODE_BIN), str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("SOLCX_BINARY_PATH", str(SOLCX_DIR))
    return env


def install_env() -> None:
    """Make this process find the project's node tools and solc launcher (for brownie in-process)."""
    os.environ["PATH"] = os.pathsep.join([str(NODE_BIN), os.environ.get("PATH", "")])
    os.environ.setdefault("SOLCX_BINARY_PATH", str(SOLCX_DIR))
