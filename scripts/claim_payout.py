"""Withdraw everything the market credited to an account (payments, refunds, slashed stakes).

    brownie run scripts/claim_payout.py main lender1
"""

from brownie import web3

from deepmarket.config import load_settings
from deepmarket.market import operations
from deepmarket.market.scripting import role_account


def main(role: str = "lender1") -> None:
    client = operations.open_client(web3, load_settings().deployment_file)
    amount = operations.claim_payout(client, role_account(role))
    print(f"{role} withdrew {operations.format_credits(amount)} credits")
