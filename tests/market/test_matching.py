"""Machine selection and fair-share ordering."""

from deepmarket.market.machines import ALWAYS
from deepmarket.market.matching import JobNeeds, fair_share_order, rejection_reason, select_machines

NOW = 1_796_400_000
NEEDS = JobNeeds(job_id=1, borrower="0xB0", workers=2, min_cores=2, min_memory_mib=1024,
                 max_price_per_core_hour=10)


def machine(machine_id, lender, price=5, cores=4, memory=4096, mask=ALWAYS, stake=100, status=1, locked=0, score=0):
    return {"machine_id": machine_id, "lender": lender, "price_per_core_hour": price, "cores": cores,
            "memory_mib": memory, "availability_mask": mask, "stake": stake, "status": status,
            "locked_by": locked, "benchmark_score": score}


def test_picks_cheapest_machines():
    machines = [machine(1, "0xA1", price=9), machine(2, "0xA2", price=3), machine(3, "0xA3", price=5)]
    assert select_machines(NEEDS, machines, NOW, min_stake=10) == [2, 3]


def test_one_machine_per_lender():
    machines = [machine(1, "0xA1", price=1), machine(2, "0xA1", price=1), machine(3, "0xA3", price=9)]
    assert select_machines(NEEDS, machines, NOW, min_stake=10) == [1, 3]


def test_returns_none_when_too_few_qualify():
    machines = [machine(1, "0xA1"), machine(2, "0xA2", price=11)]
    assert select_machines(NEEDS, machines, NOW, min_stake=10) is None


def test_excluded_machines_are_skipped():
    machines = [machine(1, "0xA1"), machine(2, "0xA2"), machine(3, "0xA3")]
    assert select_machines(NEEDS, machines, NOW, min_stake=10, count=1, exclude=[1, 2]) == [3]


def test_rejection_reasons():
    cases = {
        "not active": machine(1, "0xA1", status=2),
        "busy with job 7": machine(1, "0xA1", locked=7),
        "outside its availability window": machine(1, "0xA1", mask=0),
        "owned by the borrower": machine(1, "0xB0"),
        "too small (1 cores, 4096 MiB)": machine(1, "0xA1", cores=1),
        "above the price cap": machine(1, "0xA1", price=11),
        "stake below the minimum": machine(1, "0xA1", stake=9),
    }
    for reason, candidate in cases.items():
        assert rejection_reason(candidate, NEEDS, NOW, min_stake=10) == reason
    assert rejection_reason(machine(1, "0xA1"), NEEDS, NOW, min_stake=10) is None


def test_fair_share_puts_net_lenders_first():
    jobs = [JobNeeds(1, "0xB1", 1, 1, 1, 1), JobNeeds(2, "0xB2", 1, 1, 1, 1), JobNeeds(3, "0xB3", 1, 1, 1, 1)]
    lent = {"0xB2": 500, "0xB3": 100}
    borrowed = {"0xB1": 50, "0xB3": 100}
    assert [j.job_id for j in fair_share_order(jobs, lent, borrowed)] == [2, 3, 1]
