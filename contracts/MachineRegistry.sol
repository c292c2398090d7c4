// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/**
 * @title MachineRegistry
 * @notice Lenders register the machines they lend: hardware, price, TensorFlow endpoint, a
 * weekly availability window and a stake bonded in credits.
 * @dev The registry holds every stake, so `token.balanceOf(registry) == totalStaked` at all
 * times. The market (MARKET_ROLE) locks a machine to a job, releases it, and slashes its
 * stake; a locked machine cannot be retired and its stake cannot be withdrawn.
 *
 * Availability: bit `h` of `availabilityMask` (h in [0, 168)) means the machine may be lent
 * during hour-of-week `h`, counted in UTC from Monday 00:00. Bits at 168 and above must be 0.
 */
contract MachineRegistry is AccessControl, ReentrancyGuard {
    using SafeERC20 for IERC20;

    enum MachineStatus {
        None,
        Active,
        Paused,
        Retired
    }

    /// @notice What a lender declares about a machine.
    struct MachineSpec {
        uint32 cores;
        uint32 memoryMib;
        uint16 gpus;
        uint32 benchmarkScore;
        uint256 pricePerCoreHour; // credit base units per core-hour
        uint256 availabilityMask; // 168 bits, one per UTC hour of the week
        string endpoint; // host:port other workers use to reach this machine's TF server
    }

    struct Machine {
        address lender;
        MachineStatus status;
        uint256 stake; // credit base units bonded, slashable while locked
        uint256 lockedBy; // job id holding the machine, 0 when idle
        MachineSpec spec;
    }

    error RegistryMachineNotFound(uint256 machineId);
    error RegistryCallerNotLender(uint256 machineId, address caller);
    error RegistryInvalidStatus(uint256 machineId, MachineStatus status);
    error RegistryMachineLocked(uint256 machineId, uint256 jobId);
    error RegistryMachineNotLocked(uint256 machineId, uint256 jobId);
    error RegistryInvalidSpec(string field, uint256 value);
    error RegistryInsufficientStake(uint256 machineId, uint256 requested, uint256 stake);
    error RegistryZeroAmount();

    event MachineRegistered(
        uint256 indexed machineId,
        address indexed lender,
        uint32 cores,
        uint32 memoryMib,
        uint256 pricePerCoreHour,
        uint256 availabilityMask,
        string endpoint
    );
    event MachineUpdated(
        uint256 indexed machineId, uint32 cores, uint32 memoryMib, uint256 pricePerCoreHour, uint256 availabilityMask, string endpoint
    );
    event MachinePaused(uint256 indexed machineId);
    event MachineResumed(uint256 indexed machineId);
    event MachineRetired(uint256 indexed machineId, uint256 stakeReturned);
    event StakeAdded(uint256 indexed machineId, uint256 amount, uint256 stake);
    event StakeWithdrawn(uint256 indexed machineId, uint256 amount, uint256 stake);
    event StakeSlashed(uint256 indexed machineId, uint256 indexed jobId, uint256 amount, address to);
    event MachineLocked(uint256 indexed machineId, uint256 indexed jobId);
    event MachineReleased(uint256 indexed machineId, uint256 indexed jobId);

    bytes32 public constant MARKET_ROLE = keccak256("MARKET_ROLE");
    uint256 public constant HOURS_PER_WEEK = 168;
    /// Mask with every valid hour bit set: a machine that is always available.
    uint256 public constant ALWAYS_AVAILABLE = (uint256(1) << 168) - 1;

    IERC20 public immutable token;
    uint256 public machineCount;
    uint256 public totalStaked;
    mapping(uint256 machineId => Machine) private _machines;

    constructor(IERC20 token_, address admin) {
        token = token_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    // ---------------------------------------------------------------- lender actions

    /**
     * @notice Registers a machine owned by the caller and bonds `stake` credits.
     * @return machineId the new machine's id (ids start at 1).
     *
     * Requirements:
     * - the spec is valid (see {_checkSpec});
     * - the caller approved `stake` credits to this contract.
     */
    function registerMachine(MachineSpec calldata spec, uint256 stake) external nonReentrant returns (uint256 machineId) {
        _checkSpec(spec);
        machineId = ++machineCount;
        Machine storage machine = _machines[machineId];
        machine.lender = msg.sender;
        machine.status = MachineStatus.Active;
        machine.spec = spec;
        emit MachineRegistered(
            machineId, msg.sender, spec.cores, spec.memoryMib, spec.pricePerCoreHour, spec.availabilityMask, spec.endpoint
        );
        if (stake > 0) _addStake(machineId, machine, stake);
    }

    /// @notice Replaces the spec of a machine that is not retired. A running job keeps the price it was assigned at.
    function updateMachine(uint256 machineId, MachineSpec calldata spec) external {
        Machine storage machine = _ownedMachine(machineId);
        if (machine.status == MachineStatus.Retired) revert RegistryInvalidStatus(machineId, machine.status);
        _checkSpec(spec);
        machine.spec = spec;
        emit MachineUpdated(machineId, spec.cores, spec.memoryMib, spec.pricePerCoreHour, spec.availabilityMask, spec.endpoint);
    }

    /// @notice Stops new assignments to an active machine; a job already running on it continues.
    function pauseMachine(uint256 machineId) external {
        Machine storage machine = _ownedMachine(machineId);
        if (machine.status != MachineStatus.Active) revert RegistryInvalidStatus(machineId, machine.status);
        machine.status = MachineStatus.Paused;
        emit MachinePaused(machineId);
    }

    /// @notice Makes a paused machine assignable again.
    function resumeMachine(uint256 machineId) external {
        Machine storage machine = _ownedMachine(machineId);
        if (machine.status != MachineStatus.Paused) revert RegistryInvalidStatus(machineId, machine.status);
        machine.status = MachineStatus.Active;
        emit MachineResumed(machineId);
    }

    /// @notice Retires an idle machine for good and returns its whole stake to the lender.
    function retireMachine(uint256 machineId) external nonReentrant {
        Machine storage machine = _ownedMachine(machineId);
        if (machine.status == MachineStatus.Retired) revert RegistryInvalidStatus(machineId, machine.status);
        if (machine.lockedBy != 0) revert RegistryMachineLocked(machineId, machine.lockedBy);
        uint256 stake = machine.stake;
        machine.status = MachineStatus.Retired;
        machine.stake = 0;
        totalStaked -= stake;
        emit MachineRetired(machineId, stake);
        if (stake > 0) token.safeTransfer(machine.lender, stake);
    }

    /// @notice Bonds `amount` more credits to a machine that is not retired.
    function addStake(uint256 machineId, uint256 amount) external nonReentrant {
        Machine storage machine = _ownedMachine(machineId);
        if (machine.status == MachineStatus.Retired) revert RegistryInvalidStatus(machineId, machine.status);
        if (amount == 0) revert RegistryZeroAmount();
        _addStake(machineId, machine, amount);
    }

    /// @notice Returns `amount` of an idle machine's stake to its lender.
    function withdrawStake(uint256 machineId, uint256 amount) external nonReentrant {
        Machine storage machine = _ownedMachine(machineId);
        if (machine.lockedBy != 0) revert RegistryMachineLocked(machineId, machine.lockedBy);
        if (amount == 0) revert RegistryZeroAmount();
        if (amount > machine.stake) revert RegistryInsufficientStake(machineId, amount, machine.stake);
        machine.stake -= amount;
        totalStaked -= amount;
        emit StakeWithdrawn(machineId, amount, machine.stake);
        token.safeTransfer(machine.lender, amount);
    }

    // ---------------------------------------------------------------- market actions

    /// @notice Locks an idle machine to `jobId` (MARKET_ROLE).
    function lock(uint256 machineId, uint256 jobId) external onlyRole(MARKET_ROLE) {
        Machine storage machine = _existingMachine(machineId);
        if (machine.lockedBy != 0) revert RegistryMachineLocked(machineId, machine.lockedBy);
        machine.lockedBy = jobId;
        emit MachineLocked(machineId, jobId);
    }

    /// @notice Releases a machine locked to `jobId` (MARKET_ROLE).
    function release(uint256 machineId, uint256 jobId) external onlyRole(MARKET_ROLE) {
        Machine storage machine = _existingMachine(machineId);
        if (machine.lockedBy != jobId) revert RegistryMachineNotLocked(machineId, jobId);
        machine.lockedBy = 0;
        emit MachineReleased(machineId, jobId);
    }

    /**
     * @notice Moves `amount` of the stake of a machine locked to `jobId` to `to` (MARKET_ROLE).
     * @return slashed the amount moved: `amount`, capped at the remaining stake.
     */
    function slash(uint256 machineId, uint256 jobId, uint256 amount, address to)
        external
        onlyRole(MARKET_ROLE)
        nonReentrant
        returns (uint256 slashed)
    {
        Machine storage machine = _existingMachine(machineId);
        if (machine.lockedBy != jobId) revert RegistryMachineNotLocked(machineId, jobId);
        slashed = amount < machine.stake ? amount : machine.stake;
        if (slashed == 0) return 0;
        machine.stake -= slashed;
        totalStaked -= slashed;
        emit StakeSlashed(machineId, jobId, slashed, to);
        token.safeTransfer(to, slashed);
    }

    // ---------------------------------------------------------------- views

    /// @notice The full record of a machine; reverts for an unknown id.
    function getMachine(uint256 machineId) external view returns (Machine memory) {
        return _existingMachine(machineId);
    }

    /// @notice Whether `machineId` is active and its owner lends it during the hour containing `timestamp`.
    function isAvailable(uint256 machineId, uint256 timestamp) public view returns (bool) {
        Machine storage machine = _machines[machineId];
        if (machine.status != MachineStatus.Active) return false;
        return (machine.spec.availabilityMask >> hourOfWeek(timestamp)) & 1 == 1;
    }

    /// @notice Hour of the week in UTC for a unix `timestamp`: 0 is Monday 00:00-00:59.
    function hourOfWeek(uint256 timestamp) public pure returns (uint256) {
        // 1970-01-01 was a Thursday, 72 hours after Monday 00:00.
        return (timestamp / 3600 + 72) % HOURS_PER_WEEK;
    }

    // ---------------------------------------------------------------- internal

    function _addStake(uint256 machineId, Machine storage machine, uint256 amount) private {
        machine.stake += amount;
        totalStaked += amount;
        emit StakeAdded(machineId, amount, machine.stake);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    function _existingMachine(uint256 machineId) private view returns (Machine storage machine) {
        machine = _machines[machineId];
        if (machine.status == MachineStatus.None) revert RegistryMachineNotFound(machineId);
    }

    function _ownedMachine(uint256 machineId) private view returns (Machine storage machine) {
        machine = _existingMachine(machineId);
        if (machine.lender != msg.sender) revert RegistryCallerNotLender(machineId, msg.sender);
    }

    /// @dev Rejects specs that could never serve a job: no cores, no memory, no endpoint or a mask with bits past hour 167.
    function _checkSpec(MachineSpec calldata spec) private pure {
        if (spec.cores == 0) revert RegistryInvalidSpec("cores", spec.cores);
        if (spec.memoryMib == 0) revert RegistryInvalidSpec("memoryMib", spec.memoryMib);
        if (spec.availabilityMask > ALWAYS_AVAILABLE) revert RegistryInvalidSpec("availabilityMask", spec.availabilityMask);
        if (bytes(spec.endpoint).length == 0) revert RegistryInvalidSpec("endpoint", 0);
    }
}
