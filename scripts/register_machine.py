"""Register a machine for a lender.

    brownie run scripts/register_machine.py main lender1 2 4096 0.5 "always" 127.0.0.1:20000 20

Arguments: role, cores, memory (MiB), price (credits per core-hour), availability windows
(e.g. "mon-fri 18-24" or "always"), TensorFlow endpoint host:port, stake (credits).
"""

from brownie import web3

from deepmarket.config import load_settings
from deepmarket.market import operations
from deepmarket.market.machines import MachineSpec, parse_windows
from deepmarket.market.scripting import parse_credits, role_account


def main(role: str = "lender1", cores: str = "2", memory_mib: str = "4096", price: str = "0.5",
         windows: str = "always", endpoint: str = "127.0.0.1:20000", stake: str = "20") -> None:
    client = operations.open_client(web3, load_settings().deployment_file)
    spec = MachineSpec(cores=int(cores), memory_mib=int(memory_mib), gpus=0, benchmark_score=0,
                       price_per_core_hour=parse_credits(price, "price"), availability_mask=parse_windows(windows),
                       endpoint=endpoint)
    machine_id = operations.register_machine(client, role_account(role), spec, parse_credits(stake, "stake"))
    print(f"machine {machine_id} registered for {role}")
