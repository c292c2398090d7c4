"""Print machines, jobs, escrow totals and the credits of the development roles.

    brownie run scripts/status.py
"""

from brownie import web3

from deepmarket.config import load_settings
from deepmarket.market import operations
from deepmarket.market.scripting import DEV_ROLES, role_account


def main() -> None:
    client = operations.open_client(web3, load_settings().deployment_file)
    status = operations.market_status(client, {role: role_account(role).address for role in DEV_ROLES})
    fmt = operations.format_credits
    print(f"escrowed {fmt(status['escrowed'])}, withdrawable {fmt(status['withdrawable'])}, "
          f"staked {fmt(status['staked'])}")
    for machine in status["machines"]:
        print(f"machine {machine['machine_id']}: {machine['status']}, lender {machine['lender']}, "
              f"{machine['cores']} cores, price {fmt(machine['price_per_core_hour'])}, locked by job "
              f"{machine['locked_by'] or '-'}")
    for job in status["jobs"]:
        print(f"job {job['job_id']}: {job['status']}, {job['workers']} workers, budget {fmt(job['budget'])}, "
              f"paid {fmt(job['paid'])}, bundle {job['bundle_cid']}")
    for role, row in status["accounts"].items():
        print(f"{role}: balance {fmt(row['balance'])}, withdrawable {fmt(row['withdrawable'])}")
