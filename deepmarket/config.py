"""Settings shared by every component, read from environment variables with embedded defaults.

=========================  ===========================================  ==================================
variable                   meaning                                      default
=========================  ===========================================  ==================================
``DEEPMARKET_HOME``        state folder: keystores, deployment, logs     ``<project>/.deepmarket``
``DEEPMARKET_RPC_URL``     Ethereum JSON-RPC endpoint                    ``http://127.0.0.1:8545``
``DEEPMARKET_CHAIN``       local chain the tool starts: ganache, anvil   ``ganache``
``DEEPMARKET_IPFS_API``    Kubo-compatible RPC multiaddr                 ``/ip4/127.0.0.1/tcp/5001/http``
``DEEPMARKET_DEPLOYMENT``  JSON file with the contract addresses         ``$DEEPMARKET_HOME/deployment.json``
=========================  ===========================================  ==================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from deepmarket.chain.node import CHAIN_KINDS
from deepmarket.errors import ConfigError
from deepmarket.toolchain import PROJECT_ROOT


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=lambda: PROJECT_ROOT / ".deepmarket")
    rpc_url: str = "http://127.0.0.1:8545"
    chain_kind: str = "ganache"
    ipfs_api: str = "/ip4/127.0.0.1/tcp/5001/http"
    deployment_path: Path | None = None

    @property
    def deployment_file(self) -> Path:
        return self.deployment_path or self.home / "deployment.json"

    @property
    def keystore_dir(self) -> Path:
        return self.home / "keystores"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read settings from `environ` (default: the process environment) and check them."""
    env = os.environ if environ is None else environ
    settings = Settings()
    home = Path(env["DEEPMARKET_HOME"]) if env.get("DEEPMARKET_HOME") else settings.home
    deployment = Path(env["DEEPMARKET_DEPLOYMENT"]) if env.get("DEEPMARKET_DEPLOYMENT") else None
    settings = Settings(
        home=home,
        rpc_url=env.get("DEEPMARKET_RPC_URL", settings.rpc_url),
        chain_kind=env.get("DEEPMARKET_CHAIN", settings.chain_kind),
        ipfs_api=env.get("DEEPMARKET_IPFS_API", settings.ipfs_api),
        deployment_path=deployment,
    )
    if settings.chain_kind not in CHAIN_KINDS:
        raise ConfigError(f"DEEPMARKET_CHAIN={settings.chain_kind!r} is not supported: use one of "
                          f"{', '.join(CHAIN_KINDS)}")
    if not settings.rpc_url.startswith(("http://", "https://")):
        raise ConfigError("DEEPMARKET_RPC_URL must be an http(s) URL, e.g. http://127.0.0.1:8545")
    return settings
