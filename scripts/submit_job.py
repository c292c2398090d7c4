"""Submit a job as a borrower: sign the EIP-712 order and relay it from the coordinator account.

    brownie run scripts/submit_job.py main <bundle CID> 3 50 2

Arguments: bundle CID, workers, budget (credits), price cap (credits per core-hour),
minimum cores per machine, minimum memory per machine (MiB), hours until the job deadline.
"""

from brownie import web3

from deepmarket.chain.typed_data import JobRequest
from deepmarket.config import load_settings
from deepmarket.market import operations
from deepmarket.market.scripting import parse_credits, role_account


def main(bundle_cid: str, workers: str = "1", budget: str = "50", max_price: str = "2", min_cores: str = "1",
         min_memory_mib: str = "1024", deadline_hours: str = "24") -> None:
    client = operations.open_client(web3, load_settings().deployment_file)
    request = JobRequest(bundleCid=bundle_cid, budget=parse_credits(budget, "budget"),
                         maxPricePerCoreHour=parse_credits(max_price, "max_price"), workers=int(workers),
                         minCores=int(min_cores), minMemoryMib=int(min_memory_mib),
                         jobDeadline=client.latest_timestamp() + int(float(deadline_hours) * 3600))
    job_id = operations.submit_signed_job(client, role_account("borrower"), role_account("coordinator"), request)
    print(f"job {job_id} submitted")
