"""Global performance impairment ranking: score each sub-network candidate inside the otherwise original
network, then join one candidate per sub-network into the scheme that loses least while meeting the target."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pruning.arrays import as_batch
from pruning.counting import count
from pruning.divide import SubNetwork
from pruning.knapsack import Candidate, Combination, joint_front, top_combinations

__all__ = [
    "JointScheme",
    "accuracy_with",
    "impairment_table",
    "joint_pareto",
    "joint_scheme",
    "merge_into",
    "min_saving_for",
    "paired_impairments",
    "rank",
    "required_saving",
]


@torch.no_grad()
def accuracy_with(
    subnetworks: Sequence[SubNetwork],
    head: nn.Module,
    replacements: dict[int, nn.Module],
    features: Sequence,
    labels,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> float:
    """Val accuracy of the network with sub-networks `replacements` (1-based k -> module) swapped in.

    Starts from the cached original feature X_{j-1} at the first replaced sub-network j, so the
    unchanged prefix is never recomputed."""
    first = min(replacements) if replacements else len(subnetworks) + 1
    start = first - 1  # index into features: X_{first-1}
    mods = [replacements.get(s.index, s.module).to(device).eval() for s in subnetworks[start:]]
    head = head.to(device).eval()
    y = as_batch(labels)
    correct = 0
    for i in range(0, len(y), batch_size):
        x = as_batch(features[start][i : i + batch_size]).to(device)
        for m in mods:
            x = m(x)
        correct += (head(x).argmax(1).cpu() == y[i : i + batch_size]).sum().item()
        count(len(x))
    return correct / max(1, len(y))


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def impairment_table(
    subnetworks: Sequence[SubNetwork],
    head: nn.Module,
    candidates: Sequence[Sequence[tuple[nn.Module, int]]],
    base_costs: Sequence[int],
    features: Sequence,
    labels,
    device: torch.device | str = "cpu",
    options: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> tuple[float, list[list[dict]]]:
    """acc(N) and, per sub-network, one row per candidate (module, cost): its accuracy with only that
    sub-network replaced, impairment = acc(N) - that, and the cost (FLOPs, params or predicted ns) it saves against
    `base_costs[k]`. Row 0 of every sub-network is 'keep it unpruned' (impairment 0, saving 0).
    `options[k][j]` = (inputs, outputs): the boundary width options candidate j reads and writes (default 0, 0);
    a candidate pruning a boundary is a BoundaryIO, so it fits between the original neighbours.

    Example (illustrative, not run)::

        base_acc, table = impairment_table(subs, head, [[(c, c_flops)] for c, c_flops in ...], [s.flops for s in subs], X_val, y_val)
        table[0][1]["impairment"]
    """
    base_acc = accuracy_with(subnetworks, head, {}, features, labels, device=device)
    table = []
    for sub, cands, base_cost in zip(subnetworks, candidates, base_costs):
        rows = [
            {
                "candidate": None,
                "val_acc": base_acc,
                "impairment": 0.0,
                "saving": 0,
                "cost": int(base_cost),
                "inputs": 0,
                "outputs": 0,
                "params": _params(sub.module),
            }
        ]
        for j, (module, cost) in enumerate(cands):
            acc = accuracy_with(subnetworks, head, {sub.index: module}, features, labels, device=device)
            inputs, outputs = options[sub.index - 1][j] if options is not None else (0, 0)
            rows.append(
                {
                    "candidate": j,
                    "val_acc": acc,
                    "impairment": base_acc - acc,
                    "saving": int(base_cost - cost),
                    "cost": int(cost),
                    "inputs": inputs,
                    "outputs": outputs,
                    "params": _params(module),
                }
            )
        table.append(rows)
    return base_acc, table


def paired_impairments(
    subnetworks: Sequence[SubNetwork],
    head: nn.Module,
    table: list[list[dict]],
    modules: Sequence[Sequence[nn.Module]],
    base_acc: float,
    features: Sequence,
    labels,
    device: torch.device | str = "cpu",
) -> int:
    """Score the candidates that narrow the boundary they write beside successors adapted to it (in place).

    Measured alone, such a candidate is followed by the *original* next sub-network, which reads zeros in the
    dropped channels: its impairment counts a loss that the next sub-network's candidates reading that width
    (trained on it) do not have. Here it is followed instead by its readers: the least-pruned next candidate that
    reads its width (one writing the full width when there is one), and so on down the chain while the reader
    also narrows what it writes, up to a reader writing the full width or the last sub-network. Its impairment
    becomes the loss of the candidate with its readers, measured jointly, minus the loss of the readers alone
    (after the original sub-network): what it adds to them. Along a chain of candidates that are each other's
    readers the impairments then add up to the chain's measured loss. The row keeps `impairment_alone`, and
    names `paired_with` (the readers' candidates, one per following sub-network) and `pair_val_acc`. A candidate
    no viable reader follows keeps its measurement. Returns the joint measurements made."""
    n = len(table)
    # viable[j]: candidate rows of sub-network j (0-based) a chain can continue after (to the end of the network)
    viable: list[set[int]] = [set() for _ in range(n)]
    viable[n - 1] = {i for i in range(len(table[n - 1]))}
    for j in range(n - 2, -1, -1):
        widths = {table[j + 1][i]["inputs"] for i in viable[j + 1]}
        viable[j] = {i for i, r in enumerate(table[j]) if r["outputs"] in widths}

    def readers(j: int, width: int) -> list[tuple[int, dict]] | None:
        chain: list[tuple[int, dict]] = []
        while j < n and width:
            rows = [table[j][i] for i in sorted(viable[j]) if i > 0 and table[j][i]["inputs"] == width]
            if not rows:
                return None
            full = [r for r in rows if r["outputs"] == 0]
            pick = max(full or rows, key=lambda r: (r["cost"], -r["candidate"]))  # the least pruned; first on ties
            chain.append((j, pick))
            width, j = pick["outputs"], j + 1
        return chain

    losses: dict[tuple, float] = {}

    def loss(chain: list[tuple[int, dict]]) -> float:
        key = tuple((j, r["candidate"]) for j, r in chain)
        if key not in losses:
            repl = {j + 1: modules[j][r["candidate"]] for j, r in chain}
            losses[key] = base_acc - accuracy_with(subnetworks, head, repl, features, labels, device=device)
        return losses[key]

    for k in range(n - 1):
        for row in table[k][1:]:
            chain = readers(k + 1, row["outputs"]) if row["outputs"] else None
            if not chain:
                continue
            joint = loss([(k, row), *chain])
            row.setdefault("impairment_alone", row["impairment"])
            row["impairment"] = joint - loss(chain)
            row["paired_with"] = [r["candidate"] for _, r in chain]
            row["pair_val_acc"] = base_acc - joint
    return len(losses)


@dataclass
class JointScheme:
    choice: tuple[int, ...]  # row per sub-network in the impairment table (0 = unpruned)
    predicted_acc: float
    measured_acc: float
    saving: int
    verified: list[dict]  # the top-T combinations measured jointly
    fallback: str | None = None  # what was done instead when no combination landed near the target
    chosen_by: str = ""  # prefer_capacity: how the choice was made, when not by val accuracy alone


def _candidates(table: list[list[dict]]) -> list[list[Candidate]]:
    return [[Candidate(r["impairment"], int(r["saving"]), None, r.get("inputs", 0), r.get("outputs", 0)) for r in rows] for rows in table]


def check_capacity_window(capacity_window: float) -> None:
    """A `prefer_capacity` window must be a positive number of standard errors; anything else fails by name."""
    if not capacity_window > 0:
        raise ValueError(f"capacity_window = {capacity_window!r}: allowed: a number of standard errors above 0")


def joint_scheme(
    subnetworks: Sequence[SubNetwork],
    head: nn.Module,
    table: list[list[dict]],
    modules: Sequence[Sequence[nn.Module]],
    base_acc: float,
    min_saving: int,
    top_t: int,
    features: Sequence,
    labels,
    device: torch.device | str = "cpu",
    max_saving: int | None = None,
    prefer_capacity: bool = False,
    capacity_window: float = 1.0,
) -> JointScheme:
    """Solve the multiple-choice knapsack exactly (least summed impairment with saving >= `min_saving`),
    measure the best `top_t` combinations with all their replacements at once (impairments do not add up
    exactly), and keep the most accurate one; at equal accuracy the one closest to the target.

    `max_saving` keeps the scheme near the target: measured impairments are noisy on a finite val set, and
    a much smaller network that ties on accuracy is not what was asked for. The combinations are taken in
    exact impairment order and those above `max_saving` skipped (searching the first 50 * top_t); if none
    falls inside, the unbounded best are used, and `fallback` says so.

    `prefer_capacity`: the verified combinations within `capacity_window` standard errors of the best measured
    accuracy (binomial, on the val labels) tie, and the one keeping the most parameters is taken (`chosen_by` says
    which and why)."""
    check_capacity_window(capacity_window)
    cands = _candidates(table)
    combos: list[Combination] = top_combinations(cands, min_saving, top_t if max_saving is None else 50 * top_t)
    fallback = None
    if max_saving is not None:
        inside = [c for c in combos if c.saving <= max_saving]
        if not inside:
            fallback = (
                f"none of the {len(combos)} best combinations saves at most {max_saving} (target plus rank.max_overshoot); "
                f"the {min(top_t, len(combos))} best that save more were measured instead"
            )
        combos = inside[:top_t] if inside else combos[:top_t]
    verified: list[dict[str, Any]] = []
    for c in combos:
        repl = {sub.index: modules[k][row - 1] for k, (sub, row) in enumerate(zip(subnetworks, c.choice)) if row > 0}
        acc = accuracy_with(subnetworks, head, repl, features, labels, device=device)
        params = sum(table[k][row]["params"] for k, row in enumerate(c.choice))
        verified.append(
            {"choice": list(c.choice), "predicted_acc": base_acc - c.impairment, "measured_acc": acc, "saving": c.saving, "params": params}
        )
    best = max(verified, key=lambda v: (v["measured_acc"], -v["saving"], [-x for x in v["choice"]]))
    chosen_by = ""
    if prefer_capacity:
        n = len(labels)
        se = math.sqrt(best["measured_acc"] * (1 - best["measured_acc"]) / max(1, n))
        tied = [v for v in verified if v["measured_acc"] >= best["measured_acc"] - capacity_window * se]
        roomiest = max(tied, key=lambda v: (v["params"], v["measured_acc"], -v["saving"], [-x for x in v["choice"]]))
        if roomiest is not best:
            chosen_by = (
                f"rank.prefer_capacity: {len(tied)} of the {len(verified)} verified combinations lie within {capacity_window:g} "
                f"standard error(s) ({se:.4f} each) of the best val accuracy {best['measured_acc']:.4f}; the one keeping the most parameters "
                f"({roomiest['params']} against {best['params']}) scores {roomiest['measured_acc']:.4f}"
            )
        best = roomiest
    return JointScheme(tuple(best["choice"]), best["predicted_acc"], best["measured_acc"], best["saving"], verified, fallback, chosen_by)


def joint_pareto(table: list[list[dict]], base_acc: float, base_cost: int) -> list[dict]:
    """The Pareto front of whole-network schemes (predicted accuracy vs cost) from one table: every target at once."""
    return [
        {
            "choice": list(c.choice),
            "predicted_acc": base_acc - c.impairment,
            "cost": base_cost - c.saving,
            "reduction": c.saving / base_cost,
        }
        for c in joint_front(_candidates(table))
    ]


def required_saving(table: list[list[dict]], base_cost: int, target: float, tolerance: float) -> tuple[int, str]:
    """The saving GPIR must reach for `target`, and "" or the fallback taken to get it.

    When the most pruned chain of trained candidates falls short of the target by no more than `tolerance`
    (a fraction of the base cost), the target is lowered to `target - tolerance` and the fallback says so:
    a scheme 0.1 points under the target is what the user asked for within the stated tolerance, while
    failing after the whole search and constrained training would throw that work away. Further short, the
    clear error naming the candidates' reach. For example, candidates reaching 698 of 1000 give 695 and a note for
    target 0.7 and tolerance 0.005, and (690, "") for 0.69 (tests/test_gpir.py)."""
    need = min_saving_for(target, base_cost)
    reach = joint_front(_candidates(table))[-1].saving  # the most pruned chain (one exact front, computed once)
    if need <= reach:
        return need, ""
    if reach < min_saving_for(target - tolerance, base_cost):
        raise ValueError(
            f"target reduction {target} is out of reach for these candidates: together they remove at most "
            f"{reach / base_cost:.4f}; allowed: a target up to {reach / base_cost:.4f} (or widen the search: "
            f"more constrain.candidates, search generations, or a larger divide.k)"
        )
    lowered = target - tolerance
    return min_saving_for(lowered, base_cost), (
        f"the trained candidates together remove at most {reach / base_cost:.4f}, short of the target {target} by "
        f"{100 * (target - reach / base_cost):.2f} points (within the tolerance of {100 * tolerance:.1f}); GPIR chose among "
        f"the combinations removing at least {lowered:.4f}"
    )


def no_choice_note(info: dict, top_t: int) -> str:
    """What to tell a user for whose target only one combination of the trained candidates lands between the target
    and `rank.max_overshoot` above it (GPIR then ranks nothing: that combination is taken however much it loses),
    or "" when GPIR had a choice."""
    verified = info.get("verified") or []
    if top_t < 2 or len(verified) != 1:
        return ""
    return (
        f"only one combination of the trained candidates lands between the target and rank.max_overshoot above it (val accuracy {verified[0]['measured_acc']:.2%} "
        f"on the cached features, base {info['val_cache_acc_base']:.2%}), so GPIR had no choice; more constrain.candidates, "
        "search generations or a lower target give it one"
    )


def min_saving_for(target_reduction: float, base_cost: int) -> int:
    return int(math.ceil(target_reduction * base_cost - 1e-9))


def merge_into(
    model: nn.Module,
    example_input: torch.Tensor,
    subnetworks: Sequence[SubNetwork],
    chosen: dict[int, tuple],
) -> tuple[nn.Module, dict[str, list[int]]]:
    """One physically pruned copy of the whole `model` carrying the chosen sub-network candidates.

    `chosen` maps k to (trained pruned module, its keep-scheme in sub-network-local names[, its CandidateIO]):
    local groups are renamed to the whole model's, boundary groups taken from the CandidateIO (candidates that
    share a boundary must keep the same channels of it). Returns the model and its keep-scheme in whole-model
    names, so it can be rebuilt from the original architecture."""
    from pruning.boundary import BoundaryIO, CandidateIO
    from pruning.channels import pruned_copy
    from pruning.divide import source_name

    full_scheme: dict[str, list[int]] = {}
    for k, entry in chosen.items():
        _, scheme, *rest = entry
        io = rest[0] if rest else CandidateIO()
        sub = subnetworks[k - 1]
        for local, kept in scheme.items():
            if local not in io.local_names:
                full_scheme[source_name(sub, local)] = list(kept)
        for group, kept in io.whole.items():
            if full_scheme.setdefault(group, list(kept)) != list(kept):
                raise ValueError(f"sub-network {k} keeps other channels of boundary group {group!r} than its neighbour")
    pruned = pruned_copy(model, example_input, full_scheme)
    state = pruned.state_dict()
    for k, (module, *_) in chosen.items():
        sub = subnetworks[k - 1]
        module = module.module if isinstance(module, BoundaryIO) else module
        for name, tensor in module.state_dict().items():
            path, _, leaf = name.rpartition(".")
            full = f"{source_name(sub, path)}.{leaf}"
            if state[full].shape != tensor.shape:
                raise ValueError(f"{full}: trained candidate has shape {tuple(tensor.shape)}, pruned model {tuple(state[full].shape)}")
            state[full] = tensor
    pruned.load_state_dict(state)
    return pruned.eval(), full_scheme


def rank(
    model: nn.Module,
    example_input: torch.Tensor,
    subnetworks: Sequence[SubNetwork],
    head: nn.Module,
    candidates: Sequence[Sequence[tuple]],
    base_costs: Sequence[int],
    total_cost: int,
    target: float,
    *,
    top_t: int,
    max_overshoot: float,
    features: Sequence,
    labels,
    device: torch.device | str = "cpu",
    paired_boundaries: bool = False,
    tolerance: float = 0.0,
    prefer_capacity: bool = False,
    capacity_window: float = 1.0,
) -> tuple[nn.Module, dict[str, list[int]], dict]:
    """GPIR end to end: impairment table, exact knapsack for `target`, joint verification, merged whole model.

    `candidates[k]` lists sub-network k+1's trained candidates as (module, local keep-scheme, cost[, CandidateIO]);
    candidates of neighbouring sub-networks join only when they agree on the width of their boundary. The
    merged model is measured once more on the val features: it must compute what the verified combination
    did (the chained BoundaryIO candidates stand for it), else this is a defect and raises.
    `paired_boundaries`: candidates narrowing a boundary are scored beside an adapted successor
    (`paired_impairments`) instead of the original one. `tolerance`: how far under the target the candidates
    may fall and still be ranked (`required_saving`); 0 refuses any shortfall. `prefer_capacity`, `capacity_window`: see
    `joint_scheme`.
    Returns the physically pruned model, its whole-model keep-scheme, and what was decided (the
    choice, predicted and measured val accuracy, the verified combinations, the table and joint front).

    Example (illustrative, not run)::

        pruned, scheme, info = rank(model, x, subs, head, cands, [s.flops for s in subs], total, 0.5, top_t=10,
                                    max_overshoot=0.02, features=X_val, labels=y_val)
    """
    from pruning.boundary import CandidateIO

    ios = [[c[3] if len(c) > 3 else CandidateIO() for c in cs] for cs in candidates]
    base_acc, table = impairment_table(
        subnetworks,
        head,
        [[(c[0], c[2]) for c in cs] for cs in candidates],
        base_costs,
        features,
        labels,
        device=device,
        options=[[(io.inputs, io.outputs) for io in row] for row in ios],
    )
    need, short = required_saving(table, total_cost, target, tolerance)
    modules = [[c[0] for c in cs] for cs in candidates]
    pairs = paired_impairments(subnetworks, head, table, modules, base_acc, features, labels, device) if paired_boundaries else 0
    best = joint_scheme(
        subnetworks,
        head,
        table,
        modules,
        base_acc,
        need,
        top_t,
        features,
        labels,
        device=device,
        max_saving=min_saving_for(min(1.0, target + max_overshoot), total_cost),
        prefer_capacity=prefer_capacity,
        capacity_window=capacity_window,
    )
    chosen = {k + 1: (*candidates[k][row - 1][:2], ios[k][row - 1]) for k, row in enumerate(best.choice) if row > 0}
    pruned, scheme = merge_into(model, example_input, subnetworks, chosen)
    merged_acc = accuracy_with([], pruned, {}, features, labels, device=device)
    if abs(merged_acc - best.measured_acc) > 0.005:
        raise ValueError(
            f"the merged pruned model scores {merged_acc:.4f} on the val features, its candidates chained {best.measured_acc:.4f}: "
            "a boundary was merged other than the candidates were trained (a defect; please report it)"
        )
    info = {
        "val_cache_acc_base": base_acc,
        "predicted_val_acc": best.predicted_acc,
        "measured_val_acc": best.measured_acc,
        "merged_val_acc": merged_acc,
        "predicted_saving": best.saving,
        "chosen_by": best.chosen_by,
        "choice": [
            {
                "k": k + 1,
                "row": row,
                "candidate": table[k][row]["candidate"],
                "impairment": table[k][row]["impairment"],
                "saving": table[k][row]["saving"],
                "inputs": table[k][row]["inputs"],
                "outputs": table[k][row]["outputs"],
            }
            for k, row in enumerate(best.choice)
        ],
        "verified": best.verified,
        "fallbacks": [f for f in (short, best.fallback) if f],
        "pairs_measured": pairs,  # rank.paired_boundaries: joint measurements of candidates with their readers
        "table": table,
        "joint_front": joint_pareto(table, base_acc, total_cost),
    }
    return pruned, scheme, info
