"""pruning.knapsack against brute force (itertools.product over all joint schemes, exact Fraction sums)."""
from __future__ import annotations

import doctest
import math
import random
from fractions import Fraction
from itertools import product

import numpy as np
import pytest

from pruning import knapsack
from pruning.knapsack import Candidate, Combination, joint_front, solve, top_combinations

Table = list[list[Candidate]]


def random_table(rng: random.Random) -> Table:
    """K in 1..4, 1..6 candidates each; a mix of tie-prone discrete values, continuous values,
    negative impairments and FLOPs-sized savings."""
    tie_imps = [-0.2, -0.05, 0.0, 0.0, 0.05, 0.1, 0.2, 0.3, 0.1 + 0.2]
    tie_savings = [0, 0, 1, 2, 3, 5, 10**9, 2 * 10**9]
    table = []
    for _ in range(rng.randint(1, 4)):
        row = []
        for _ in range(rng.randint(1, 6)):
            imp = rng.choice(tie_imps) if rng.random() < 0.6 else rng.uniform(-0.1, 0.5)
            saving = rng.choice(tie_savings) if rng.random() < 0.6 else rng.randint(0, 3 * 10**9)
            row.append(Candidate(imp, saving))
        table.append(row)
    return table


def random_targets(rng: random.Random, table: Table) -> list[int]:
    top = sum(max(c.saving for c in row) for row in table)
    some = sum(rng.choice(row).saving for row in table)  # exactly reachable: a boundary case
    return [0, -3, some, top, top + 1, rng.randint(0, top + 1)]


def brute_force(table: Table) -> list[tuple[Fraction, int, tuple[int, ...]]]:
    """Every joint scheme as (exact impairment, saving, choice), in the module's order."""
    rows = [[(Fraction(c.impairment), c.saving) for c in row] for row in table]
    out = []
    for choice in product(*(range(len(row)) for row in rows)):
        links = [0] + [table[k][j].outputs for k, j in enumerate(choice)]  # the network input has width option 0
        if any(table[k][j].inputs != links[k] for k, j in enumerate(choice)):
            continue  # a candidate reads another width than its predecessor writes: not a network
        picked = [rows[k][j] for k, j in enumerate(choice)]
        out.append((sum((i for i, _ in picked), Fraction(0)), sum(s for _, s in picked), choice))
    out.sort(key=lambda r: (r[0], -r[1], r[2]))
    return out


def as_combination(row: tuple[Fraction, int, tuple[int, ...]]) -> Combination:
    return Combination(choice=row[2], impairment=float(row[0]), saving=row[1])


def test_solve_matches_brute_force():
    rng = random.Random(1234)
    checked = infeasible = 0
    for _ in range(200):
        table = random_table(rng)
        schemes = brute_force(table)
        for target in random_targets(rng, table):
            feasible = [r for r in schemes if r[1] >= target]
            if not feasible:
                with pytest.raises(ValueError, match=str(target)):
                    solve(table, target)
                infeasible += 1
                continue
            got = solve(table, target)
            assert got == as_combination(feasible[0])
            # the reported impairment is the correctly rounded exact sum, i.e. math.fsum of the picks
            assert got.impairment == math.fsum(table[k][j].impairment for k, j in enumerate(got.choice))
            checked += 1
    assert checked > 800 and infeasible > 100  # both branches well exercised


def test_solve_breaks_ties_by_saving_then_choice():
    table = [
        [Candidate(0.1, 5), Candidate(0.1, 5), Candidate(0.1, 7)],
        [Candidate(0.0, 0), Candidate(0.0, 0)],
    ]
    # all six schemes have impairment 0.1; the larger saving wins, then the smallest choice
    assert solve(table, 0) == Combination((2, 0), 0.1, 7)
    assert solve(table[:1] + [[Candidate(0.0, 3), Candidate(0.0, 3)]], 0) == Combination((2, 0), 0.1, 10)
    assert solve([[Candidate(0.1, 5), Candidate(0.1, 5)]], 5) == Combination((0,), 0.1, 5)


def test_impairments_are_summed_exactly():
    # Left-to-right float addition gives 1e16 + 1.0 - 1e16 == 0.0, which would tie with the all-zero
    # scheme and win it on saving; the exact sum is 1.0, so the zero-impairment scheme must win.
    table = [[Candidate(1e16, 0)], [Candidate(1.0, 10), Candidate(0.0, 0)], [Candidate(-1e16, 0)]]
    assert (1e16 + 1.0) + -1e16 == 0.0
    assert solve(table, 0) == Combination((0, 1, 0), 0.0, 0)
    assert top_combinations(table, 0, 5) == [Combination((0, 1, 0), 0.0, 0), Combination((0, 0, 0), 1.0, 10)]
    assert solve(table, 1) == Combination((0, 0, 0), 1.0, 10)


def test_top_combinations_matches_brute_force():
    rng = random.Random(99)
    lengths = []
    for _ in range(150):
        table = random_table(rng)
        schemes = brute_force(table)
        for target in random_targets(rng, table)[:4]:
            feasible = [as_combination(r) for r in schemes if r[1] >= target]
            t = rng.choice([1, 2, 3, 5, 10, 50])
            if not feasible:
                with pytest.raises(ValueError, match=str(target)):
                    top_combinations(table, target, t)
                continue
            got = top_combinations(table, target, t)
            assert got == feasible[:t]
            assert got[0] == solve(table, target)
            lengths.append(len(got) < t)
    assert any(lengths) and not all(lengths)  # both "t found" and "fewer than t exist" occur


def random_chain_table(rng: random.Random) -> Table:
    """`random_table` whose candidates also read and write boundary width options (0..2): the chain."""
    widths = [rng.randint(1, 3) for _ in range(5)]
    return [
        [Candidate(c.impairment, c.saving, inputs=rng.randrange(widths[k]), outputs=rng.randrange(widths[k + 1])) for c in row]
        for k, row in enumerate(random_table(rng))
    ]


def test_chain_matches_brute_force():
    """Boundary widths as genes: only chains where each candidate reads what its predecessor writes count."""
    rng = random.Random(2024)
    constrained = invalid = checked = 0
    for _ in range(300):
        table = random_chain_table(rng)
        schemes = brute_force(table)
        constrained += len(schemes) < math.prod(len(row) for row in table)
        if not schemes:
            for call in (lambda: solve(table, 0), lambda: top_combinations(table, 0, 3)):
                with pytest.raises(ValueError, match="no chain of candidates"):
                    call()
            assert joint_front(table) == []
            invalid += 1
            continue
        assert joint_front(table) == brute_front(table)
        for target in random_targets(rng, table)[:4]:
            feasible = [as_combination(r) for r in schemes if r[1] >= target]
            if not feasible:
                with pytest.raises(ValueError, match=f"min_saving={target}: the maximum reachable saving is {schemes and max(r[1] for r in schemes)}"):
                    solve(table, target)
                continue
            assert solve(table, target) == feasible[0]
            t = rng.choice([1, 3, 10])
            assert top_combinations(table, target, t) == feasible[:t]
            checked += 1
    assert constrained > 150 and invalid > 10 and checked > 300  # the chain binds, and all branches ran


def test_top_combinations_edge_cases():
    table = [[Candidate(0.0, 0), Candidate(0.3, 10)], [Candidate(0.0, 0), Candidate(0.1, 4)]]
    assert top_combinations(table, 0, 0) == []
    assert [c.choice for c in top_combinations(table, 0, 10)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [c.choice for c in top_combinations(table, 11, 10)] == [(1, 1)]
    with pytest.raises(ValueError, match="t must be >= 0"):
        top_combinations(table, 0, -1)
    with pytest.raises(ValueError, match="15"):
        top_combinations(table, 15, 3)


def brute_front(table: Table) -> list[Combination]:
    schemes = brute_force(table)  # sorted, so the first scheme at each point has the smallest choice
    points: dict[tuple[Fraction, int], tuple[Fraction, int, tuple[int, ...]]] = {}
    for r in schemes:
        points.setdefault((r[0], r[1]), r)
    front = [
        r for (i, s), r in points.items()
        if not any(s2 >= s and i2 <= i and (s2, i2) != (s, i) for (i2, s2) in points)
    ]
    return [as_combination(r) for r in sorted(front, key=lambda r: r[1])]


def test_joint_front_matches_brute_force():
    rng = random.Random(7)
    sizes = []
    for _ in range(150):
        table = random_table(rng)
        front = joint_front(table)
        assert front == brute_front(table)
        assert all(a.saving < b.saving and a.impairment < b.impairment for a, b in zip(front, front[1:]))
        sizes.append(len(front))
    assert max(sizes) >= 5  # non-trivial fronts were compared


def test_joint_front_serves_every_target():
    rng = random.Random(5)
    for _ in range(30):
        table = random_table(rng)
        front = joint_front(table)
        for target in random_targets(rng, table):
            reachable = [c for c in front if c.saving >= target]
            if reachable:
                assert reachable[0] == solve(table, target)


def test_infeasible_target_names_the_numbers():
    table = [[Candidate(0.0, 0), Candidate(0.4, 1_000_000_000)], [Candidate(0.0, 0), Candidate(0.2, 250)]]
    with pytest.raises(ValueError) as err:
        solve(table, 1_000_000_251)
    message = str(err.value)
    assert "1000000251" in message and "1000000250" in message  # asked for, and the maximum reachable
    assert solve(table, 1_000_000_250).choice == (1, 1)


def test_empty_candidate_lists():
    with pytest.raises(ValueError, match="sub-network 1 has no candidates"):
        solve([[Candidate(0.0, 0)], []], 0)
    with pytest.raises(ValueError, match="sub-network 0 has no candidates"):
        top_combinations([[]], 0, 3)
    with pytest.raises(ValueError, match="no candidates"):
        joint_front([[Candidate(0.0, 0)], []])
    # no sub-networks at all: the single empty scheme
    assert solve([], 0) == Combination((), 0.0, 0)
    assert joint_front([]) == [Combination((), 0.0, 0)]
    with pytest.raises(ValueError, match="min_saving=1"):
        solve([], 1)


def test_candidate_validation_and_coercion():
    c = Candidate(np.float32(0.25), np.int64(12), key="conv1@50%")
    assert type(c.impairment) is float and type(c.saving) is int and (c.impairment, c.saving) == (0.25, 12)
    assert c.key == "conv1@50%"
    for bad in [dict(impairment=float("nan"), saving=1), dict(impairment=math.inf, saving=1),
                dict(impairment=0.1, saving=-1), dict(impairment=0.1, saving=1.5)]:
        with pytest.raises(ValueError):
            Candidate(**bad)
    for bad in [dict(inputs=-1), dict(outputs=1.0), dict(inputs=True)]:
        with pytest.raises(ValueError, match="must be a width option"):
            Candidate(0.0, 0, **bad)


def test_performance_sized_instance_agrees_with_solve():
    """K=6, 40 candidates each (incl. 'keep unpruned'), t=20: far beyond brute force (40**6 schemes)."""
    rng = random.Random(2024)
    table = []
    for _ in range(6):
        row = [Candidate(0.0, 0)]
        for _ in range(39):
            saving = rng.randint(10**6, 2 * 10**9)
            row.append(Candidate(round(saving / 2e9 * 0.05 * rng.uniform(0.3, 2.0) - 0.002, 4), saving))
        table.append(row)
    target = sum(max(c.saving for c in row) for row in table) // 3
    top = top_combinations(table, target, 20)
    best = solve(table, target)
    assert len(top) == 20 and top[0] == best
    assert len({c.choice for c in top}) == 20
    # ranked by the exact impairment sum (two schemes may round to the same float)
    def exact_key(c: Combination) -> tuple[Fraction, int, tuple[int, ...]]:
        return sum((Fraction(table[k][j].impairment) for k, j in enumerate(c.choice)), Fraction(0)), -c.saving, c.choice

    keys = [exact_key(c) for c in top]
    assert keys == sorted(keys)
    for c in top:
        picked = [table[k][j] for k, j in enumerate(c.choice)]
        assert c.saving == sum(p.saving for p in picked) >= target
        assert c.impairment == math.fsum(p.impairment for p in picked) >= best.impairment
    # every Pareto-front scheme that is feasible and ranks before the 20th must be in the list
    last = keys[-1]
    must = [c for c in joint_front(table) if c.saving >= target and exact_key(c) <= last]
    assert must and all(c in top for c in must)
    # a lower target can never need more impairment
    assert solve(table, target // 2).impairment <= best.impairment


def test_docstring_examples():
    result = doctest.testmod(knapsack)
    assert result.attempted >= 4 and result.failed == 0
