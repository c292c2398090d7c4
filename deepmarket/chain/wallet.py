"""Wallets: encrypted Ethereum keystores (Web3 Secret Storage, scrypt) and development keys."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from deepmarket.errors import WalletError

logger = logging.getLogger(__name__)

# Development accounts come from a BIP-39 mnemonic on the standard Ethereum path.
DEV_PATH = "m/44'/60'/0'/0/{index}"


def create_keystore(path: Path, password: str, private_key: str | None = None) -> LocalAccount:
    """Write a new (or the given) key to `path`, encrypted with `password`, readable only by its owner."""
    if path.is_dir():
        raise WalletError(f"keystore path {path} is a directory: give a file path, e.g. {path}/wallet.json")
    if path.exists():
        raise WalletError(f"keystore {path} already exists: load it, or choose another path")
    if not password:
        raise WalletError("an empty keystore password was given: set a password")
    account: LocalAccount = Account.from_key(private_key) if private_key else Account.create()
    path.parent.mkdir(parents=True, exist_ok=True)
    encrypted = Account.encrypt(account.key, password)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(encrypted, handle)
    logger.info("keystore created: %s for %s", path, account.address)
    return account


def load_keystore(path: Path, password: str) -> LocalAccount:
    """Decrypt the keystore at `path`."""
    try:
        encrypted = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise WalletError(f"keystore {path} not found: create it with `deepmarket wallet create`") from exc
    except (OSError, ValueError) as exc:
        raise WalletError(f"keystore {path} is not a readable JSON keystore: {exc}") from exc
    if not isinstance(encrypted, dict) or "crypto" not in encrypted or "version" not in encrypted:
        raise WalletError(f"keystore {path} is not an Ethereum keystore (no version or crypto section): "
                          "create one with `deepmarket wallet create`")
    try:
        key = Account.decrypt(encrypted, password)
    except (ValueError, KeyError, TypeError) as exc:
        raise WalletError(f"cannot decrypt keystore {path}: wrong password or corrupt file") from exc
    return Account.from_key(key)


def load_or_create_keystore(path: Path, password: str) -> LocalAccount:
    """Load the keystore at `path`, creating a new key there first if none exists."""
    if Path(path).exists():
        return load_keystore(path, password)
    return create_keystore(path, password)


def dev_account(mnemonic: str, index: int) -> LocalAccount:
    """Derive development account `index` from `mnemonic` (funded by a local chain started with it)."""
    Account.enable_unaudited_hdwallet_features()
    return Account.from_mnemonic(mnemonic, account_path=DEV_PATH.format(index=index))


def read_password(env_var: str, password_file: Path | None = None) -> str:
    """Read a keystore password from a file or an environment variable, never from the command line."""
    if password_file is not None:
        try:
            return Path(password_file).read_text().strip()
        except OSError as exc:
            raise WalletError(f"cannot read password file {password_file}: {exc}") from exc
    password = os.environ.get(env_var)
    if not password:
        raise WalletError(f"no keystore password: set {env_var} or pass --password-file")
    return password
