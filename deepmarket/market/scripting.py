"""Accounts and amounts for command-line entry points (brownie scripts, the CLI).

A role's key comes from an encrypted keystore when ``DEEPMARKET_<ROLE>_KEYSTORE`` is set
(password in ``DEEPMARKET_<ROLE>_PASSWORD`` or ``DEEPMARKET_PASSWORD``), otherwise from
the development mnemonic that the local chain funds.
"""

from __future__ import annotations

import os
from decimal import Decimal, InvalidOperation
from pathlib import Path

from eth_account.signers.local import LocalAccount

from deepmarket.chain.client import CREDIT
from deepmarket.chain.node import DEV_MNEMONIC
from deepmarket.chain.wallet import dev_account, load_keystore
from deepmarket.errors import ConfigError, WalletError

# Development account index of each role on a local chain.
DEV_ROLES = {"admin": 0, "coordinator": 1, "borrower": 2, "lender1": 3, "lender2": 4, "lender3": 5, "lender4": 6}


def role_account(role: str) -> LocalAccount:
    """Return the key for `role` (see the module docstring)."""
    keystore = os.environ.get(f"DEEPMARKET_{role.upper()}_KEYSTORE")
    if keystore:
        password = os.environ.get(f"DEEPMARKET_{role.upper()}_PASSWORD") or os.environ.get("DEEPMARKET_PASSWORD")
        if not password:
            raise WalletError(f"keystore for {role} given but no password: set DEEPMARKET_{role.upper()}_PASSWORD")
        return load_keystore(Path(keystore), password)
    if role not in DEV_ROLES:
        raise ConfigError(f"unknown role {role!r}: use one of {', '.join(DEV_ROLES)} or set "
                          f"DEEPMARKET_{role.upper()}_KEYSTORE")
    return dev_account(DEV_MNEMONIC, DEV_ROLES[role])


def parse_credits(text: str | int | float, name: str) -> int:
    """Convert a credit amount such as ``"12.5"`` to base units."""
    try:
        value = Decimal(str(text))
    except InvalidOperation as exc:
        raise ConfigError(f"{name}={text!r} is not a number of credits, e.g. 12.5") from exc
    if not value.is_finite():
        raise ConfigError(f"{name}={text!r} is not a finite number of credits: give e.g. 12.5")
    if value < 0:
        raise ConfigError(f"{name}={text!r} is negative: give zero or a positive number of credits")
    return int(value * CREDIT)
