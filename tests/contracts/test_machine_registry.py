"""MachineRegistry: lender actions, stake accounting, market-only lock/release/slash and availability."""

import pytest
from contract_support import (
    ALWAYS_AVAILABLE,
    CREDIT,
    MARKET_ROLE,
    MIN_STAKE,
    PRICE_PER_CORE_HOUR,
    MachineStatus,
    assert_event,
    assert_no_event,
    availability_mask,
    machine_spec,
    reverts_with,
)


@pytest.fixture(scope="module")
def operator(accounts, registry, admin):
    """An account holding MARKET_ROLE, to drive lock/release/slash without a market."""
    registry.grantRole(MARKET_ROLE, accounts[4], {"from": admin})
    return accounts[4]


def test_register_machine_bonds_stake(registry, token, fund, lender):
    fund(lender, 150 * CREDIT, spender=registry)
    spec = machine_spec(cores=16, memoryMib=65_536, gpus=2, benchmarkScore=4_200, endpoint="10.1.2.3:2222")

    tx = registry.registerMachine(spec, 150 * CREDIT, {"from": lender})

    assert tx.return_value == 1
    assert registry.machineCount() == 1
    assert registry.totalStaked() == 150 * CREDIT
    assert token.balanceOf(registry) == 150 * CREDIT
    assert token.balanceOf(lender) == 0
    record = registry.getMachine(1)
    assert record["lender"] == lender
    assert record["status"] == MachineStatus.ACTIVE
    assert record["stake"] == 150 * CREDIT
    assert record["lockedBy"] == 0
    assert tuple(record["spec"]) == spec
    assert_event(
        tx,
        "MachineRegistered",
        registry,
        machineId=1,
        lender=lender,
        cores=16,
        memoryMib=65_536,
        pricePerCoreHour=PRICE_PER_CORE_HOUR,
        availabilityMask=ALWAYS_AVAILABLE,
        endpoint="10.1.2.3:2222",
    )
    assert_event(tx, "StakeAdded", registry, machineId=1, amount=150 * CREDIT, stake=150 * CREDIT)
    assert_event(tx, "Transfer", token, **{"from": lender, "to": registry, "value": 150 * CREDIT})


def test_register_machine_without_stake(registry, lender):
    tx = registry.registerMachine(machine_spec(), 0, {"from": lender})

    assert registry.getMachine(1)["stake"] == 0
    assert registry.totalStaked() == 0
    assert_no_event(tx, "StakeAdded")


def test_machine_ids_increase_from_one(register_machine, lender, lender2):
    assert register_machine(lender) == 1
    assert register_machine(lender2) == 2
    assert register_machine(lender) == 3


@pytest.mark.parametrize(
    "field, override, value",
    [
        ("cores", {"cores": 0}, 0),
        ("memoryMib", {"memoryMib": 0}, 0),
        ("availabilityMask", {"availabilityMask": 1 << 168}, 1 << 168),
        ("availabilityMask", {"availabilityMask": ALWAYS_AVAILABLE + 1}, ALWAYS_AVAILABLE + 1),
        ("endpoint", {"endpoint": ""}, 0),
    ],
    ids=["no-cores", "no-memory", "hour-168", "mask-overflow", "no-endpoint"],
)
def test_register_rejects_invalid_spec(registry, lender, field, override, value):
    with reverts_with("RegistryInvalidSpec", field, value):
        registry.registerMachine(machine_spec(**override), 0, {"from": lender})


def test_register_rejects_stake_without_allowance(registry, token, admin, lender):
    token.mint(lender, MIN_STAKE, "grant", {"from": admin})

    with reverts_with("ERC20InsufficientAllowance", registry, 0, MIN_STAKE):
        registry.registerMachine(machine_spec(), MIN_STAKE, {"from": lender})


def test_update_machine_replaces_spec(registry, machine, lender):
    spec = machine_spec(
        cores=4, memoryMib=8_192, pricePerCoreHour=7, availabilityMask=availability_mask(0, 1), endpoint="h:1"
    )

    tx = registry.updateMachine(machine, spec, {"from": lender})

    assert tuple(registry.getMachine(machine)["spec"]) == spec
    assert_event(
        tx,
        "MachineUpdated",
        registry,
        machineId=machine,
        cores=4,
        memoryMib=8_192,
        pricePerCoreHour=7,
        availabilityMask=availability_mask(0, 1),
        endpoint="h:1",
    )


def test_update_rejects_other_lender(registry, machine, lender2):
    with reverts_with("RegistryCallerNotLender", machine, lender2):
        registry.updateMachine(machine, machine_spec(), {"from": lender2})


def test_update_rejects_unknown_machine(registry, lender):
    with reverts_with("RegistryMachineNotFound", 99):
        registry.updateMachine(99, machine_spec(), {"from": lender})


def test_update_rejects_retired_machine(registry, machine, lender):
    registry.retireMachine(machine, {"from": lender})

    with reverts_with("RegistryInvalidStatus", machine, MachineStatus.RETIRED):
        registry.updateMachine(machine, machine_spec(), {"from": lender})


def test_update_rejects_invalid_spec(registry, machine, lender):
    with reverts_with("RegistryInvalidSpec", "cores", 0):
        registry.updateMachine(machine, machine_spec(cores=0), {"from": lender})


def test_pause_and_resume_machine(registry, machine, lender):
    tx = registry.pauseMachine(machine, {"from": lender})
    assert registry.getMachine(machine)["status"] == MachineStatus.PAUSED
    assert_event(tx, "MachinePaused", registry, machineId=machine)

    tx = registry.resumeMachine(machine, {"from": lender})
    assert registry.getMachine(machine)["status"] == MachineStatus.ACTIVE
    assert_event(tx, "MachineResumed", registry, machineId=machine)


def test_pause_rejects_paused_machine(registry, machine, lender):
    registry.pauseMachine(machine, {"from": lender})

    with reverts_with("RegistryInvalidStatus", machine, MachineStatus.PAUSED):
        registry.pauseMachine(machine, {"from": lender})


def test_pause_rejects_other_lender(registry, machine, lender2):
    with reverts_with("RegistryCallerNotLender", machine, lender2):
        registry.pauseMachine(machine, {"from": lender2})


def test_resume_rejects_active_machine(registry, machine, lender):
    with reverts_with("RegistryInvalidStatus", machine, MachineStatus.ACTIVE):
        registry.resumeMachine(machine, {"from": lender})


def test_retire_returns_whole_stake(registry, token, machine, lender):
    tx = registry.retireMachine(machine, {"from": lender})

    assert token.balanceOf(lender) == MIN_STAKE
    assert registry.totalStaked() == 0
    record = registry.getMachine(machine)
    assert record["status"] == MachineStatus.RETIRED
    assert record["stake"] == 0
    assert_event(tx, "MachineRetired", registry, machineId=machine, stakeReturned=MIN_STAKE)
    assert_event(tx, "Transfer", token, **{"from": registry, "to": lender, "value": MIN_STAKE})


def test_retire_rejects_retired_machine(registry, machine, lender):
    registry.retireMachine(machine, {"from": lender})

    with reverts_with("RegistryInvalidStatus", machine, MachineStatus.RETIRED):
        registry.retireMachine(machine, {"from": lender})


def test_retire_rejects_locked_machine(registry, machine, lender, operator):
    registry.lock(machine, 7, {"from": operator})

    with reverts_with("RegistryMachineLocked", machine, 7):
        registry.retireMachine(machine, {"from": lender})


def test_add_stake_increases_bond(registry, token, fund, machine, lender):
    fund(lender, 5 * CREDIT, spender=registry)

    tx = registry.addStake(machine, 5 * CREDIT, {"from": lender})

    assert registry.getMachine(machine)["stake"] == MIN_STAKE + 5 * CREDIT
    assert registry.totalStaked() == MIN_STAKE + 5 * CREDIT
    assert token.balanceOf(registry) == MIN_STAKE + 5 * CREDIT
    assert_event(
        tx, "StakeAdded", registry, machineId=machine, amount=5 * CREDIT, stake=MIN_STAKE + 5 * CREDIT
    )


def test_add_stake_rejects_zero(registry, machine, lender):
    with reverts_with("RegistryZeroAmount"):
        registry.addStake(machine, 0, {"from": lender})


def test_add_stake_rejects_retired_machine(registry, machine, lender):
    registry.retireMachine(machine, {"from": lender})

    with reverts_with("RegistryInvalidStatus", machine, MachineStatus.RETIRED):
        registry.addStake(machine, CREDIT, {"from": lender})


def test_add_stake_rejects_other_lender(registry, machine, lender2):
    with reverts_with("RegistryCallerNotLender", machine, lender2):
        registry.addStake(machine, CREDIT, {"from": lender2})


def test_withdraw_stake_returns_part(registry, token, machine, lender):
    tx = registry.withdrawStake(machine, 30 * CREDIT, {"from": lender})

    assert registry.getMachine(machine)["stake"] == MIN_STAKE - 30 * CREDIT
    assert registry.totalStaked() == MIN_STAKE - 30 * CREDIT
    assert token.balanceOf(lender) == 30 * CREDIT
    assert_event(
        tx, "StakeWithdrawn", registry, machineId=machine, amount=30 * CREDIT, stake=MIN_STAKE - 30 * CREDIT
    )


def test_withdraw_stake_rejects_more_than_bonded(registry, machine, lender):
    with reverts_with("RegistryInsufficientStake", machine, MIN_STAKE + 1, MIN_STAKE):
        registry.withdrawStake(machine, MIN_STAKE + 1, {"from": lender})


def test_withdraw_stake_rejects_zero(registry, machine, lender):
    with reverts_with("RegistryZeroAmount"):
        registry.withdrawStake(machine, 0, {"from": lender})


def test_withdraw_stake_rejects_locked_machine(registry, machine, lender, operator):
    registry.lock(machine, 3, {"from": operator})

    with reverts_with("RegistryMachineLocked", machine, 3):
        registry.withdrawStake(machine, CREDIT, {"from": lender})


def test_withdraw_stake_rejects_other_lender(registry, machine, lender2):
    with reverts_with("RegistryCallerNotLender", machine, lender2):
        registry.withdrawStake(machine, CREDIT, {"from": lender2})


def test_lock_and_release_by_market(registry, machine, operator):
    tx = registry.lock(machine, 5, {"from": operator})
    assert registry.getMachine(machine)["lockedBy"] == 5
    assert_event(tx, "MachineLocked", registry, machineId=machine, jobId=5)

    tx = registry.release(machine, 5, {"from": operator})
    assert registry.getMachine(machine)["lockedBy"] == 0
    assert_event(tx, "MachineReleased", registry, machineId=machine, jobId=5)


def test_lock_rejects_locked_machine(registry, machine, operator):
    registry.lock(machine, 5, {"from": operator})

    with reverts_with("RegistryMachineLocked", machine, 5):
        registry.lock(machine, 6, {"from": operator})


def test_lock_rejects_unknown_machine(registry, operator):
    with reverts_with("RegistryMachineNotFound", 42):
        registry.lock(42, 1, {"from": operator})


@pytest.mark.parametrize("call", ["lock", "release", "slash"])
def test_market_actions_reject_caller_without_role(registry, machine, lender, call):
    args = {"lock": (machine, 1), "release": (machine, 1), "slash": (machine, 1, CREDIT, lender)}[call]

    with reverts_with("AccessControlUnauthorizedAccount", lender, MARKET_ROLE):
        getattr(registry, call)(*args, {"from": lender})


def test_release_rejects_other_job(registry, machine, operator):
    registry.lock(machine, 5, {"from": operator})

    with reverts_with("RegistryMachineNotLocked", machine, 6):
        registry.release(machine, 6, {"from": operator})


def test_slash_moves_stake_to_recipient(registry, token, machine, operator, stranger):
    registry.lock(machine, 9, {"from": operator})

    tx = registry.slash(machine, 9, 40 * CREDIT, stranger, {"from": operator})

    assert tx.return_value == 40 * CREDIT
    assert registry.getMachine(machine)["stake"] == MIN_STAKE - 40 * CREDIT
    assert registry.totalStaked() == MIN_STAKE - 40 * CREDIT
    assert token.balanceOf(stranger) == 40 * CREDIT
    assert_event(tx, "StakeSlashed", registry, machineId=machine, jobId=9, amount=40 * CREDIT, to=stranger)


def test_slash_caps_at_remaining_stake(registry, token, machine, operator, stranger):
    registry.lock(machine, 9, {"from": operator})

    tx = registry.slash(machine, 9, MIN_STAKE * 3, stranger, {"from": operator})

    assert tx.return_value == MIN_STAKE
    assert registry.getMachine(machine)["stake"] == 0
    assert token.balanceOf(stranger) == MIN_STAKE
    assert_event(tx, "StakeSlashed", registry, machineId=machine, jobId=9, amount=MIN_STAKE, to=stranger)


def test_slash_of_empty_stake_moves_nothing(registry, register_machine, lender, operator, stranger):
    machine_id = register_machine(lender, stake=0)
    registry.lock(machine_id, 9, {"from": operator})

    tx = registry.slash(machine_id, 9, CREDIT, stranger, {"from": operator})

    assert tx.return_value == 0
    assert_no_event(tx, "StakeSlashed")


def test_slash_rejects_other_job(registry, machine, operator, stranger):
    registry.lock(machine, 9, {"from": operator})

    with reverts_with("RegistryMachineNotLocked", machine, 8):
        registry.slash(machine, 8, CREDIT, stranger, {"from": operator})


def test_get_machine_rejects_unknown_id(registry):
    with reverts_with("RegistryMachineNotFound", 1):
        registry.getMachine(1)


@pytest.mark.parametrize(
    "timestamp, hour",
    [
        (0, 72),  # 1970-01-01 00:00 UTC, a Thursday
        (4 * 86_400, 0),  # 1970-01-05 00:00, Monday
        (4 * 86_400 - 1, 167),  # Sunday 23:59:59
        (4 * 86_400 + 3_599, 0),
        (4 * 86_400 + 3_600, 1),
        (1_796_256_000, 72),  # 2026-12-03 00:00, Thursday
        (1_796_428_800, 120),  # 2026-12-05 00:00, Saturday
    ],
)
def test_hour_of_week_starts_monday_utc(registry, timestamp, hour):
    assert registry.hourOfWeek(timestamp) == hour


def test_is_available_follows_mask_bits(registry, register_machine, lender):
    machine_id = register_machine(lender, availabilityMask=availability_mask(0, 167))
    monday = 4 * 86_400

    assert registry.isAvailable(machine_id, monday)
    assert registry.isAvailable(machine_id, monday + 3_599)
    assert not registry.isAvailable(machine_id, monday + 3_600)
    assert registry.isAvailable(machine_id, monday - 1)
    assert not registry.isAvailable(machine_id, monday - 3_601)


def test_is_available_false_unless_active(registry, machine, lender):
    assert registry.isAvailable(machine, 0)
    registry.pauseMachine(machine, {"from": lender})
    assert not registry.isAvailable(machine, 0)
    registry.resumeMachine(machine, {"from": lender})
    registry.retireMachine(machine, {"from": lender})
    assert not registry.isAvailable(machine, 0)
    assert not registry.isAvailable(12345, 0)


def test_default_spec_constants(registry):
    assert registry.ALWAYS_AVAILABLE() == ALWAYS_AVAILABLE
    assert registry.HOURS_PER_WEEK() == 168
