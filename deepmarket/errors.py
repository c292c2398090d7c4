"""The DeepMarket exception tree.

Every error the package raises derives from :class:`DeepMarketError`; each subclass also
derives from the builtin that matches it, so callers may catch either::

    DeepMarketError
    ├── ConfigError (ValueError)         a setting or an argument is invalid
    ├── ToolchainError (RuntimeError)    a bundled tool (node, solc, ganache, jsipfs) is missing or failed
    ├── ChainError (RuntimeError)        the RPC node is unreachable or a transaction failed
    │   └── ContractRevert               a contract rejected a call; carries the custom error
    ├── WalletError (ValueError)         a keystore is missing, corrupt or its password is wrong
    ├── StorageError (RuntimeError)      IPFS is unreachable or an operation failed
    │   └── ContentMismatchError         fetched bytes do not hash to the requested CID
    ├── BundleError (ValueError)         a job bundle or dataset is invalid
    └── TrainingError (RuntimeError)     a TensorFlow worker failed
"""

from __future__ import annotations

from typing import Any


class DeepMarketError(Exception):
    """Root of every DeepMarket error."""


class ConfigError(DeepMarketError, ValueError):
    """A setting or an argument is invalid."""


class ToolchainError(DeepMarketError, RuntimeError):
    """A bundled tool is missing or failed to start."""


class ChainError(DeepMarketError, RuntimeError):
    """The chain is unreachable or a transaction failed."""


class ContractRevert(ChainError):
    """A contract call reverted with a custom error.

    :param name: the Solidity error name, e.g. ``MarketPriceAboveCap``.
    :param args: the decoded error arguments, in declaration order.
    """

    def __init__(self, name: str, args: dict[str, Any], message: str) -> None:
        super().__init__(message)
        self.name = name
        self.args_by_name = args


class WalletError(DeepMarketError, ValueError):
    """A keystore is missing, corrupt or its password is wrong."""


class StorageError(DeepMarketError, RuntimeError):
    """IPFS is unreachable or an IPFS operation failed."""


class ContentMismatchError(StorageError):
    """Bytes fetched from IPFS do not hash to the CID they were requested by."""


class BundleError(DeepMarketError, ValueError):
    """A job bundle, model file, dataset or training config is invalid."""


class TrainingError(DeepMarketError, RuntimeError):
    """A TensorFlow worker failed."""
