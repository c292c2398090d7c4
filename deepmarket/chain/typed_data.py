"""EIP-712 typed data for the two messages DeepMarket signs: job orders and work receipts.

The type strings must match the typehashes in ``contracts/JobMarket.sol`` byte for byte.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount

DOMAIN_NAME = "DeepMarket JobMarket"
DOMAIN_VERSION = "1"

JOB_REQUEST_FIELDS = [
    {"name": "bundleCid", "type": "string"},
    {"name": "budget", "type": "uint256"},
    {"name": "maxPricePerCoreHour", "type": "uint256"},
    {"name": "workers", "type": "uint32"},
    {"name": "minCores", "type": "uint32"},
    {"name": "minMemoryMib", "type": "uint32"},
    {"name": "jobDeadline", "type": "uint64"},
]
JOB_ORDER_FIELDS = [
    {"name": "borrower", "type": "address"},
    {"name": "request", "type": "JobRequest"},
    {"name": "nonce", "type": "uint256"},
    {"name": "deadline", "type": "uint256"},
]
WORK_RECEIPT_FIELDS = [
    {"name": "jobId", "type": "uint256"},
    {"name": "machineId", "type": "uint256"},
    {"name": "checkpointIndex", "type": "uint256"},
    {"name": "steps", "type": "uint256"},
    {"name": "checkpointCid", "type": "string"},
    {"name": "coreSeconds", "type": "uint256"},
]
EIP712_DOMAIN_FIELDS = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]


@dataclass(frozen=True)
class JobRequest:
    """Job request of a borrower. Amounts are in credit base units, times in unix seconds."""

    bundleCid: str
    budget: int
    maxPricePerCoreHour: int
    workers: int
    minCores: int
    minMemoryMib: int
    jobDeadline: int

    def as_tuple(self) -> tuple[Any, ...]:
        return (self.bundleCid, self.budget, self.maxPricePerCoreHour, self.workers, self.minCores,
                self.minMemoryMib, self.jobDeadline)


@dataclass(frozen=True)
class WorkReceipt:
    """A lender's claim for one checkpoint of one job."""

    jobId: int
    machineId: int
    checkpointIndex: int
    steps: int
    checkpointCid: str
    coreSeconds: int

    def as_tuple(self) -> tuple[Any, ...]:
        return (self.jobId, self.machineId, self.checkpointIndex, self.steps, self.checkpointCid,
                self.coreSeconds)


def domain(chain_id: int, market_address: str) -> dict[str, Any]:
    return {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": chain_id,
            "verifyingContract": market_address}


def job_order_message(borrower: str, request: JobRequest, nonce: int, deadline: int,
                      chain_id: int, market_address: str) -> dict[str, Any]:
    """Build the full EIP-712 message (``eth_signTypedData_v4`` shape) of a job order."""
    return {
        "types": {"EIP712Domain": EIP712_DOMAIN_FIELDS, "JobOrder": JOB_ORDER_FIELDS,
                  "JobRequest": JOB_REQUEST_FIELDS},
        "primaryType": "JobOrder",
        "domain": domain(chain_id, market_address),
        "message": {"borrower": borrower, "request": asdict(request), "nonce": nonce, "deadline": deadline},
    }


def work_receipt_message(receipt: WorkReceipt, chain_id: int, market_address: str) -> dict[str, Any]:
    """Build the full EIP-712 message of a work receipt."""
    return {
        "types": {"EIP712Domain": EIP712_DOMAIN_FIELDS, "WorkReceipt": WORK_RECEIPT_FIELDS},
        "primaryType": "WorkReceipt",
        "domain": domain(chain_id, market_address),
        "message": asdict(receipt),
    }


def sign_typed(account: LocalAccount, message: dict[str, Any]) -> bytes:
    """Sign a full EIP-712 message; returns the 65-byte r||s||v signature (low-s, v in {27, 28})."""
    signed = account.sign_message(encode_typed_data(full_message=message))
    return bytes(signed.signature)
