"""Boundary channels as genes: the width plan, candidates between pruned boundaries, chains that merge exactly."""

from __future__ import annotations

import pytest
import torch

from pruning.boundary import ADAPTER, BoundaryIO, CandidateIO, plan_boundaries
from pruning.channels import count_flops_params, group_importance, keep_by_importance
from pruning.divide import boundary_features, divide
from pruning.emodir import (
    CandidateChoice,
    SearchSettings,
    candidate_cost,
    candidate_module,
    choose_candidates,
    extra_candidates,
    search_network,
    searched_module,
)
from pruning.gpir import accuracy_with, impairment_table, joint_scheme, merge_into
from pruning.search import Evaluation, SearchSpace, boundary_search_groups
from tests.conftest import self_labelled


@pytest.fixture(scope="module")
def resnet():
    model, x, y = self_labelled(64)
    subs, head = divide(model, x[:1], 3)
    return model, x, y, subs, head


@pytest.fixture(scope="module")
def planned(resnet):
    """The plan at widths 1.0/0.75/0.5 and each sub-network's (searched module, example, space) under it."""
    model, x, _, subs, _ = resnet
    plan = plan_boundaries(model, subs, x[:1], (1.0, 0.75, 0.5))
    return plan, [_space(sub, plan) for sub in subs]


def _space(sub, plan):
    ex = torch.zeros(1, *sub.in_shape)
    reads, writes = (plan[sub.index - 2] if sub.index > 1 else None), plan[sub.index - 1]
    searched = searched_module(sub.module, ex, reads)
    groups, genes, excluded = boundary_search_groups(searched, ex, reads, writes)
    return searched, ex, SearchSpace(tuple(groups), 10, "levels", 1, tuple(excluded), tuple(genes))


def test_each_boundary_gets_nested_widths_of_its_most_important_channels(resnet, planned):
    model, x, _, subs, _ = resnet
    plan = planned[0]
    importance = group_importance(model, x[:1])
    assert [b.group for b in plan] == ["conv1", "layer2.0.conv2", "layer3.0.conv2"]  # the residual chain of each stage
    for b in plan:
        assert b.searchable and [len(o) for o in b.options] == [b.channels, b.channels * 3 // 4, b.channels // 2]
        assert set(b.options[2]) < set(b.options[1]) < set(b.options[0])
        assert list(b.options[2]) == keep_by_importance({b.group: importance[b.group]}, {b.group: b.channels // 2})[b.group]
    rounded = plan_boundaries(model, subs, x[:1], (1.0, 0.75, 0.5), round_to=8)
    assert [[len(o) for o in b.options] for b in rounded] == [[16, 8], [32, 24, 16], [64, 48, 32]]  # 12 rounds to 8, once
    assert not any(b.searchable for b in plan_boundaries(model, subs, x[:1], (1.0,)))
    with pytest.raises(ValueError, match="including 1.0"):
        plan_boundaries(model, subs, x[:1], (0.75, 0.5))


def test_sub_networks_search_the_widths_of_the_boundaries_they_touch(resnet, planned):
    model, x, _, subs, _ = resnet
    genes = [space.boundary for _, _, space in planned[1]]
    assert [(b.reads, b.writes, b.whole) for b in genes[0]] == [(None, 1, "conv1")]
    assert [(b.reads, b.writes, b.whole) for b in genes[1]] == [(1, None, "conv1"), (None, 2, "layer2.0.conv2")]
    assert genes[1][0].group == ADAPTER and not planned[1][1][2].excluded
    # frozen boundaries: the groups reaching them are left out with the reason, as before
    frozen = plan_boundaries(model, subs, x[:1], (1.0,))
    space = _space(subs[1], frozen)[2]
    assert not space.boundary and any("boundary keeps its channels" in why for _, why in space.excluded)


def test_chained_candidates_compute_what_the_merged_network_computes(resnet, planned):
    """Candidates pruning their boundaries fit between the original neighbours (zeros in the dropped channels),
    and a chain that agrees on every boundary is, exactly, the physically pruned merged model."""
    model, x, y, subs, head = resnet
    plan, spaces = planned
    chosen, repl = {}, {}
    total_saving = 0
    for sub, (searched, ex, space) in zip(subs, spaces):
        genes = list(space.uniform(0.6))
        genes[len(space.groups) :] = [3] * len(space.boundary)  # every boundary at width 0.5
        importance = group_importance(searched, ex)
        scheme, io = space.decode(genes, importance), space.io(genes, sub.out_shape[0])
        module = candidate_module(sub, scheme, io).eval()
        assert isinstance(module, BoundaryIO) and module.out_keep == list(plan[sub.index - 1].options[2])
        flops = candidate_cost(sub, module, scheme, io, head if sub.index == len(subs) else None)[0]
        total_saving += sub.flops - flops
        chosen[sub.index], repl[sub.index] = (module, scheme, io), module
    merged, full_scheme = merge_into(model, x[:1], subs, chosen)
    assert [len(full_scheme[b.group]) for b in plan] == [len(b.options[2]) for b in plan]
    with torch.no_grad():
        chained = x
        for sub in subs:
            chained = repl[sub.index](chained)
        assert torch.allclose(head(chained), merged(x), atol=1e-4)
    # the savings of the parts (the head's included in the last one) add up to the merged model's
    assert count_flops_params(model, x[:1])[0] - count_flops_params(merged, x[:1])[0] == total_saving
    feats, _ = boundary_features(subs, x)
    with torch.no_grad():
        merged_acc = (merged(x).argmax(1) == y).float().mean().item()
    assert accuracy_with(subs, head, repl, feats, y) == merged_acc


def test_gpir_joins_only_candidates_that_agree_on_their_boundary(resnet, planned):
    model, x, y, subs, head = resnet
    feats, _ = boundary_features(subs, x)
    cands, options, modules = [], [], []
    for sub, (searched, ex, space) in zip(subs, planned[1]):
        importance = group_importance(searched, ex)
        rows, opts, mods = [], [], []
        for width in (1, 3):  # a candidate keeping its boundaries, one halving them, inner groups at 0.5
            genes = list(space.uniform(0.5))
            genes[len(space.groups) :] = [width] * len(space.boundary)
            scheme, io = space.decode(genes, importance), space.io(genes, sub.out_shape[0])
            module = candidate_module(sub, scheme, io).eval()
            rows.append((module, candidate_cost(sub, module, scheme, io, head if sub.index == 3 else None)[0]))
            opts.append((io.inputs, io.outputs))
            mods.append(module)
        cands.append(rows)
        options.append(opts)
        modules.append(mods)
    base_acc, table = impairment_table(subs, head, cands, [s.flops for s in subs], feats, y, options=options)
    assert [r["inputs"] for r in table[1]] == [0, 0, 2] and [r["outputs"] for r in table[0]] == [0, 0, 2]
    total = count_flops_params(model, x[:1])[0]
    best = joint_scheme(subs, head, table, modules, base_acc, int(0.6 * total), top_t=50, features=feats, labels=y)
    for combo in best.verified:
        rows = [table[k][r] for k, r in enumerate(combo["choice"])]
        assert all(rows[k]["outputs"] == rows[k + 1]["inputs"] for k in range(len(rows) - 1)), combo["choice"]
    assert any(table[0][r]["outputs"] for r in [c["choice"][0] for c in best.verified])  # halved boundaries do take part


def test_candidates_to_train_continue_every_link_the_predecessor_offers():
    members = [
        Evaluation((i,), c, 0.1, 0, 0, inputs, 0) for i, (c, inputs) in enumerate([(0.2, 0), (0.3, 1), (0.4, 0), (0.5, 2), (0.7, 1)])
    ]
    picked, notes = choose_candidates(members, 3, 0.5, {1, 2})
    assert sorted(members[i].inputs for i in picked) == [0, 1, 2] and not notes
    picked, notes = choose_candidates(members, 2, 0.5, {3})
    assert {members[i].inputs for i in picked} <= {0} and "option 3" in notes[0]
    assert choose_candidates(members, 0, 0.5, set())[0] == [0, 2]  # nothing pruned upstream: only readers of the full width
    # no training is spent on the far ends of a front when enough members lie near the target's cost
    front = [Evaluation((i,), c, 0.1, 0, 0) for i, c in enumerate([0.05, 0.45, 0.5, 0.55, 0.95])]
    assert {front[i].cost for i in choose_candidates(front, 2, 0.5)[0]} <= {0.45, 0.5, 0.55}
    assert {front[i].cost for i in choose_candidates(front, 5, 0.5)[0]} == {0.05, 0.45, 0.5, 0.55, 0.95}


def test_spread_outputs_trains_the_defaults_candidates_and_one_for_each_width_they_leave_out():
    """By cost alone the members near the target all write the full width, so the next sub-network is offered no
    narrowed boundary. spread_outputs keeps that choice whole (GPIR's reach cannot shrink, as it did when the same
    `m` were shared out over more widths) and adds one member per width left unwritten, and one per width the
    predecessor's extras offer that nothing reads yet, each nearest the target's cost."""
    costs_outputs = [(0.45, 0), (0.5, 0), (0.55, 0), (0.6, 0), (0.15, 1), (0.18, 1), (0.1, 2)]  # narrowed: far from it
    s1 = [Evaluation((i,), c, 0.1, 0, 0, 0, w) for i, (c, w) in enumerate(costs_outputs)]
    # sub-network 2: reads the full width (0) or X_1 narrowed (1, 2)
    s2 = [Evaluation((i,), c, 0.1, 0, 0, r, 0) for i, (c, r) in enumerate([(0.5, 0), (0.45, 0), (0.52, 1), (0.3, 1), (0.6, 2)])]
    plain, spread = CandidateChoice(3, 0.5), CandidateChoice(3, 0.5, spread_outputs=True)
    default, _ = plain.next(s1)
    assert {s1[i].outputs for i in default} == {0}
    picked, notes = spread.next(s1)
    assert set(default) < set(picked) and not notes
    assert sorted(picked) == sorted([*default, 5, 6])  # width 1: 0.18 is nearer 0.5 than 0.15; width 2: the only one
    default2, _ = plain.next(s2)
    picked2, _ = spread.next(s2)
    assert {s2[i].inputs for i in default2} == {0}  # the default's predecessors write the full width only
    # the default's own choice stays (the same m over the same widths), and the links the extras opened continue
    assert set(default2) < set(picked2) and {s2[i].inputs for i in picked2} == {0, 1, 2}
    assert sorted(set(picked2) - set(default2)) == [2, 4]  # reads 1 nearest the target (0.52), reads 2 (0.6)
    assert extra_candidates(s1, list(range(7)), 0.5, set()) == []  # every width already trained: nothing added


def test_searched_candidates_cost_what_their_pruned_networks_cost(resnet, planned):
    model, x, y, subs, head = resnet
    plan = planned[0]
    feats, _ = boundary_features(subs, x)
    sub = subs[1]
    ex = torch.zeros(1, *sub.in_shape)
    from pruning.selectors import train_selector

    selector = train_selector(feats[2], y, 10, epochs=1, lr=0.003, batch_size=32, seed=0)
    front = search_network(
        sub.module,
        ex,
        selector,
        feats[1],
        feats[1],
        y,
        SearchSettings(pop_size=6, generations=2, calib_samples=32),
        reads=plan[0],
        writes=plan[1],
    )
    assert (front.base_flops, front.base_params) == (sub.flops, sub.params)  # the input adapter is not the sub-network's
    states = {(e.inputs, e.outputs) for e in front.archive}
    assert len(states) > 1 and front.archive and all(e.cost <= 1.0 for e in front.archive)
    importance = group_importance(searched_module(sub.module, ex, plan[0]), ex)
    for e in front.archive:
        scheme, io = front.space.decode(e.genes, importance), front.space.io(e.genes, sub.out_shape[0])
        assert (io.inputs, io.outputs) == (e.inputs, e.outputs)
        flops = count_flops_params(candidate_module(sub, scheme, io), ex)[0]
        assert flops == e.flops and e.cost == pytest.approx(flops / sub.flops)
    # the archive is each boundary state's own front: the global front is in it, and members beyond it
    assert {m.genes for m in front.members} <= {e.genes for e in front.archive}
    for e in front.archive:
        same = [o for o in front.archive if (o.inputs, o.outputs) == (e.inputs, e.outputs) and o is not e]
        assert not any(o.cost <= e.cost and o.error <= e.error and (o.cost, o.error) != (e.cost, e.error) for o in same)


def test_candidate_io_round_trips_through_json():
    io = CandidateIO(1, 2, ADAPTER, "0.conv2", 32, {"conv1": [0, 3], "layer2.0.conv2": [1, 2]})
    assert CandidateIO.from_json(io.to_json()) == io and CandidateIO.from_json(None) == CandidateIO()


def test_constrained_training_holds_a_pruned_boundary_to_the_channels_it_keeps(resnet, planned):
    from pruning.constrain import train_constrained

    model, x, y, subs, head = resnet
    sub, (searched, ex, space) = subs[0], planned[1][0]
    genes = list(space.uniform(1.0))
    genes[len(space.groups) :] = [3]  # X_1 at half its channels
    scheme, io = space.decode(genes, group_importance(searched, ex)), space.io(genes, sub.out_shape[0])
    candidate = candidate_module(sub, scheme, io)
    feats, _ = boundary_features(subs, x)
    from pruning.selectors import FeatureSelector

    selector = FeatureSelector(sub.out_shape[0], 10)
    losses = train_constrained(candidate, feats[0], feats[1], y, selector, lam=0.0, epochs=1, lr=0.0, batch_size=64)
    with torch.no_grad():
        kept_out, kept_target = candidate.kept_output(candidate(feats[0])), candidate.kept_output(feats[1])
    relative = torch.nn.functional.mse_loss(kept_out, kept_target) / kept_target.pow(2).mean()
    assert kept_out.shape[1] == sub.out_shape[0] // 2 and losses["feature_mse"] == pytest.approx(relative.item(), rel=1e-4)
