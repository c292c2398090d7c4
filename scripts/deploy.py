"""Deploy the DeepMarket contracts to brownie's active network, grant the coordinator role,
mint onboarding grants on a development chain and write the deployment file.

    brownie run scripts/deploy.py
"""

from brownie import network, web3

from deepmarket.chain.node import DEV_CHAIN_ID
from deepmarket.config import load_settings
from deepmarket.market import operations
from deepmarket.market.scripting import DEV_ROLES, parse_credits, role_account


def main(grant: str = "1000") -> None:
    settings = load_settings()
    admin = role_account("admin")
    coordinator = role_account("coordinator")
    client = operations.deploy(web3, admin, coordinator.address, settings.deployment_file)
    print(f"network {network.show_active()}: token {client.token.address}, registry {client.registry.address}, "
          f"market {client.market.address}")
    if web3.eth.chain_id == DEV_CHAIN_ID:  # onboarding grants only on a local development chain
        for role in DEV_ROLES:
            if role not in ("admin", "coordinator"):
                client.mint(admin, role_account(role).address, parse_credits(grant, "grant"), "onboarding")
        print(f"granted {grant} credits to: {', '.join(r for r in DEV_ROLES if r not in ('admin', 'coordinator'))}")
    print(f"deployment written to {settings.deployment_file}")
