"""Stateful property test: every credit stays accounted for across random market histories.

Hypothesis drives random sequences of lender, borrower, coordinator and anyone actions
against the deployed contracts, keeps a Python model of what each action must do, and after
every step checks on chain that

* token.balanceOf(market) == totalEscrowed + totalWithdrawable,
* token.balanceOf(registry) == totalStaked,
* the balances of every account plus market and registry == totalSupply == all credits minted
  (a ghost total kept by the test),

and that escrow, stakes and withdrawable credits match the model.
"""

from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import pytest
from brownie import chain, web3
from contract_support import (
    BPS,
    CREDIT,
    MIN_STAKE,
    PRICE_PER_CORE_HOUR,
    PROOF_TIMEOUT,
    SLASH_BPS,
    JobStatus,
    job_request,
    latest_timestamp,
    machine_spec,
    request_tuple,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

MAX_EXAMPLES = 50
STEPS_PER_EXAMPLE = 20
# Seconds kept between the latest block and a job deadline before assigning, so the
# transaction cannot land past the deadline while the test checks invariants.
DEADLINE_MARGIN_S = 30
UNLIMITED = 2**256 - 1


@dataclass
class MachineModel:
    lender: object
    cores: int
    price: int
    stake: int
    locked_by: int = 0


@dataclass
class WorkerModel:
    machine_id: int
    since: int
    active: bool = True


@dataclass
class JobModel:
    borrower: object
    workers: int
    min_cores: int
    max_price: int
    deadline: int
    escrow: int
    status: JobStatus = JobStatus.QUEUED
    last_progress: int = 0
    slots: list = field(default_factory=list)
    chief_index: int = 0  # highest checkpoint index the chief published

    def has_vacancy(self):
        return any(not worker.active for worker in self.slots)


class CreditConservation(RuleBasedStateMachine):
    """Random market histories; `env` (contracts, accounts, signing helpers) is set by the test."""

    env = None
    # Contract functions called across all examples of a run, checked by the test afterwards.
    calls = Counter()

    def __init__(self):
        super().__init__()
        chain.revert()
        seed = self.env.seed
        self.now = latest_timestamp()
        self.minted = seed.minted
        self.machines = {machine_id: replace(machine) for machine_id, machine in seed.machines.items()}
        self.jobs = {
            job_id: replace(job, slots=[replace(worker) for worker in job.slots])
            for job_id, job in seed.jobs.items()
        }
        self.withdrawable = defaultdict(int)
        self.nonces = defaultdict(int)
        self.last_index = defaultdict(int)  # (job id, machine id) -> last proved checkpoint index

    # ---------------------------------------------------------------- helpers

    def _sent(self, tx):
        self.now = max(self.now, tx.timestamp)
        type(self).calls[tx.fn_name.split(".")[-1]] += 1
        return tx

    def _ensure_balance(self, account, amount):
        missing = amount - self.env.token.balanceOf(account)
        if missing > 0:
            self._sent(self.env.token.mint(account, missing, "top-up", {"from": self.env.admin}))
            self.minted += missing

    def _eligible_machines(self, job):
        return [
            machine_id
            for machine_id, machine in sorted(self.machines.items())
            if machine.locked_by == 0
            and machine.stake >= MIN_STAKE
            and machine.price <= job.max_price
            and machine.cores >= job.min_cores
        ]

    def _jobs_with(self, *statuses):
        return [job_id for job_id, job in sorted(self.jobs.items()) if job.status in statuses]

    def _assignable_jobs(self):
        return [
            job_id
            for job_id in self._jobs_with(JobStatus.QUEUED)
            if self.now + DEADLINE_MARGIN_S < self.jobs[job_id].deadline
            and len(self._eligible_machines(self.jobs[job_id])) >= self.jobs[job_id].workers
        ]

    def _active_slots(self):
        return [
            (job_id, slot)
            for job_id in self._jobs_with(JobStatus.RUNNING)
            for slot, worker in enumerate(self.jobs[job_id].slots)
            if worker.active
        ]

    def _provable_slots(self):
        """Active slots with a checkpoint index they may prove: the chief's next one, or the chief's latest."""
        provable = []
        for job_id, slot in self._active_slots():
            job = self.jobs[job_id]
            machine_id = job.slots[slot].machine_id
            if slot == 0 or job.chief_index > self.last_index[(job_id, machine_id)]:
                provable.append((job_id, slot))
        return provable

    def _vacant_slots(self):
        return [
            (job_id, slot)
            for job_id in self._jobs_with(JobStatus.RUNNING)
            if self.now + DEADLINE_MARGIN_S < self.jobs[job_id].deadline
            for slot, worker in enumerate(self.jobs[job_id].slots)
            if not worker.active and self._eligible_machines(self.jobs[job_id])
        ]

    def _restartable_jobs(self):
        return [
            job_id
            for job_id in self._jobs_with(JobStatus.RUNNING)
            if not self.jobs[job_id].has_vacancy()
            and self.now + DEADLINE_MARGIN_S < self.jobs[job_id].deadline
        ]

    def _expirable_jobs(self):
        expirable = []
        for job_id in self._jobs_with(JobStatus.QUEUED, JobStatus.RUNNING):
            job = self.jobs[job_id]
            past_deadline = self.now > job.deadline
            stalled = (
                job.status == JobStatus.RUNNING
                and not job.has_vacancy()
                and self.now > job.last_progress + PROOF_TIMEOUT
            )
            if past_deadline or stalled:
                expirable.append(job_id)
        return expirable

    def _release(self, worker):
        worker.active = False
        self.machines[worker.machine_id].locked_by = 0

    def _slash(self, job, worker):
        machine = self.machines[worker.machine_id]
        slashed = machine.stake * SLASH_BPS // BPS
        machine.stake -= slashed
        self.withdrawable[job.borrower] += slashed
        return slashed

    def _refund(self, job):
        refund = job.escrow
        self.withdrawable[job.borrower] += refund
        job.escrow = 0
        return refund

    def _checkpoint_cid(self, job_id, index):
        return f"bafyckpt-{job_id}-{index}"

    # ---------------------------------------------------------------- lender and token rules

    @rule(participant=st.integers(0, 4), amount=st.integers(1, 1_000 * CREDIT))
    def mint(self, participant, amount):
        account = self.env.participants[participant]
        self._sent(self.env.token.mint(account, amount, "grant", {"from": self.env.admin}))
        self.minted += amount

    @rule(
        lender=st.integers(0, 2),
        cores=st.sampled_from([1, 4, 8]),
        price=st.sampled_from([0, 10**12, PRICE_PER_CORE_HOUR]),
        stake=st.sampled_from([0, MIN_STAKE // 2, MIN_STAKE, 2 * MIN_STAKE]),
    )
    def register_machine(self, lender, cores, price, stake):
        account = self.env.lenders[lender]
        self._ensure_balance(account, stake)
        tx = self._sent(
            self.env.registry.registerMachine(
                machine_spec(cores=cores, pricePerCoreHour=price), stake, {"from": account}
            )
        )
        machine_id = tx.events["MachineRegistered"]["machineId"]
        assert machine_id == len(self.machines) + 1
        self.machines[machine_id] = MachineModel(lender=account, cores=cores, price=price, stake=stake)

    @precondition(lambda self: self.machines)
    @rule(data=st.data(), amount=st.sampled_from([1, MIN_STAKE // 2, MIN_STAKE]))
    def add_stake(self, data, amount):
        machine_id = data.draw(st.sampled_from(sorted(self.machines)), label="machine")
        machine = self.machines[machine_id]
        self._ensure_balance(machine.lender, amount)
        self._sent(self.env.registry.addStake(machine_id, amount, {"from": machine.lender}))
        machine.stake += amount

    @precondition(lambda self: any(m.locked_by == 0 and m.stake > 0 for m in self.machines.values()))
    @rule(data=st.data())
    def withdraw_stake(self, data):
        candidates = [i for i, m in sorted(self.machines.items()) if m.locked_by == 0 and m.stake > 0]
        machine_id = data.draw(st.sampled_from(candidates), label="machine")
        machine = self.machines[machine_id]
        amount = data.draw(st.integers(1, machine.stake), label="amount")
        self._sent(self.env.registry.withdrawStake(machine_id, amount, {"from": machine.lender}))
        machine.stake -= amount

    # ---------------------------------------------------------------- borrower rules

    @rule(
        borrower=st.integers(0, 1),
        budget=st.integers(1, 50 * CREDIT),
        workers=st.integers(1, 2),
        min_cores=st.sampled_from([1, 4]),
        max_price=st.sampled_from([10**12, PRICE_PER_CORE_HOUR]),
        lifetime=st.sampled_from([600, 2 * PROOF_TIMEOUT, 3 * 24 * 3600]),
        signed=st.booleans(),
    )
    def submit_job(self, borrower, budget, workers, min_cores, max_price, lifetime, signed):
        account = self.env.borrowers[borrower]
        self._ensure_balance(account, budget)
        deadline = self.now + lifetime
        request = job_request(
            budget=budget,
            workers=workers,
            minCores=min_cores,
            maxPricePerCoreHour=max_price,
            jobDeadline=deadline,
        )
        if signed:
            order, signature, _ = self.env.sign_order(account, request, nonce=self.nonces[account])
            tx = self._sent(
                self.env.market.submitJobWithSignature(order, signature, {"from": self.env.relayer})
            )
            self.nonces[account] += 1
        else:
            tx = self._sent(self.env.market.submitJob(request_tuple(request), {"from": account}))
        job_id = tx.events["JobSubmitted"]["jobId"]
        assert job_id == len(self.jobs) + 1
        self.jobs[job_id] = JobModel(
            borrower=account,
            workers=workers,
            min_cores=min_cores,
            max_price=max_price,
            deadline=deadline,
            escrow=budget,
        )

    @precondition(lambda self: self._jobs_with(JobStatus.QUEUED))
    @rule(data=st.data())
    def cancel_job(self, data):
        job_id = data.draw(st.sampled_from(self._jobs_with(JobStatus.QUEUED)), label="job")
        job = self.jobs[job_id]
        tx = self._sent(self.env.market.cancelJob(job_id, {"from": job.borrower}))
        job.status = JobStatus.CANCELLED
        assert tx.events["JobCancelled"]["refund"] == self._refund(job)

    # ---------------------------------------------------------------- coordinator rules

    @precondition(lambda self: self._assignable_jobs())
    @rule(data=st.data())
    def assign_job(self, data):
        job_id = data.draw(st.sampled_from(self._assignable_jobs()), label="job")
        job = self.jobs[job_id]
        eligible = self._eligible_machines(job)
        chosen = data.draw(st.permutations(eligible), label="machines")[: job.workers]
        tx = self._sent(
            self.env.market.assignJob(job_id, chosen, "bafycluster", {"from": self.env.coordinator})
        )
        job.status = JobStatus.RUNNING
        job.last_progress = tx.timestamp
        job.slots = [WorkerModel(machine_id=machine_id, since=tx.timestamp) for machine_id in chosen]
        for machine_id in chosen:
            self.machines[machine_id].locked_by = job_id

    @precondition(lambda self: self._active_slots())
    @rule(data=st.data())
    def report_fault(self, data):
        job_id, slot = data.draw(st.sampled_from(self._active_slots()), label="slot")
        job = self.jobs[job_id]
        worker = job.slots[slot]
        tx = self._sent(
            self.env.market.reportFault(job_id, worker.machine_id, {"from": self.env.coordinator})
        )
        slashed = self._slash(job, worker)
        self._release(worker)
        assert tx.events["WorkerFaulted"]["slashed"] == slashed

    @precondition(lambda self: self._vacant_slots())
    @rule(data=st.data())
    def replace_worker(self, data):
        job_id, slot = data.draw(st.sampled_from(self._vacant_slots()), label="slot")
        job = self.jobs[job_id]
        machine_id = data.draw(st.sampled_from(self._eligible_machines(job)), label="machine")
        tx = self._sent(
            self.env.market.replaceWorker(
                job_id, slot, machine_id, "bafycluster", {"from": self.env.coordinator}
            )
        )
        job.slots[slot] = WorkerModel(machine_id=machine_id, since=tx.timestamp)
        job.last_progress = tx.timestamp
        self.machines[machine_id].locked_by = job_id

    @precondition(lambda self: self._restartable_jobs())
    @rule(data=st.data())
    def restart_cluster(self, data):
        job_id = data.draw(st.sampled_from(self._restartable_jobs()), label="job")
        tx = self._sent(
            self.env.market.restartCluster(job_id, "bafycluster-restart", {"from": self.env.coordinator})
        )
        self.jobs[job_id].last_progress = tx.timestamp

    @precondition(lambda self: self._jobs_with(JobStatus.RUNNING))
    @rule(data=st.data())
    def complete_job(self, data):
        job_id = data.draw(st.sampled_from(self._jobs_with(JobStatus.RUNNING)), label="job")
        job = self.jobs[job_id]
        tx = self._sent(self.env.market.completeJob(job_id, "bafyresult", {"from": self.env.coordinator}))
        job.status = JobStatus.COMPLETED
        for worker in job.slots:
            if worker.active:
                self._release(worker)
        assert tx.events["JobCompleted"]["refund"] == self._refund(job)

    @precondition(lambda self: self._jobs_with(JobStatus.QUEUED, JobStatus.RUNNING))
    @rule(data=st.data())
    def fail_job(self, data):
        job_id = data.draw(st.sampled_from(self._jobs_with(JobStatus.QUEUED, JobStatus.RUNNING)), label="job")
        job = self.jobs[job_id]
        tx = self._sent(self.env.market.failJob(job_id, "bundle failed", {"from": self.env.coordinator}))
        job.status = JobStatus.FAILED
        for worker in job.slots:
            if worker.active:
                self._release(worker)
        assert tx.events["JobFailed"]["refund"] == self._refund(job)

    # ---------------------------------------------------------------- lender rules on running jobs

    @precondition(lambda self: self._provable_slots())
    @rule(data=st.data(), share_percent=st.integers(0, 100))
    def record_proof(self, data, share_percent):
        job_id, slot = data.draw(st.sampled_from(self._provable_slots()), label="slot")
        job = self.jobs[job_id]
        worker = job.slots[slot]
        machine = self.machines[worker.machine_id]
        index = job.chief_index + 1 if slot == 0 else job.chief_index
        # The block will be no earlier than self.now, so this much is always within cores x elapsed.
        core_seconds = machine.cores * (self.now - worker.since) * share_percent // 100
        if machine.price:
            core_seconds = min(core_seconds, job.escrow * 3600 // machine.price)
        receipt, signature, _ = self.env.sign_receipt(
            machine.lender,
            job_id,
            worker.machine_id,
            index,
            core_seconds,
            self._checkpoint_cid(job_id, index),
        )
        tx = self._sent(self.env.market.recordProof(receipt, signature, {"from": self.env.relayer}))
        payment = core_seconds * machine.price // 3600
        assert tx.events["ProofRecorded"]["payment"] == payment
        job.escrow -= payment
        self.withdrawable[machine.lender] += payment
        worker.since = tx.timestamp
        job.last_progress = tx.timestamp
        self.last_index[(job_id, worker.machine_id)] = index
        if slot == 0:
            job.chief_index = index

    @precondition(lambda self: self._active_slots())
    @rule(data=st.data())
    def leave_job(self, data):
        job_id, slot = data.draw(st.sampled_from(self._active_slots()), label="slot")
        worker = self.jobs[job_id].slots[slot]
        lender = self.machines[worker.machine_id].lender
        self._sent(self.env.market.leaveJob(job_id, worker.machine_id, {"from": lender}))
        self._release(worker)

    # ---------------------------------------------------------------- anyone

    @rule(seconds=st.sampled_from([600, PROOF_TIMEOUT + 1, 2 * 24 * 3600]))
    def travel_in_time(self, seconds):
        chain.sleep(seconds)
        chain.mine()
        self.now = latest_timestamp()

    @precondition(lambda self: self._expirable_jobs())
    @rule(data=st.data())
    def expire_job(self, data):
        job_id = data.draw(st.sampled_from(self._expirable_jobs()), label="job")
        job = self.jobs[job_id]
        tx = self._sent(self.env.market.expireJob(job_id, {"from": self.env.relayer}))
        job.status = JobStatus.EXPIRED
        slashed_total = 0
        for worker in job.slots:
            if not worker.active:
                continue
            if tx.timestamp > worker.since + PROOF_TIMEOUT:
                slashed_total += self._slash(job, worker)
            self._release(worker)
        refund = self._refund(job)
        assert tx.events["JobExpired"]["refund"] == refund
        assert tx.events["JobExpired"]["slashed"] == slashed_total

    @precondition(lambda self: any(amount > 0 for amount in self.withdrawable.values()))
    @rule(data=st.data())
    def withdraw(self, data):
        account = data.draw(
            st.sampled_from([a for a in self.env.participants if self.withdrawable[a] > 0]), label="account"
        )
        tx = self._sent(self.env.market.withdraw({"from": account}))
        assert tx.events["Withdrawn"]["amount"] == self.withdrawable[account]
        self.withdrawable[account] = 0

    # ---------------------------------------------------------------- invariants

    @invariant()
    def credits_are_conserved(self):
        env = self.env
        token = env.w3_token.functions
        holders = [*env.holders, env.market.address, env.registry.address]
        with web3.batch_requests() as batch:
            for holder in holders:
                batch.add(token.balanceOf(holder))
            batch.add(token.totalSupply())
            batch.add(env.w3_market.functions.totalEscrowed())
            batch.add(env.w3_market.functions.totalWithdrawable())
            batch.add(env.w3_registry.functions.totalStaked())
            values = batch.execute()
        *balances, total_supply, total_escrowed, total_withdrawable, total_staked = values
        market_balance, registry_balance = balances[-2:]

        assert market_balance == total_escrowed + total_withdrawable
        assert registry_balance == total_staked
        assert sum(balances) == total_supply
        assert total_supply == self.minted
        assert total_escrowed == sum(job.escrow for job in self.jobs.values())
        assert total_withdrawable == sum(self.withdrawable.values())
        assert total_staked == sum(machine.stake for machine in self.machines.values())


# Machines every example starts with: (lender index, cores, price per core-hour, stake).
SEED_MACHINES = [
    (0, 8, PRICE_PER_CORE_HOUR, MIN_STAKE),
    (1, 4, 10**12, 2 * MIN_STAKE),
    (2, 8, 0, MIN_STAKE),
    (0, 1, PRICE_PER_CORE_HOUR, MIN_STAKE),
    (1, 8, PRICE_PER_CORE_HOUR, MIN_STAKE),
    (2, 4, PRICE_PER_CORE_HOUR, MIN_STAKE),
]
# Jobs every example starts with, so that short examples already reach every rule. Each is
# (borrower index, budget, lifetime in seconds, machine ids to assign); no machines means queued.
# STALE_SEED_JOBS are created one proof timeout before the others, so that every example
# starts with a queued job past its deadline and a running job that stalled.
STALE_SEED_JOBS = [
    (1, 10 * CREDIT, 600, []),
    (0, 10 * CREDIT, 3 * 24 * 3600, [4]),
]
FRESH_SEED_JOBS = [
    (0, 30 * CREDIT, 3 * 24 * 3600, []),
    (1, 20 * CREDIT, 2 * PROOF_TIMEOUT, [1, 2]),
    (0, 5 * CREDIT, 3 * 24 * 3600, [3]),
]
SEED_BORROWER_CREDITS = 200 * CREDIT


def _seed_job(env, seed, borrower_index, budget, lifetime, machine_ids):
    borrower = env.borrowers[borrower_index]
    deadline = latest_timestamp() + lifetime
    request = job_request(budget=budget, workers=max(1, len(machine_ids)), minCores=1, jobDeadline=deadline)
    tx = env.market.submitJob(request_tuple(request), {"from": borrower})
    job_id = tx.events["JobSubmitted"]["jobId"]
    job = JobModel(borrower, request["workers"], 1, request["maxPricePerCoreHour"], deadline, budget)
    seed.jobs[job_id] = job
    if machine_ids:
        tx = env.market.assignJob(job_id, machine_ids, "bafycluster", {"from": env.coordinator})
        job.status = JobStatus.RUNNING
        job.last_progress = tx.timestamp
        job.slots = [WorkerModel(machine_id, tx.timestamp) for machine_id in machine_ids]
        for machine_id in machine_ids:
            seed.machines[machine_id].locked_by = job_id


def _seed_market(env):
    """Register SEED_MACHINES and submit the seed jobs on chain; return the matching model."""
    seed = SimpleNamespace(machines={}, jobs={}, minted=0)
    for lender_index, cores, price, stake in SEED_MACHINES:
        lender = env.lenders[lender_index]
        env.token.mint(lender, stake, "stake", {"from": env.admin})
        seed.minted += stake
        tx = env.registry.registerMachine(
            machine_spec(cores=cores, pricePerCoreHour=price), stake, {"from": lender}
        )
        seed.machines[tx.events["MachineRegistered"]["machineId"]] = MachineModel(lender, cores, price, stake)
    for borrower in env.borrowers:
        env.token.mint(borrower, SEED_BORROWER_CREDITS, "grant", {"from": env.admin})
        seed.minted += SEED_BORROWER_CREDITS
    for job in STALE_SEED_JOBS:
        _seed_job(env, seed, *job)
    chain.sleep(PROOF_TIMEOUT + 1)
    chain.mine()
    for job in FRESH_SEED_JOBS:
        _seed_job(env, seed, *job)
    return seed


@pytest.fixture
def environment(
    token,
    registry,
    market,
    sign_order,
    sign_receipt,
    admin,
    coordinator,
    relayer,
    lender,
    lender2,
    lender3,
    borrower,
    borrower2,
):
    """Contracts, accounts and the seeded market state that every example starts from."""
    lenders = [lender, lender2, lender3]
    borrowers = [borrower, borrower2]
    for account in lenders + borrowers:
        token.approve(registry, UNLIMITED, {"from": account})
        token.approve(market, UNLIMITED, {"from": account})
    env = SimpleNamespace(
        token=token,
        registry=registry,
        market=market,
        w3_token=web3.eth.contract(address=token.address, abi=token.abi),
        w3_market=web3.eth.contract(address=market.address, abi=market.abi),
        w3_registry=web3.eth.contract(address=registry.address, abi=registry.abi),
        admin=admin,
        coordinator=coordinator,
        relayer=relayer,
        lenders=lenders,
        borrowers=borrowers,
        participants=lenders + borrowers,
        # Every account that takes part; no credit may end up anywhere else.
        holders=[account.address for account in [admin, coordinator, relayer, *lenders, *borrowers]],
        sign_order=sign_order,
        sign_receipt=sign_receipt,
    )
    env.seed = _seed_market(env)
    return env


# Every action the rules take; a run that never reached one of them tested less than it claims.
EXERCISED_FUNCTIONS = {
    "mint",
    "registerMachine",
    "addStake",
    "withdrawStake",
    "submitJob",
    "submitJobWithSignature",
    "cancelJob",
    "assignJob",
    "recordProof",
    "reportFault",
    "replaceWorker",
    "restartCluster",
    "leaveJob",
    "completeJob",
    "failJob",
    "expireJob",
    "withdraw",
}


def test_credits_are_conserved(environment):
    CreditConservation.env = environment
    CreditConservation.calls = Counter()
    chain.snapshot()

    run_state_machine_as_test(
        CreditConservation,
        settings=settings(
            max_examples=MAX_EXAMPLES,
            stateful_step_count=STEPS_PER_EXAMPLE,
            deadline=None,
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.filter_too_much,
                HealthCheck.data_too_large,
            ],
            # Examples are not saved between runs, so the run time does not depend on earlier
            # runs. A failure prints its steps and a blob for @reproduce_failure.
            database=None,
            print_blob=True,
        ),
    )

    missing = EXERCISED_FUNCTIONS - set(CreditConservation.calls)
    assert not missing, f"no example called {sorted(missing)}; calls made: {dict(CreditConservation.calls)}"
