"""Constants and helpers shared by the contract tests: EIP-712 signing, typed revert checks, events and time."""

import functools
from contextlib import contextmanager
from enum import IntEnum

from brownie import CreditToken, JobMarket, MachineRegistry, ReentrantToken, WithdrawAttacker, chain, web3
from brownie.exceptions import VirtualMachineError
from eth_abi import decode as abi_decode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak, to_checksum_address
from eth_utils.abi import collapse_if_tuple
from hexbytes import HexBytes

# ------------------------------------------------------------------ market parameters and defaults

CREDIT = 10**18  # one credit in base units (18 decimals)
MIN_STAKE = 100 * CREDIT
SLASH_BPS = 2_500  # 25 % of the stake
BPS = 10_000
PROOF_TIMEOUT = 3_600  # seconds
PRICE_PER_CORE_HOUR = 36 * 10**17  # 3.6 credits per core-hour, exactly 10**15 base units per core-second
CORES = 8
MEMORY_MIB = 16_384
BUDGET = 1_000 * CREDIT
JOB_LIFETIME_S = 7 * 24 * 3600  # default job deadline, counted from the latest block
ORDER_LIFETIME_S = 3_600  # default signed-order deadline
HOURS_PER_WEEK = 168
ALWAYS_AVAILABLE = (1 << HOURS_PER_WEEK) - 1
ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"
ZERO_BYTES32 = b"\x00" * 32
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

DEFAULT_ADMIN_ROLE = ZERO_BYTES32
MINTER_ROLE = keccak(text="MINTER_ROLE")
MARKET_ROLE = keccak(text="MARKET_ROLE")
COORDINATOR_ROLE = keccak(text="COORDINATOR_ROLE")
PAUSER_ROLE = keccak(text="PAUSER_ROLE")


class JobStatus(IntEnum):
    NONE = 0
    QUEUED = 1
    RUNNING = 2
    COMPLETED = 3
    CANCELLED = 4
    FAILED = 5
    EXPIRED = 6


class MachineStatus(IntEnum):
    NONE = 0
    ACTIVE = 1
    PAUSED = 2
    RETIRED = 3


# ------------------------------------------------------------------ EIP-712 type definitions

EIP712_DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
JOB_REQUEST_TYPE = [
    {"name": "bundleCid", "type": "string"},
    {"name": "budget", "type": "uint256"},
    {"name": "maxPricePerCoreHour", "type": "uint256"},
    {"name": "workers", "type": "uint32"},
    {"name": "minCores", "type": "uint32"},
    {"name": "minMemoryMib", "type": "uint32"},
    {"name": "jobDeadline", "type": "uint64"},
]
JOB_ORDER_TYPE = [
    {"name": "borrower", "type": "address"},
    {"name": "request", "type": "JobRequest"},
    {"name": "nonce", "type": "uint256"},
    {"name": "deadline", "type": "uint256"},
]
WORK_RECEIPT_TYPE = [
    {"name": "jobId", "type": "uint256"},
    {"name": "machineId", "type": "uint256"},
    {"name": "checkpointIndex", "type": "uint256"},
    {"name": "steps", "type": "uint256"},
    {"name": "checkpointCid", "type": "string"},
    {"name": "coreSeconds", "type": "uint256"},
]
PERMIT_TYPE = [
    {"name": "owner", "type": "address"},
    {"name": "spender", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "nonce", "type": "uint256"},
    {"name": "deadline", "type": "uint256"},
]
MARKET_DOMAIN_NAME = "DeepMarket JobMarket"
TOKEN_DOMAIN_NAME = "DeepMarket Credit"


def eip712_domain(name, verifying_contract, chain_id=None):
    """Build an EIP-712 domain. `chain_id` defaults to the connected chain's id."""
    return {
        "name": name,
        "version": "1",
        "chainId": web3.eth.chain_id if chain_id is None else chain_id,
        "verifyingContract": to_checksum_address(str(verifying_contract)),
    }


def sign_typed_data(private_key, domain, primary_type, types, message):
    """Sign typed data with eth_account's encoder, which shares no code with the contracts, and return (signature, digest)."""
    full_message = {
        "types": {"EIP712Domain": EIP712_DOMAIN_TYPE, **types},
        "primaryType": primary_type,
        "domain": domain,
        "message": message,
    }
    signed = Account.sign_message(encode_typed_data(full_message=full_message), private_key)
    return HexBytes(signed.signature), HexBytes(signed.message_hash)


def recover_signer(digest, signature):
    """Return the address that `signature` recovers to for `digest` (what ecrecover would return)."""
    return Account._recover_hash(bytes(digest), signature=bytes(signature))


def split_signature(signature):
    """Split a 65-byte signature into (r, s, v)."""
    signature = bytes(signature)
    return signature[:32], int.from_bytes(signature[32:64], "big"), signature[64]


def high_s_twin(signature):
    """Return the malleable twin of a low-s signature: s' = n - s with v flipped, same signer."""
    r, s, v = split_signature(signature)
    return HexBytes(r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v]))  # 27 <-> 28


# ------------------------------------------------------------------ struct builders


def job_request(**overrides):
    """Return a JobRequest as a dict of named fields, with test defaults for anything not given."""
    request = {
        "bundleCid": "bafybeigdyrztbundle0000000000000000000000000000000000000000",
        "budget": BUDGET,
        "maxPricePerCoreHour": PRICE_PER_CORE_HOUR,
        "workers": 2,
        "minCores": 4,
        "minMemoryMib": 8_192,
        "jobDeadline": latest_timestamp() + JOB_LIFETIME_S,
    }
    unknown = set(overrides) - set(request)
    if unknown:
        raise TypeError(f"unknown JobRequest fields: {sorted(unknown)}")
    request.update(overrides)
    return request


def request_tuple(request):
    return tuple(request[field["name"]] for field in JOB_REQUEST_TYPE)


def order_tuple(order):
    return (order["borrower"], request_tuple(order["request"]), order["nonce"], order["deadline"])


def receipt_tuple(receipt):
    return tuple(receipt[field["name"]] for field in WORK_RECEIPT_TYPE)


def machine_spec(**overrides):
    """Return a MachineSpec tuple (cores, memoryMib, gpus, benchmarkScore, price, mask, endpoint)."""
    spec = {
        "cores": CORES,
        "memoryMib": MEMORY_MIB,
        "gpus": 0,
        "benchmarkScore": 1_000,
        "pricePerCoreHour": PRICE_PER_CORE_HOUR,
        "availabilityMask": ALWAYS_AVAILABLE,
        "endpoint": "10.0.0.1:2222",
    }
    unknown = set(overrides) - set(spec)
    if unknown:
        raise TypeError(f"unknown MachineSpec fields: {sorted(unknown)}")
    spec.update(overrides)
    return tuple(spec.values())


def payment_for(core_seconds, price_per_core_hour=PRICE_PER_CORE_HOUR):
    """Pay for one proved interval, rounded down as the market does."""
    return core_seconds * price_per_core_hour // 3600


def slash_for(stake, slash_bps=SLASH_BPS):
    return stake * slash_bps // BPS


# ------------------------------------------------------------------ time


def latest_timestamp():
    return web3.eth.get_block("latest")["timestamp"]


def hour_of_week(timestamp):
    """Hour of the week in UTC, 0 being Monday 00:00 (1970-01-01 was a Thursday, hour 72)."""
    return (timestamp // 3600 + 72) % HOURS_PER_WEEK


def availability_mask(*hours):
    mask = 0
    for hour in hours:
        mask |= 1 << (hour % HOURS_PER_WEEK)
    return mask


def set_next_block_timestamp(timestamp):
    """Make the next transaction land in a block with exactly `timestamp`.

    Ganache 7.9.2 stamps the first block after `evm_mine(t)` with t + 1 plus the whole seconds
    of wall time that passed since (measured), so the next transaction must be sent within a
    second. Use `mined_at`, which checks the timestamp the transaction really got.
    """
    latest = latest_timestamp()
    if timestamp - 1 < latest:
        raise ValueError(f"cannot move the chain back: latest block is at {latest}, requested {timestamp}")
    # anvil and Hardhat set the next block's time exactly; Ganache 7 has no such method.
    response = web3.provider.make_request("evm_setNextBlockTimestamp", [timestamp])
    if "error" in response:
        chain.mine(timestamp=timestamp - 1)


@contextmanager
def mined_at(timestamp):
    """Run the enclosed single transaction in a block stamped `timestamp`, and check that it was."""
    set_next_block_timestamp(timestamp)
    yield
    actual = latest_timestamp()
    assert actual == timestamp, (
        f"the transaction was mined at {actual}, not {timestamp}: more than a second of wall time "
        "passed between setting the clock and sending it"
    )


# ------------------------------------------------------------------ typed reverts


@functools.cache
def _error_table():
    """Map 4-byte selectors to (name, input types) for every error in the project's ABIs."""
    table = {
        keccak(text="Error(string)")[:4]: ("Error", ["string"]),
        keccak(text="Panic(uint256)")[:4]: ("Panic", ["uint256"]),
    }
    for container in (CreditToken, MachineRegistry, JobMarket, ReentrantToken, WithdrawAttacker):
        for item in container.abi:
            if item["type"] != "error":
                continue
            types = [collapse_if_tuple(arg) for arg in item["inputs"]]
            selector = keccak(text=f"{item['name']}({','.join(types)})")[:4]
            table[selector] = (item["name"], types)
    return table


def decode_revert(data):
    """Decode revert data into (error name, argument types, argument values) using the project ABIs."""
    data = HexBytes(data)
    if len(data) < 4:
        raise AssertionError(f"revert data {data.to_0x_hex()} carries no error selector")
    if data[:4] not in _error_table():
        raise AssertionError(f"revert data {data.to_0x_hex()} matches no error in the project ABIs")
    name, types = _error_table()[data[:4]]
    return name, types, tuple(abi_decode(types, bytes(data[4:])))


def _normalize(abi_type, value):
    if abi_type == "address":
        return to_checksum_address(str(value))
    if abi_type.startswith("bytes"):
        return HexBytes(value)
    if abi_type.startswith(("uint", "int")):
        return int(value)
    return value


def _revert_data_from_rpc_error(error):
    """Pull the raw revert data out of a JSON-RPC error raised through web3.

    Ganache 7 puts it under `data` as `{txhash: {"reason": data}}`; other nodes send the hex string itself.
    """
    payload = error.args[0] if error.args else None
    if isinstance(payload, dict):
        data = payload.get("data")
        if isinstance(data, str):
            return data
        if isinstance(data, dict):
            for entry in data.values():
                if isinstance(entry, dict) and "reason" in entry:
                    return entry["reason"] or "0x"
    data = getattr(error, "data", None)
    if isinstance(data, str):
        return data
    raise AssertionError(f"no revert data in the RPC error: {error!r}")


def _revert_data(exc):
    """Return the raw revert data behind a brownie VirtualMachineError.

    Brownie 1.22 keeps only its own string rendering of a typed error. For a transaction, the
    data comes from replaying it as `eth_call` against the block it was mined in, which works
    because a reverted transaction changes no contract state. For a call, it comes from the
    RPC error that brownie wrapped.
    """
    txid = exc.txid
    if txid and txid != "0x":
        tx = web3.eth.get_transaction(txid)
        receipt = web3.eth.get_transaction_receipt(txid)
        assert receipt["status"] == 0, f"brownie raised for {txid}, but it succeeded on chain"
        call = {"from": tx["from"], "data": tx["input"], "value": tx["value"], "gas": tx["gas"]}
        if tx["to"]:
            call["to"] = tx["to"]
        try:
            web3.eth.call(call, receipt["blockNumber"])
        except Exception as error:  # noqa: BLE001 - web3 raises ValueError or ContractLogicError subtypes
            return _revert_data_from_rpc_error(error)
        raise AssertionError(f"{txid} reverted, but replaying it as a call at its block succeeded")
    context = exc.__context__
    if context is None:
        raise AssertionError(f"brownie's error carries neither a transaction nor an RPC error: {exc!r}")
    return _revert_data_from_rpc_error(context)


@contextmanager
def reverts_with(name, *args):
    """Assert that the enclosed transaction or call reverts with custom error `name(*args)`.

    Arguments are compared after normalising by their ABI type (checksummed addresses,
    ints, bytes), so pass every argument of the error, in order.
    """
    try:
        yield
    except VirtualMachineError as exc:
        actual_name, types, values = decode_revert(_revert_data(exc))
        assert actual_name == name, f"expected revert {name}{args}, got {actual_name}{values}"
        assert len(args) == len(types), f"{name} has {len(types)} arguments, the test gave {len(args)}"
        expected = tuple(_normalize(t, v) for t, v in zip(types, args, strict=True))
        actual = tuple(_normalize(t, v) for t, v in zip(types, values, strict=True))
        assert actual == expected, f"{name} arguments: expected {expected}, got {actual}"
        # Brownie decodes the same data with its own error registry; both must agree on the name.
        assert exc.revert_msg and exc.revert_msg.startswith(name), f"brownie decoded {exc.revert_msg!r}"
    else:
        raise AssertionError(f"expected revert {name}{args}, but nothing reverted")


# ------------------------------------------------------------------ events


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "address") and not isinstance(value, str):
        return to_checksum_address(str(value.address))
    if isinstance(value, str) and value.startswith("0x") and len(value) == 42:
        return to_checksum_address(value)
    if isinstance(value, (bytes, bytearray)):
        return HexBytes(value)
    if isinstance(value, int):
        return int(value)
    return value


def events_named(tx, name):
    """Return every `name` event of `tx` as (emitter address, {field: value})."""
    if name not in tx.events:
        return []
    return [
        (to_checksum_address(event.address), {key: _plain(value) for key, value in event.items()})
        for event in tx.events[name]
    ]


def assert_event(tx, name, emitter, index=None, **fields):
    """Assert that `tx` emitted `name` from `emitter` with exactly `fields`.

    With `index=None` the event must be emitted exactly once; otherwise the `index`-th one
    is checked. Every field of the event must be given.
    """
    found = events_named(tx, name)
    if index is None:
        assert len(found) == 1, f"expected one {name} event, got {len(found)}"
        index = 0
    assert index < len(found), f"expected at least {index + 1} {name} events, got {len(found)}"
    address, values = found[index]
    assert address == to_checksum_address(str(emitter)), f"{name} came from {address}, not {emitter}"
    expected = {key: _plain(value) for key, value in fields.items()}
    assert set(values) == set(expected), (
        f"{name} fields: event has {sorted(values)}, test gave {sorted(expected)}"
    )
    for key, value in expected.items():
        assert values[key] == value, f"{name}.{key}: expected {value!r}, got {values[key]!r}"


def assert_no_event(tx, name):
    assert name not in tx.events, f"unexpected {name} event: {tx.events[name]}"
