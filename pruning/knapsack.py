"""Exact multiple-choice knapsack over per-sub-network pruning candidates: pick one candidate per sub-network to minimise the summed impairment under a FLOPs-saving floor.

Every sub-network k offers candidates ``candidates[k]``; a joint scheme picks one index per
sub-network, and its predicted impairment and saving are the sums over the picked candidates.

Chains. Sub-networks form a chain: sub-network k reads the boundary feature k-1 and writes boundary
k. When boundary widths are searched too, each candidate names the width option of the boundary it
reads (``inputs``) and of the one it writes (``outputs``), and a joint scheme is valid only when
every candidate reads the width its predecessor writes; the network's input has the one option 0,
and the last boundary takes whatever the last candidate writes (the caller counts the head's
change in that candidate's saving, and offers only widths the head can read).
Candidates that leave both at 0 (the default) make every combination valid: the plain
multiple-choice knapsack. The fronts below are then kept per boundary option (a dynamic programme
over the chain whose state is the boundary's width option and the partial saving), so the chain
costs no more than a factor of the number of width options.

Exactness. Savings are Python ints and are summed exactly (no bucketing by FLOPs). Impairments
are floats, but every float is a dyadic rational, so they are scaled by one common power of two to
Python ints and summed and compared *exactly* as well; the ``impairment`` reported in a
`Combination` is the correctly rounded float of the exact sum (the value ``math.fsum`` gives).
So results, including ties, do not depend on the order of floating-point additions.

Order. Combinations are ranked by impairment ascending, then saving descending, then the choice
tuple lexicographically ascending; this makes every result deterministic.

Method. The Pareto front of a set of sub-networks (non-dominated (saving, impairment) sums: a
sum is dominated when another one has >= saving and <= impairment, one of them strictly) is built
one sub-network at a time from the front of the remaining ones: combine every front point with
every candidate, then filter (a sort and a sweep). Dropping a dominated partial sum is safe,
because adding the same completion to both partial sums keeps the domination, and among equal
partial sums the lexicographically smallest choice is kept, which keeps the tie order exact.
With F the largest intermediate front size, m the largest number of candidates and K the number of
sub-networks this costs O(K * F * m * log(F * m)) time and O(F * K) memory. F is at most the number
of distinct partial savings (and of distinct partial impairments), in practice far below the product
of the candidate counts: about 1,100 for K=8, m=60 on random data (~0.1 s), fewer when impairments
are measured accuracies on a finite validation set. The problem is NP-hard, so the worst case stays
exponential: F reaches the product of the candidate counts when every impairment is exactly
proportional to its saving.
"""

from __future__ import annotations

import heapq
import math
import operator
from bisect import bisect_left
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

__all__ = ["Candidate", "Combination", "joint_front", "solve", "top_combinations"]


@dataclass(frozen=True)
class Candidate:
    """One pruning option of one sub-network.

    `impairment`: accuracy lost when only this sub-network is replaced (finite float, may be negative);
    `saving`: FLOPs removed (int >= 0); `key`: optional label the caller uses to find the option again;
    `inputs`, `outputs`: width options (ints >= 0) of the boundaries it reads and writes (see Chains).
    """

    impairment: float
    saving: int
    key: Hashable | None = None
    inputs: int = 0
    outputs: int = 0

    def __post_init__(self) -> None:
        for name in ("inputs", "outputs"):
            value = getattr(self, name)
            try:
                option = operator.index(value)
            except TypeError:
                option = -1
            if isinstance(value, bool) or option < 0:
                raise ValueError(f"candidate {name} must be a width option (an int >= 0), got {value!r}")
            object.__setattr__(self, name, int(option))
        impairment = float(self.impairment)
        if not math.isfinite(impairment):
            raise ValueError(f"candidate impairment must be finite, got {self.impairment!r}")
        try:
            saving = operator.index(self.saving)
        except TypeError:
            raise ValueError(f"candidate saving must be an integer, got {self.saving!r}") from None
        if saving < 0:
            raise ValueError(f"candidate saving must be >= 0, got {saving}")
        object.__setattr__(self, "impairment", impairment)
        object.__setattr__(self, "saving", int(saving))


@dataclass(frozen=True)
class Combination:
    """A joint scheme: `choice[k]` is the index of the candidate picked for sub-network k;
    `impairment` and `saving` are the sums over the picked candidates."""

    choice: tuple[int, ...]
    impairment: float
    saving: int


# A front point: (saving, exact scaled impairment, choice tuple).
_Point = tuple[int, int, tuple[int, ...]]
_END: list[_Point] = [(0, 0, ())]  # the front past the last sub-network, whatever the last boundary's width


class _Tables:
    """The candidate table with impairments scaled to exact ints (impairment = imp / 2**shift)."""

    def __init__(self, candidates: Sequence[Sequence[Candidate]]) -> None:
        ratios: list[list[tuple[int, int]]] = []
        savings: list[list[int]] = []
        self.inputs: list[list[int]] = []
        self.outputs: list[list[int]] = []
        for k, options in enumerate(candidates):
            options = list(options)
            if not options:
                raise ValueError(f"sub-network {k} has no candidates; give it at least one (e.g. 'keep unpruned')")
            row_r, row_s = [], []
            self.inputs.append([c.inputs for c in options])
            self.outputs.append([c.outputs for c in options])
            for j, c in enumerate(options):
                imp = float(c.impairment)
                if not math.isfinite(imp):
                    raise ValueError(f"candidate {j} of sub-network {k}: impairment must be finite, got {c.impairment!r}")
                try:
                    sav = operator.index(c.saving)
                except TypeError:
                    raise ValueError(f"candidate {j} of sub-network {k}: saving must be an integer, got {c.saving!r}") from None
                if sav < 0:
                    raise ValueError(f"candidate {j} of sub-network {k}: saving must be >= 0, got {sav}")
                row_r.append(imp.as_integer_ratio())  # denominator is a power of two
                row_s.append(int(sav))
            ratios.append(row_r)
            savings.append(row_s)
        self.shift = max((d.bit_length() - 1 for row in ratios for _, d in row), default=0)
        self.imps = [[n << (self.shift - (d.bit_length() - 1)) for n, d in row] for row in ratios]
        self.savings = savings
        self.k = len(savings)

    def to_float(self, imp: int) -> float:
        return imp / (1 << self.shift)  # int / int is correctly rounded

    def combination(self, choice: tuple[int, ...], imp: int, saving: int) -> Combination:
        return Combination(choice=choice, impairment=self.to_float(imp), saving=saving)

    def suffix_fronts(self) -> list[dict[int, list[_Point]]]:
        """fronts[k][w]: Pareto front of sub-networks k..K-1 when sub-network k reads width option w,
        saving (and impairment) strictly ascending; fronts[K] is empty (read it through `front`)."""
        fronts: list[dict[int, list[_Point]]] = [{} for _ in range(self.k + 1)]
        for k in range(self.k - 1, -1, -1):
            for w in sorted(set(self.inputs[k])):
                merged = [
                    (s + sav, i + imp, (j,) + ch)
                    for j, (imp, sav) in enumerate(zip(self.imps[k], self.savings[k]))
                    if self.inputs[k][j] == w
                    for s, i, ch in self.front(fronts, k + 1, self.outputs[k][j])
                ]
                if merged:
                    fronts[k][w] = _pareto(merged)
        return fronts

    def front(self, fronts: list[dict[int, list[_Point]]], k: int, w: int) -> list[_Point]:
        """The front of sub-networks k.. reading width option w (empty when no valid completion)."""
        return _END if k == self.k else fronts[k].get(w, [])


def _pareto(points: list[_Point]) -> list[_Point]:
    """Non-dominated points, one per (saving, impairment) pair (the lexicographically smallest choice),
    sorted by saving ascending; impairment then ascends strictly too."""
    points.sort(key=lambda p: (-p[0], p[1], p[2]))
    out: list[_Point] = []
    for p in points:
        if not out or p[1] < out[-1][1]:
            out.append(p)
    out.reverse()
    return out


def _infeasible(min_saving: int, front: list[_Point]) -> ValueError:
    if not front:
        return ValueError(
            "no combination is valid: no chain of candidates reads the width option its predecessor writes "
            "(the first sub-network must read option 0)"
        )
    reachable = front[-1][0]
    return ValueError(
        f"no combination reaches min_saving={min_saving}: the maximum reachable saving is {reachable} (short by {min_saving - reachable})"
    )


def joint_front(candidates: Sequence[Sequence[Candidate]]) -> list[Combination]:
    """The Pareto front of whole-network schemes: minimise total impairment, maximise total saving.

    One combination per non-dominated (saving, impairment) point (the lexicographically smallest
    choice), sorted by saving ascending, so impairment ascends strictly too; for any target the best
    scheme is the first entry whose saving reaches it. Cost: see the module docstring.

    >>> front = joint_front([[Candidate(0.0, 0), Candidate(0.5, 100)], [Candidate(0.0, 0), Candidate(0.2, 60)]])
    >>> [(c.choice, c.saving) for c in front]
    [((0, 0), 0), ((0, 1), 60), ((1, 0), 100), ((1, 1), 160)]
    """
    tables = _Tables(candidates)
    return [tables.combination(ch, i, s) for s, i, ch in tables.front(tables.suffix_fronts(), 0, 0)]


def solve(candidates: Sequence[Sequence[Candidate]], min_saving: int) -> Combination:
    """The exact optimum: the combination of least total impairment whose total saving is >= min_saving.

    Ties go to the larger saving, then to the lexicographically smallest choice tuple. Raises
    ValueError when no combination reaches min_saving or a sub-network has no candidates.
    Cost: one Pareto-front construction (see the module docstring) plus a binary search.

    >>> solve([[Candidate(0.0, 0), Candidate(0.5, 100)], [Candidate(0.0, 0), Candidate(0.2, 60)]], 50)
    Combination(choice=(0, 1), impairment=0.2, saving=60)
    """
    min_saving = operator.index(min_saving)
    tables = _Tables(candidates)
    front = tables.front(tables.suffix_fronts(), 0, 0)
    # Impairment rises strictly with saving along the front, so the first feasible point is optimal,
    # and no other combination has its impairment with a larger saving.
    j = bisect_left([s for s, _, _ in front], min_saving)
    if j == len(front):
        raise _infeasible(min_saving, front)
    s, i, ch = front[j]
    return tables.combination(ch, i, s)


def top_combinations(candidates: Sequence[Sequence[Candidate]], min_saving: int, t: int) -> list[Combination]:
    """The t feasible combinations (total saving >= min_saving) of least total impairment, exactly.

    Sorted by impairment ascending, then saving descending, then choice; fewer than t when fewer
    combinations are feasible. Raises ValueError when none is feasible (as `solve` does), so
    ``top_combinations(c, s, 1)[0] == solve(c, s)``.

    Method: best-first search over choice prefixes. A prefix's priority is its exact best
    completion, read off the Pareto front of the remaining sub-networks by a binary search (least
    impairment among suffix sums with saving >= what is still missing), so the heuristic is exact:
    only ancestors of the returned combinations are expanded. Cost: the suffix fronts (see the
    module docstring) plus O(t * K * m * log(F * t * K * m)) for the search.

    >>> table = [[Candidate(0.0, 0), Candidate(0.5, 100)], [Candidate(0.0, 0), Candidate(0.2, 60)]]
    >>> [(c.choice, c.impairment) for c in top_combinations(table, 50, 3)]
    [((0, 1), 0.2), ((1, 0), 0.5), ((1, 1), 0.7)]
    """
    min_saving = operator.index(min_saving)
    t = operator.index(t)
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    tables = _Tables(candidates)
    fronts = tables.suffix_fronts()
    front_savings: dict[tuple[int, int], list[int]] = {}

    def best_completion(k: int, w: int, missing: int) -> tuple[int, int] | None:
        """(impairment, saving) of the best completion of sub-networks k.., reading width option w, that
        saves >= missing."""
        front = tables.front(fronts, k, w)
        savings = front_savings.get((k, w))
        if savings is None:
            savings = front_savings[(k, w)] = [s for s, _, _ in front]
        j = bisect_left(savings, missing)
        if j == len(savings):
            return None
        s, i, _ = front[j]
        return i, s

    root = best_completion(0, 0, min_saving)
    if root is None:
        raise _infeasible(min_saving, tables.front(fronts, 0, 0))
    K = tables.k
    out: list[Combination] = []
    # Heap entries: (impairment bound, -saving bound, prefix, prefix saving, prefix impairment, width option
    # the next sub-network reads). Each bound is that of the best completion, so a prefix never sorts after
    # any of its completions.
    heap: list[tuple[int, int, tuple[int, ...], int, int, int]] = [(root[0], -root[1], (), 0, 0, 0)]  # impairments in integer units
    while heap and len(out) < t:
        _, _, prefix, s, i, w = heapq.heappop(heap)
        k = len(prefix)
        if k == K:
            out.append(tables.combination(prefix, i, s))
            continue
        for j, (imp, sav) in enumerate(zip(tables.imps[k], tables.savings[k])):
            if tables.inputs[k][j] != w:
                continue
            s2, i2 = s + sav, i + imp
            best = best_completion(k + 1, tables.outputs[k][j], min_saving - s2)
            if best is not None:
                heapq.heappush(heap, (i2 + best[0], -(s2 + best[1]), prefix + (j,), s2, i2, tables.outputs[k][j]))
    return out
