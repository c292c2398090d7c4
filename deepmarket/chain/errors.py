"""Decode contract reverts into :class:`~deepmarket.errors.ContractRevert` with a message that
names the values and what to do about them."""

from __future__ import annotations

from functools import cache
from typing import Any

from eth_abi import decode as abi_decode
from eth_utils import function_signature_to_4byte_selector, to_checksum_address

from deepmarket.chain.artifacts import CONTRACT_NAMES, abi
from deepmarket.errors import ContractRevert

CREDIT = 10**18

# Next step for each error the contracts raise. Placeholders are the error's arguments.
HINTS: dict[str, str] = {
    "MarketPriceAboveCap": "machine {machineId} costs {price} per core-hour, above the job's cap {cap}: "
                           "choose a cheaper machine or raise maxPricePerCoreHour",
    "MarketMachineUnavailable": "machine {machineId} is paused, retired or outside its availability window "
                                "at {timestamp}: choose another machine",
    "MarketMachineTooSmall": "machine {machineId} has {cores} cores and {memoryMib} MiB, below the job's minimum",
    "MarketStakeTooLow": "machine {machineId} bonds {stake}, below the minimum stake {minStake}: add stake",
    "MarketWrongWorkerCount": "job {jobId} needs {expected} machines, {given} given",
    "MarketInvalidJobStatus": "job {jobId} is {status_name}, which does not allow this action",
    "MarketJobNotFound": "job {jobId} does not exist: check the job id",
    "MarketInvalidRequest": "invalid job request field {field} = {value}: budget must be positive, workers "
                            "1 to 64, the deadline in the future and the bundle CID not empty",
    "MarketOrderExpired": "the signed order expired at {deadline} (now {timestamp}): sign a new order",
    "MarketInvalidSigner": "signature is from {recovered}, expected {expected}: sign with the right key",
    "MarketStaleCheckpoint": "checkpoint {checkpointIndex} of job {jobId} on machine {machineId} is not above "
                             "the last proved index {lastIndex}: indexes start at 1 and each receipt needs a "
                             "higher one",
    "MarketCheckpointNotPublished": "the chief has not yet proved checkpoint {checkpointIndex} of job {jobId}: "
                                    "retry after its proof is recorded",
    "MarketCheckpointMismatch": "checkpoint {checkpointIndex} of job {jobId} has another CID than the chief's",
    "MarketCoreSecondsTooHigh": "receipt claims {claimed} core-seconds on machine {machineId}, at most "
                                "{allowed} have passed since its last proof",
    "MarketBudgetExhausted": "job {jobId} has {escrow} left in escrow, less than the payment {payment}",
    "MarketNothingToWithdraw": "{account} has nothing to withdraw",
    "MarketCallerNotBorrower": "{caller} is not the borrower of job {jobId}",
    "MarketCallerNotLender": "{caller} is not the lender of machine {machineId}",
    "MarketWorkerNotActive": "machine {machineId} holds no active slot in job {jobId}",
    "MarketSlotEmpty": "slot {slot} of job {jobId} is empty: replace its worker before restarting the cluster",
    "MarketJobNotExpirable": "job {jobId} is within its deadline and proof timeout: it cannot expire yet",
    "MarketJobDeadlinePassed": "job {jobId} passed its deadline {deadline}: expire it instead",
    "MarketMachineOwnedByBorrower": "machine {machineId} belongs to the borrower {borrower}",
    "RegistryMachineNotFound": "machine {machineId} is not registered: check the machine id",
    "RegistryCallerNotLender": "{caller} is not the lender of machine {machineId}",
    "RegistryMachineLocked": "machine {machineId} is busy with job {jobId}",
    "RegistryInvalidSpec": "invalid machine spec field {field} = {value}",
    "RegistryInsufficientStake": "machine {machineId} bonds {stake}, less than the {requested} requested",
    "ERC20InsufficientAllowance": "allowance {allowance_credits} credits of {spender} is below "
                                  "{needed_credits}: approve more credits",
    "ERC20InsufficientBalance": "{sender} holds {balance_credits} credits, {needed_credits} needed: earn credits "
                                "by lending, or ask the operator for a grant",
    "AccessControlUnauthorizedAccount": "{account} lacks role {neededRole}",
    "EnforcedPause": "the market is paused: retry when the operator unpauses it",
    "InvalidAccountNonce": "nonce already used by {account}; the next nonce is {currentNonce}",
    "ECDSAInvalidSignatureS": "signature has a high s value: sign again with a standard library",
    "ReentrancyGuardReentrantCall": "reentrant call rejected",
}

JOB_STATUS_NAMES = ("None", "Queued", "Running", "Completed", "Cancelled", "Failed", "Expired")


@cache
def _selectors() -> dict[bytes, tuple[str, list[str], list[str]]]:
    table: dict[bytes, tuple[str, list[str], list[str]]] = {}
    for contract in CONTRACT_NAMES:
        for item in abi(contract):
            if item.get("type") != "error":
                continue
            types = [_canonical_type(arg) for arg in item["inputs"]]
            signature = f"{item['name']}({','.join(types)})"
            names = [arg["name"] for arg in item["inputs"]]
            table[function_signature_to_4byte_selector(signature)] = (item["name"], types, names)
    return table


def _canonical_type(arg: dict[str, Any]) -> str:
    if arg["type"].startswith("tuple"):
        inner = ",".join(_canonical_type(c) for c in arg["components"])
        return f"({inner}){arg['type'][5:]}"
    return str(arg["type"])


def decode_revert(data: str | bytes) -> ContractRevert | None:
    """Decode ABI-encoded revert data; None if the selector belongs to no known error."""
    raw = bytes.fromhex(data.removeprefix("0x")) if isinstance(data, str) else data
    if len(raw) < 4:
        return None
    entry = _selectors().get(raw[:4])
    if entry is None:
        return None
    name, types, names = entry
    values = abi_decode(types, raw[4:])
    args: dict[str, Any] = {}
    for arg_name, arg_type, value in zip(names, types, values, strict=True):
        if arg_type == "address":
            value = to_checksum_address(value)
        elif isinstance(value, bytes):
            value = value.hex()
        args[arg_name] = value
    for amount in ("balance", "needed", "allowance"):
        if isinstance(args.get(amount), int):
            args[f"{amount}_credits"] = f"{args[amount] / CREDIT:,.6f}"
    if "status" in args:
        args["status_name"] = JOB_STATUS_NAMES[args["status"]] if args["status"] < len(JOB_STATUS_NAMES) else "?"
    rendered = ", ".join(f"{k}={v}" for k, v in args.items() if k != "status_name" and not k.endswith("_credits"))
    hint = HINTS.get(name)
    message = f"{name}({rendered})"
    if hint:
        message += ": " + hint.format(**args)
    return ContractRevert(name, args, message)
