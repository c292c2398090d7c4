// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {Pausable} from "@openzeppelin/contracts/utils/Pausable.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {Nonces} from "@openzeppelin/contracts/utils/Nonces.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {MachineRegistry} from "./MachineRegistry.sol";

/**
 * @title JobMarket
 * @notice Escrow and lifecycle of DeepMarket training jobs. A borrower escrows a budget of
 * credits; the coordinator assigns registered machines; each lender is paid per checkpoint
 * through an EIP-712 work receipt it signs; whatever is not paid goes back to the borrower.
 *
 * @dev Accounting invariant: `token.balanceOf(this) == totalEscrowed + totalWithdrawable`.
 * Every payment, refund and slash moves credits from escrow (or the registry's stakes) into
 * `withdrawable`, and only {withdraw} sends credits out. Every escrowed credit has a path
 * out that no privileged role can block: {cancelJob} before assignment, {expireJob} by
 * anyone after the job deadline or a proof timeout, and {withdraw} — none of them pausable.
 *
 * Checkpoint proofs: the chief (slot 0) publishes the checkpoint CID for each index; other
 * workers' receipts for that index must carry the same CID, because a synchronous
 * multi-worker run gives every worker identical weights.
 */
contract JobMarket is AccessControl, Pausable, ReentrancyGuard, EIP712, Nonces {
    using SafeERC20 for IERC20;

    enum JobStatus {
        None,
        Queued,
        Running,
        Completed,
        Cancelled,
        Failed,
        Expired
    }

    /// @notice What a borrower asks for.
    struct JobRequest {
        string bundleCid; // IPFS CID of the job bundle (model, dataset reference, training config)
        uint256 budget; // credit base units escrowed
        uint256 maxPricePerCoreHour; // price cap per machine, credit base units per core-hour
        uint32 workers; // machines in the cluster
        uint32 minCores; // per machine
        uint32 minMemoryMib; // per machine
        uint64 jobDeadline; // unix seconds; after it anyone may expire the job
    }

    /// @notice A borrower's signed order, relayed by anyone (EIP-712).
    struct JobOrder {
        address borrower;
        JobRequest request;
        uint256 nonce;
        uint256 deadline; // unix seconds; the signature is void after it
    }

    /// @notice A lender's signed claim for one checkpoint of one job (EIP-712).
    struct WorkReceipt {
        uint256 jobId;
        uint256 machineId;
        uint256 checkpointIndex; // 1-based, strictly increasing per (job, machine)
        uint256 steps; // training steps finished by this checkpoint
        string checkpointCid;
        uint256 coreSeconds; // cores x seconds the machine served since its last proof
    }

    struct Job {
        address borrower;
        JobStatus status;
        uint32 workers;
        uint32 round; // incremented on every (re)assignment of the cluster
        uint32 minCores;
        uint32 minMemoryMib;
        uint64 deadline;
        uint64 lastProgressAt; // last assignment or proof, for the proof timeout
        uint256 budget;
        uint256 escrow; // credits still held for this job
        uint256 paid; // credits paid to lenders so far
        uint256 maxPricePerCoreHour;
        string bundleCid;
        string clusterSpecCid;
        string resultCid;
    }

    struct Worker {
        uint256 machineId;
        address lender;
        uint256 pricePerCoreHour; // snapshot at assignment
        uint32 cores; // snapshot at assignment
        uint64 since; // assignment or last proof, unix seconds
        bool active;
    }

    error MarketJobNotFound(uint256 jobId);
    error MarketInvalidJobStatus(uint256 jobId, JobStatus status);
    error MarketInvalidRequest(string field, uint256 value);
    error MarketCallerNotBorrower(uint256 jobId, address caller);
    error MarketCallerNotLender(uint256 machineId, address caller);
    error MarketOrderExpired(uint256 deadline, uint256 timestamp);
    error MarketInvalidSigner(address expected, address recovered);
    error MarketJobDeadlinePassed(uint256 jobId, uint256 deadline);
    error MarketJobNotExpirable(uint256 jobId);
    error MarketWrongWorkerCount(uint256 jobId, uint256 expected, uint256 given);
    error MarketMachineUnavailable(uint256 machineId, uint256 timestamp);
    error MarketMachineTooSmall(uint256 machineId, uint32 cores, uint32 memoryMib);
    error MarketPriceAboveCap(uint256 machineId, uint256 price, uint256 cap);
    error MarketStakeTooLow(uint256 machineId, uint256 stake, uint256 minStake);
    error MarketMachineOwnedByBorrower(uint256 machineId, address borrower);
    error MarketWorkerNotActive(uint256 jobId, uint256 machineId);
    error MarketSlotOccupied(uint256 jobId, uint256 slot, uint256 machineId);
    error MarketSlotOutOfRange(uint256 jobId, uint256 slot);
    error MarketSlotEmpty(uint256 jobId, uint256 slot);
    error MarketStaleCheckpoint(uint256 jobId, uint256 machineId, uint256 checkpointIndex, uint256 lastIndex);
    error MarketCheckpointNotPublished(uint256 jobId, uint256 checkpointIndex);
    error MarketCheckpointMismatch(uint256 jobId, uint256 checkpointIndex);
    error MarketCoreSecondsTooHigh(uint256 jobId, uint256 machineId, uint256 claimed, uint256 allowed);
    error MarketBudgetExhausted(uint256 jobId, uint256 payment, uint256 escrow);
    error MarketNothingToWithdraw(address account);
    error MarketInvalidParameter(string name, uint256 value);

    event JobSubmitted(
        uint256 indexed jobId, address indexed borrower, uint256 budget, uint32 workers, uint64 deadline, string bundleCid
    );
    event JobAssigned(uint256 indexed jobId, uint32 round, string clusterSpecCid, uint256[] machineIds);
    event WorkerAssigned(uint256 indexed jobId, uint256 indexed machineId, address indexed lender, uint32 slot, uint32 round);
    event ProofRecorded(
        uint256 indexed jobId,
        uint256 indexed machineId,
        address indexed lender,
        uint256 checkpointIndex,
        uint256 steps,
        uint256 coreSeconds,
        uint256 payment,
        string checkpointCid
    );
    event WorkerReady(uint256 indexed jobId, uint256 indexed machineId, uint32 round);
    event WorkerStopped(uint256 indexed jobId, uint256 indexed machineId, uint32 round);
    event WorkerFaulted(uint256 indexed jobId, uint256 indexed machineId, uint32 slot, uint256 slashed);
    event WorkerLeft(uint256 indexed jobId, uint256 indexed machineId, uint32 slot);
    event WorkerReplaced(uint256 indexed jobId, uint32 slot, uint256 oldMachineId, uint256 indexed newMachineId);
    event JobCompleted(uint256 indexed jobId, string resultCid, uint256 paid, uint256 refund);
    event JobCancelled(uint256 indexed jobId, uint256 refund);
    event JobFailed(uint256 indexed jobId, string reason, uint256 refund);
    event JobExpired(uint256 indexed jobId, uint256 refund, uint256 slashed);
    event Withdrawn(address indexed account, uint256 amount);
    event ParametersUpdated(uint256 minStake, uint256 slashBps, uint256 proofTimeout);

    bytes32 public constant COORDINATOR_ROLE = keccak256("COORDINATOR_ROLE");
    bytes32 public constant PAUSER_ROLE = keccak256("PAUSER_ROLE");
    uint32 public constant MAX_WORKERS = 64;
    uint256 public constant BPS = 10_000;

    bytes32 public constant JOB_REQUEST_TYPEHASH = keccak256(
        "JobRequest(string bundleCid,uint256 budget,uint256 maxPricePerCoreHour,uint32 workers,uint32 minCores,uint32 minMemoryMib,uint64 jobDeadline)"
    );
    bytes32 public constant JOB_ORDER_TYPEHASH = keccak256(
        "JobOrder(address borrower,JobRequest request,uint256 nonce,uint256 deadline)"
        "JobRequest(string bundleCid,uint256 budget,uint256 maxPricePerCoreHour,uint32 workers,uint32 minCores,uint32 minMemoryMib,uint64 jobDeadline)"
    );
    bytes32 public constant WORK_RECEIPT_TYPEHASH = keccak256(
        "WorkReceipt(uint256 jobId,uint256 machineId,uint256 checkpointIndex,uint256 steps,string checkpointCid,uint256 coreSeconds)"
    );

    IERC20 public immutable token;
    MachineRegistry public immutable registry;

    uint256 public minStake; // credit base units a machine must bond to be assigned
    uint256 public slashBps; // share of the stake slashed for a fault, in basis points
    uint256 public proofTimeout; // seconds without progress before a running job may be expired

    uint256 public jobCount;
    uint256 public totalEscrowed;
    uint256 public totalWithdrawable;
    mapping(address account => uint256) public withdrawable;
    mapping(address account => uint256) public lentCoreSeconds;
    mapping(address account => uint256) public borrowedCoreSeconds;

    mapping(uint256 jobId => Job) private _jobs;
    mapping(uint256 jobId => Worker[]) private _workers;
    mapping(uint256 jobId => mapping(uint256 machineId => uint256)) public lastCheckpointIndex;
    mapping(uint256 jobId => mapping(uint256 checkpointIndex => bytes32)) public checkpointCidHash;

    constructor(IERC20 token_, MachineRegistry registry_, address admin, uint256 minStake_, uint256 slashBps_, uint256 proofTimeout_)
        EIP712("DeepMarket JobMarket", "1")
    {
        token = token_;
        registry = registry_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(PAUSER_ROLE, admin);
        _setParameters(minStake_, slashBps_, proofTimeout_);
    }

    // ---------------------------------------------------------------- borrower actions

    /// @notice Submits a job for the caller and escrows `request.budget` (needs an allowance).
    function submitJob(JobRequest calldata request) external whenNotPaused nonReentrant returns (uint256) {
        return _submit(msg.sender, request);
    }

    /// @notice Like {submitJob}, with an EIP-2612 permit for the budget in the same call.
    function submitJobWithPermit(JobRequest calldata request, uint256 permitDeadline, uint8 v, bytes32 r, bytes32 s)
        external
        whenNotPaused
        nonReentrant
        returns (uint256)
    {
        // A front-run permit has already set the allowance, so a failure here is not fatal;
        // transferFrom below fails with the token's own error if the allowance is missing.
        try IERC20Permit(address(token)).permit(msg.sender, address(this), request.budget, permitDeadline, v, r, s) {} catch {}
        return _submit(msg.sender, request);
    }

    /**
     * @notice Submits a job signed by `order.borrower`; anyone may relay it.
     *
     * Requirements:
     * - `order.deadline` has not passed and `order.nonce` is the borrower's next nonce;
     * - `signature` is the borrower's EIP-712 signature over the order, on this chain and
     *   contract, with a low-s value;
     * - the borrower approved (or permitted) the budget to this contract.
     */
    function submitJobWithSignature(JobOrder calldata order, bytes calldata signature)
        external
        whenNotPaused
        nonReentrant
        returns (uint256)
    {
        if (block.timestamp > order.deadline) revert MarketOrderExpired(order.deadline, block.timestamp);
        address signer = ECDSA.recover(hashJobOrder(order), signature);
        if (signer != order.borrower) revert MarketInvalidSigner(order.borrower, signer);
        _useCheckedNonce(order.borrower, order.nonce);
        return _submit(order.borrower, order.request);
    }

    /// @notice Cancels a queued job and refunds its whole budget to the borrower.
    function cancelJob(uint256 jobId) external nonReentrant {
        Job storage job = _existingJob(jobId);
        if (msg.sender != job.borrower) revert MarketCallerNotBorrower(jobId, msg.sender);
        if (job.status != JobStatus.Queued) revert MarketInvalidJobStatus(jobId, job.status);
        job.status = JobStatus.Cancelled;
        uint256 refund = _refundEscrow(job);
        emit JobCancelled(jobId, refund);
    }

    // ---------------------------------------------------------------- coordinator actions

    /**
     * @notice Assigns a queued job to `machineIds` (slot i runs TF task index i) and locks them.
     *
     * Requirements: caller has COORDINATOR_ROLE; one machine per requested worker; each is
     * active, inside its availability window now, big enough, within the price cap, bonded
     * with at least `minStake`, not the borrower's, and not locked to another job.
     */
    function assignJob(uint256 jobId, uint256[] calldata machineIds, string calldata clusterSpecCid)
        external
        onlyRole(COORDINATOR_ROLE)
        whenNotPaused
    {
        Job storage job = _existingJob(jobId);
        if (job.status != JobStatus.Queued) revert MarketInvalidJobStatus(jobId, job.status);
        if (block.timestamp > job.deadline) revert MarketJobDeadlinePassed(jobId, job.deadline);
        if (machineIds.length != job.workers) revert MarketWrongWorkerCount(jobId, job.workers, machineIds.length);
        if (bytes(clusterSpecCid).length == 0) revert MarketInvalidRequest("clusterSpecCid", 0);

        job.status = JobStatus.Running;
        job.round += 1;
        job.clusterSpecCid = clusterSpecCid;
        job.lastProgressAt = uint64(block.timestamp);
        for (uint256 slot = 0; slot < machineIds.length; slot++) {
            _workers[jobId].push(_takeMachine(jobId, job, machineIds[slot]));
            emit WorkerAssigned(jobId, machineIds[slot], _workers[jobId][slot].lender, uint32(slot), job.round);
        }
        emit JobAssigned(jobId, job.round, clusterSpecCid, machineIds);
    }

    /**
     * @notice Reports that the worker on `machineId` was lost: slashes `slashBps` of its stake
     * to the borrower, releases the machine and leaves its slot empty for {replaceWorker}.
     * What it already proved stays paid.
     */
    function reportFault(uint256 jobId, uint256 machineId) external onlyRole(COORDINATOR_ROLE) nonReentrant {
        Job storage job = _existingJob(jobId);
        if (job.status != JobStatus.Running) revert MarketInvalidJobStatus(jobId, job.status);
        uint32 slot = _activeSlot(jobId, machineId);
        uint256 slashed = _slashAndRelease(jobId, job, _workers[jobId][slot]);
        emit WorkerFaulted(jobId, machineId, slot, slashed);
    }

    /**
     * @notice Puts `newMachineId` into an empty slot and restarts the cluster under a new
     * round with `clusterSpecCid` (TensorFlow's multi-worker runtime cannot swap one worker).
     */
    function replaceWorker(uint256 jobId, uint32 slot, uint256 newMachineId, string calldata clusterSpecCid)
        external
        onlyRole(COORDINATOR_ROLE)
        whenNotPaused
    {
        Job storage job = _existingJob(jobId);
        if (job.status != JobStatus.Running) revert MarketInvalidJobStatus(jobId, job.status);
        if (block.timestamp > job.deadline) revert MarketJobDeadlinePassed(jobId, job.deadline);
        if (slot >= _workers[jobId].length) revert MarketSlotOutOfRange(jobId, slot);
        Worker storage old = _workers[jobId][slot];
        if (old.active) revert MarketSlotOccupied(jobId, slot, old.machineId);
        if (bytes(clusterSpecCid).length == 0) revert MarketInvalidRequest("clusterSpecCid", 0);

        uint256 oldMachineId = old.machineId;
        _workers[jobId][slot] = _takeMachine(jobId, job, newMachineId);
        job.round += 1;
        job.clusterSpecCid = clusterSpecCid;
        job.lastProgressAt = uint64(block.timestamp);
        emit WorkerReplaced(jobId, slot, oldMachineId, newMachineId);
        emit WorkerAssigned(jobId, newMachineId, _workers[jobId][slot].lender, slot, job.round);
        emit JobAssigned(jobId, job.round, clusterSpecCid, workerMachineIds(jobId));
    }

    /**
     * @notice Restarts a running job's cluster on the same machines under a new round with
     * `clusterSpecCid` (every worker stopped and none was lost, e.g. after a network fault).
     */
    function restartCluster(uint256 jobId, string calldata clusterSpecCid)
        external
        onlyRole(COORDINATOR_ROLE)
        whenNotPaused
    {
        Job storage job = _existingJob(jobId);
        if (job.status != JobStatus.Running) revert MarketInvalidJobStatus(jobId, job.status);
        if (block.timestamp > job.deadline) revert MarketJobDeadlinePassed(jobId, job.deadline);
        if (bytes(clusterSpecCid).length == 0) revert MarketInvalidRequest("clusterSpecCid", 0);
        Worker[] storage workers = _workers[jobId];
        for (uint256 slot = 0; slot < workers.length; slot++) {
            if (!workers[slot].active) revert MarketSlotEmpty(jobId, slot);
        }
        job.round += 1;
        job.clusterSpecCid = clusterSpecCid;
        job.lastProgressAt = uint64(block.timestamp);
        emit JobAssigned(jobId, job.round, clusterSpecCid, workerMachineIds(jobId));
    }

    /// @notice Completes a running job with its trained model; releases the machines and refunds the unused budget.
    function completeJob(uint256 jobId, string calldata resultCid) external onlyRole(COORDINATOR_ROLE) nonReentrant {
        Job storage job = _existingJob(jobId);
        if (job.status != JobStatus.Running) revert MarketInvalidJobStatus(jobId, job.status);
        job.status = JobStatus.Completed;
        job.resultCid = resultCid;
        _releaseActive(jobId);
        uint256 refund = _refundEscrow(job);
        emit JobCompleted(jobId, resultCid, job.paid, refund);
    }

    /// @notice Fails a queued or running job that cannot run (e.g. an invalid bundle); no stake is slashed.
    function failJob(uint256 jobId, string calldata reason) external onlyRole(COORDINATOR_ROLE) nonReentrant {
        Job storage job = _existingJob(jobId);
        if (job.status != JobStatus.Queued && job.status != JobStatus.Running) {
            revert MarketInvalidJobStatus(jobId, job.status);
        }
        job.status = JobStatus.Failed;
        _releaseActive(jobId);
        uint256 refund = _refundEscrow(job);
        emit JobFailed(jobId, reason, refund);
    }

    // ---------------------------------------------------------------- lender actions

    /**
     * @notice Records a lender-signed work receipt and pays its interval from escrow into the
     * lender's withdrawable balance: `coreSeconds * pricePerCoreHour / 3600`. Anyone may relay.
     *
     * Requirements: the job is running and the machine holds an active slot in it; the
     * signature is the machine's lender's; the index is above the last one proved; the
     * claimed core-seconds fit in cores x seconds since the worker's last proof; for a
     * non-chief worker the chief already published the same checkpoint CID.
     */
    function recordProof(WorkReceipt calldata receipt, bytes calldata signature) external nonReentrant {
        Job storage job = _existingJob(receipt.jobId);
        if (job.status != JobStatus.Running) revert MarketInvalidJobStatus(receipt.jobId, job.status);
        uint32 slot = _activeSlot(receipt.jobId, receipt.machineId);
        Worker storage worker = _workers[receipt.jobId][slot];

        address signer = ECDSA.recover(hashWorkReceipt(receipt), signature);
        if (signer != worker.lender) revert MarketInvalidSigner(worker.lender, signer);
        uint256 lastIndex = lastCheckpointIndex[receipt.jobId][receipt.machineId];
        if (receipt.checkpointIndex <= lastIndex) {
            revert MarketStaleCheckpoint(receipt.jobId, receipt.machineId, receipt.checkpointIndex, lastIndex);
        }
        _checkCheckpointCid(slot, receipt);

        lastCheckpointIndex[receipt.jobId][receipt.machineId] = receipt.checkpointIndex;
        uint256 payment = _payInterval(job, worker, receipt);
        _emitProofRecorded(receipt, worker.lender, payment);
    }

    /**
     * @notice The lender reports that its worker for the job's current round is running. The
     * coordinator faults workers that stay silent past its formation timeout, so a cluster
     * that cannot form is blamed on the machines that never started, not on all of them.
     */
    function reportReady(uint256 jobId, uint256 machineId) external {
        uint32 round = _checkCallerIsWorker(jobId, machineId);
        emit WorkerReady(jobId, machineId, round);
    }

    /**
     * @notice The lender reports that its worker for the job's current round stopped before
     * the job finished (a peer was lost, or the worker crashed). When every worker but one
     * has stopped, the coordinator can tell which machine was lost.
     */
    function reportStopped(uint256 jobId, uint256 machineId) external {
        uint32 round = _checkCallerIsWorker(jobId, machineId);
        emit WorkerStopped(jobId, machineId, round);
    }

    /// @notice The lender takes its machine back from a running job (owner reclaim); no slash, the slot is left empty.
    function leaveJob(uint256 jobId, uint256 machineId) external nonReentrant {
        Job storage job = _existingJob(jobId);
        if (job.status != JobStatus.Running) revert MarketInvalidJobStatus(jobId, job.status);
        uint32 slot = _activeSlot(jobId, machineId);
        Worker storage worker = _workers[jobId][slot];
        if (worker.lender != msg.sender) revert MarketCallerNotLender(machineId, msg.sender);
        worker.active = false;
        registry.release(machineId, jobId);
        emit WorkerLeft(jobId, machineId, slot);
    }

    // ---------------------------------------------------------------- anyone

    /**
     * @notice Ends a job that can no longer finish and refunds its escrow to the borrower.
     * A queued job expires after its deadline; a running one after its deadline or after
     * `proofTimeout` seconds without progress. Workers that proved nothing for `proofTimeout`
     * seconds are slashed toward the borrower.
     */
    function expireJob(uint256 jobId) external nonReentrant {
        Job storage job = _existingJob(jobId);
        bool pastDeadline = block.timestamp > job.deadline;
        if (job.status == JobStatus.Queued) {
            if (!pastDeadline) revert MarketJobNotExpirable(jobId);
        } else if (job.status == JobStatus.Running) {
            // A job with an empty slot waits for a replacement until its deadline; a full
            // cluster that stops proving expires after the proof timeout.
            bool stalled = !_hasVacancy(jobId) && block.timestamp > uint256(job.lastProgressAt) + proofTimeout;
            if (!pastDeadline && !stalled) revert MarketJobNotExpirable(jobId);
        } else {
            revert MarketInvalidJobStatus(jobId, job.status);
        }
        job.status = JobStatus.Expired;

        uint256 slashedTotal;
        Worker[] storage workers = _workers[jobId];
        for (uint256 slot = 0; slot < workers.length; slot++) {
            Worker storage worker = workers[slot];
            if (!worker.active) continue;
            if (block.timestamp > uint256(worker.since) + proofTimeout) {
                uint256 slashed = _slashAndRelease(jobId, job, worker);
                slashedTotal += slashed;
                emit WorkerFaulted(jobId, worker.machineId, uint32(slot), slashed);
            } else {
                worker.active = false;
                registry.release(worker.machineId, jobId);
            }
        }
        uint256 refund = _refundEscrow(job);
        emit JobExpired(jobId, refund, slashedTotal);
    }

    /// @notice Sends the caller everything credited to it: payments, refunds and slashed stakes.
    function withdraw() external nonReentrant {
        uint256 amount = withdrawable[msg.sender];
        if (amount == 0) revert MarketNothingToWithdraw(msg.sender);
        withdrawable[msg.sender] = 0;
        totalWithdrawable -= amount;
        emit Withdrawn(msg.sender, amount);
        token.safeTransfer(msg.sender, amount);
    }

    // ---------------------------------------------------------------- admin

    function setParameters(uint256 minStake_, uint256 slashBps_, uint256 proofTimeout_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _setParameters(minStake_, slashBps_, proofTimeout_);
    }

    function pause() external onlyRole(PAUSER_ROLE) {
        _pause();
    }

    function unpause() external onlyRole(PAUSER_ROLE) {
        _unpause();
    }

    // ---------------------------------------------------------------- views

    function getJob(uint256 jobId) external view returns (Job memory) {
        return _existingJob(jobId);
    }

    function getWorkers(uint256 jobId) external view returns (Worker[] memory) {
        return _workers[jobId];
    }

    /// @notice Machine ids by slot; an empty slot keeps the id of the machine that left it.
    function workerMachineIds(uint256 jobId) public view returns (uint256[] memory ids) {
        Worker[] storage workers = _workers[jobId];
        ids = new uint256[](workers.length);
        for (uint256 slot = 0; slot < workers.length; slot++) {
            ids[slot] = workers[slot].machineId;
        }
    }

    function hashJobOrder(JobOrder calldata order) public view returns (bytes32) {
        JobRequest calldata request = order.request;
        bytes32 requestHash = keccak256(
            abi.encode(
                JOB_REQUEST_TYPEHASH,
                keccak256(bytes(request.bundleCid)),
                request.budget,
                request.maxPricePerCoreHour,
                request.workers,
                request.minCores,
                request.minMemoryMib,
                request.jobDeadline
            )
        );
        return _hashTypedDataV4(
            keccak256(abi.encode(JOB_ORDER_TYPEHASH, order.borrower, requestHash, order.nonce, order.deadline))
        );
    }

    function hashWorkReceipt(WorkReceipt calldata receipt) public view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(
                abi.encode(
                    WORK_RECEIPT_TYPEHASH,
                    receipt.jobId,
                    receipt.machineId,
                    receipt.checkpointIndex,
                    receipt.steps,
                    keccak256(bytes(receipt.checkpointCid)),
                    receipt.coreSeconds
                )
            )
        );
    }

    function DOMAIN_SEPARATOR() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    // ---------------------------------------------------------------- internal

    function _submit(address borrower, JobRequest calldata request) private returns (uint256 jobId) {
        if (bytes(request.bundleCid).length == 0) revert MarketInvalidRequest("bundleCid", 0);
        if (request.budget == 0) revert MarketInvalidRequest("budget", 0);
        if (request.workers == 0 || request.workers > MAX_WORKERS) revert MarketInvalidRequest("workers", request.workers);
        if (request.jobDeadline <= block.timestamp) revert MarketInvalidRequest("jobDeadline", request.jobDeadline);

        jobId = ++jobCount;
        Job storage job = _jobs[jobId];
        job.borrower = borrower;
        job.status = JobStatus.Queued;
        job.workers = request.workers;
        job.minCores = request.minCores;
        job.minMemoryMib = request.minMemoryMib;
        job.deadline = request.jobDeadline;
        job.budget = request.budget;
        job.escrow = request.budget;
        job.maxPricePerCoreHour = request.maxPricePerCoreHour;
        job.bundleCid = request.bundleCid;
        totalEscrowed += request.budget;
        emit JobSubmitted(jobId, borrower, request.budget, request.workers, request.jobDeadline, request.bundleCid);
        token.safeTransferFrom(borrower, address(this), request.budget);
    }

    /// @dev Checks every assignment rule for one machine, locks it and returns its worker record.
    function _takeMachine(uint256 jobId, Job storage job, uint256 machineId) private returns (Worker memory) {
        MachineRegistry.Machine memory machine = registry.getMachine(machineId);
        if (!registry.isAvailable(machineId, block.timestamp)) revert MarketMachineUnavailable(machineId, block.timestamp);
        if (machine.lender == job.borrower) revert MarketMachineOwnedByBorrower(machineId, job.borrower);
        if (machine.spec.cores < job.minCores || machine.spec.memoryMib < job.minMemoryMib) {
            revert MarketMachineTooSmall(machineId, machine.spec.cores, machine.spec.memoryMib);
        }
        if (machine.spec.pricePerCoreHour > job.maxPricePerCoreHour) {
            revert MarketPriceAboveCap(machineId, machine.spec.pricePerCoreHour, job.maxPricePerCoreHour);
        }
        if (machine.stake < minStake) revert MarketStakeTooLow(machineId, machine.stake, minStake);
        registry.lock(machineId, jobId); // reverts RegistryMachineLocked if busy
        return Worker({
            machineId: machineId,
            lender: machine.lender,
            pricePerCoreHour: machine.spec.pricePerCoreHour,
            cores: machine.spec.cores,
            since: uint64(block.timestamp),
            active: true
        });
    }

    /// @dev Split out of {recordProof} to stay within the EVM stack limit.
    function _emitProofRecorded(WorkReceipt calldata receipt, address lender, uint256 payment) private {
        emit ProofRecorded(
            receipt.jobId,
            receipt.machineId,
            lender,
            receipt.checkpointIndex,
            receipt.steps,
            receipt.coreSeconds,
            payment,
            receipt.checkpointCid
        );
    }

    /// @dev Moves one proved interval's pay from the job's escrow to the lender and books core-seconds.
    function _payInterval(Job storage job, Worker storage worker, WorkReceipt calldata receipt)
        private
        returns (uint256 payment)
    {
        uint256 allowed = uint256(worker.cores) * (block.timestamp - worker.since);
        if (receipt.coreSeconds > allowed) {
            revert MarketCoreSecondsTooHigh(receipt.jobId, receipt.machineId, receipt.coreSeconds, allowed);
        }
        payment = receipt.coreSeconds * worker.pricePerCoreHour / 3600;
        if (payment > job.escrow) revert MarketBudgetExhausted(receipt.jobId, payment, job.escrow);

        worker.since = uint64(block.timestamp);
        job.lastProgressAt = uint64(block.timestamp);
        job.escrow -= payment;
        job.paid += payment;
        totalEscrowed -= payment;
        _credit(worker.lender, payment);
        lentCoreSeconds[worker.lender] += receipt.coreSeconds;
        borrowedCoreSeconds[job.borrower] += receipt.coreSeconds;
    }

    function _checkCheckpointCid(uint32 slot, WorkReceipt calldata receipt) private {
        uint256 jobId = receipt.jobId;
        bytes32 cidHash = keccak256(bytes(receipt.checkpointCid));
        bytes32 published = checkpointCidHash[jobId][receipt.checkpointIndex];
        if (slot == 0) {
            // A restarted chief may prove an index again from another machine only with the same CID.
            if (published != bytes32(0) && published != cidHash) {
                revert MarketCheckpointMismatch(jobId, receipt.checkpointIndex);
            }
            checkpointCidHash[jobId][receipt.checkpointIndex] = cidHash;
        } else {
            if (published == bytes32(0)) revert MarketCheckpointNotPublished(jobId, receipt.checkpointIndex);
            if (published != cidHash) revert MarketCheckpointMismatch(jobId, receipt.checkpointIndex);
        }
    }

    function _checkCallerIsWorker(uint256 jobId, uint256 machineId) private view returns (uint32 round) {
        Job storage job = _existingJob(jobId);
        if (job.status != JobStatus.Running) revert MarketInvalidJobStatus(jobId, job.status);
        uint32 slot = _activeSlot(jobId, machineId);
        if (_workers[jobId][slot].lender != msg.sender) revert MarketCallerNotLender(machineId, msg.sender);
        return job.round;
    }

    function _hasVacancy(uint256 jobId) private view returns (bool) {
        Worker[] storage workers = _workers[jobId];
        for (uint256 slot = 0; slot < workers.length; slot++) {
            if (!workers[slot].active) return true;
        }
        return false;
    }

    function _activeSlot(uint256 jobId, uint256 machineId) private view returns (uint32) {
        Worker[] storage workers = _workers[jobId];
        for (uint256 slot = 0; slot < workers.length; slot++) {
            if (workers[slot].machineId == machineId && workers[slot].active) return uint32(slot);
        }
        revert MarketWorkerNotActive(jobId, machineId);
    }

    function _slashAndRelease(uint256 jobId, Job storage job, Worker storage worker) private returns (uint256 slashed) {
        worker.active = false;
        uint256 stake = registry.getMachine(worker.machineId).stake;
        slashed = registry.slash(worker.machineId, jobId, stake * slashBps / BPS, address(this));
        registry.release(worker.machineId, jobId);
        _credit(job.borrower, slashed);
    }

    function _releaseActive(uint256 jobId) private {
        Worker[] storage workers = _workers[jobId];
        for (uint256 slot = 0; slot < workers.length; slot++) {
            if (workers[slot].active) {
                workers[slot].active = false;
                registry.release(workers[slot].machineId, jobId);
            }
        }
    }

    function _refundEscrow(Job storage job) private returns (uint256 refund) {
        refund = job.escrow;
        job.escrow = 0;
        totalEscrowed -= refund;
        _credit(job.borrower, refund);
    }

    function _credit(address account, uint256 amount) private {
        if (amount == 0) return;
        withdrawable[account] += amount;
        totalWithdrawable += amount;
    }

    function _existingJob(uint256 jobId) private view returns (Job storage job) {
        job = _jobs[jobId];
        if (job.status == JobStatus.None) revert MarketJobNotFound(jobId);
    }

    function _setParameters(uint256 minStake_, uint256 slashBps_, uint256 proofTimeout_) private {
        if (slashBps_ > BPS) revert MarketInvalidParameter("slashBps", slashBps_);
        if (proofTimeout_ == 0) revert MarketInvalidParameter("proofTimeout", proofTimeout_);
        minStake = minStake_;
        slashBps = slashBps_;
        proofTimeout = proofTimeout_;
        emit ParametersUpdated(minStake_, slashBps_, proofTimeout_);
    }
}
