"""GPIR on real sub-network candidates: the impairment table, the joint scheme, the merged whole model."""
from __future__ import annotations

import copy

import pytest
import torch

from pruning.channels import count_flops_params, group_importance, pruned_copy
from pruning.constrain import FeatureStream, train_constrained
from pruning.divide import assemble, boundary_features, divide
from pruning.emodir import ConstrainSettings, constrain_subnetwork
from pruning.gpir import (
    accuracy_with,
    impairment_table,
    joint_pareto,
    joint_scheme,
    merge_into,
    no_choice_note,
    required_saving,
)
from pruning.models import build_model
from pruning.search import SearchSpace, prunable_groups
from tests.conftest import self_labelled


def test_joint_scheme_builds_a_whole_model_with_the_predicted_flops():
    model, x, y = self_labelled(64)
    subs, head = divide(model, x[:1], 3)
    feats, _ = boundary_features(subs, x)
    modules, cands, schemes = [], [], []
    for sub in subs:
        ex = feats[sub.index - 1][:1]
        space = SearchSpace(tuple(prunable_groups(sub.module, ex)))
        imp = group_importance(sub.module, ex)
        mods, sch = [], []
        for frac in (0.3, 0.6):
            local = space.decode(space.uniform(frac), imp)
            mods.append(pruned_copy(sub.module, ex, local).eval())
            sch.append(local)
        modules.append(mods)
        schemes.append(sch)
        cands.append([(m, count_flops_params(m, ex)[0]) for m in mods])
    base_acc, table = impairment_table(subs, head, cands, [s.flops for s in subs], feats, y)
    with torch.no_grad():
        assert base_acc == (model(x).argmax(1) == y).float().mean().item()
    assert all(rows[0]["saving"] == 0 and rows[0]["impairment"] == 0 for rows in table)
    total = count_flops_params(model, x[:1])[0]
    need = int(0.3 * total)
    best = joint_scheme(subs, head, table, modules, base_acc, need, top_t=5, features=feats, labels=y)
    assert best.saving >= need and len(best.verified) == 5 and best.fallback is None
    # a window no combination lands in: the best that save more are measured, and the scheme says so
    narrow = joint_scheme(subs, head, table, modules, base_acc, need, top_t=5, features=feats, labels=y, max_saving=need - 1)
    assert narrow.fallback and f"saves at most {need - 1}" in narrow.fallback and narrow.choice == best.choice
    chosen = {i + 1: (modules[i][r - 1], schemes[i][r - 1]) for i, r in enumerate(best.choice) if r > 0}
    merged, full_scheme = merge_into(model, x[:1], subs, chosen)
    assert count_flops_params(merged, x[:1])[0] == total - best.saving
    with torch.no_grad():
        assert (merged(x).argmax(1) == y).float().mean().item() == best.measured_acc
    repl = {k: m for k, (m, _) in chosen.items()}
    assert accuracy_with(subs, head, repl, feats, y) == best.measured_acc
    front = joint_pareto(table, base_acc, total)
    assert base_acc == 1.0 and front[0]["predicted_acc"] == 1.0  # the front opens with the most saving at no loss
    assert all(a["reduction"] < b["reduction"] and a["predicted_acc"] > b["predicted_acc"] for a, b in zip(front, front[1:]))


def test_constrained_training_pulls_the_pruned_feature_towards_the_original():
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    subs, head = divide(model, x[:1], 3)
    feats, _ = boundary_features(subs, x)
    sub = subs[2]
    ex = feats[2][:1]
    space = SearchSpace(tuple(prunable_groups(sub.module, ex)))
    cand = pruned_copy(sub.module, ex, space.decode(space.uniform(0.4), group_importance(sub.module, ex)))
    def mse(m):
        with torch.no_grad():
            return torch.nn.functional.mse_loss(m.eval()(feats[2]), feats[3]).item()
    before = mse(cand)
    stats = train_constrained(cand, feats[2], feats[3], y, head, predecessors=[subs[1].module, copy.deepcopy(subs[1].module)],
                              predecessor_inputs=feats[1], lam=0.0, epochs=8, lr=0.01, batch_size=32)
    assert mse(cand) < before and stats["feature_mse"] > 0
    assert all(not p.requires_grad for p in head.parameters())
    with torch.no_grad():  # the original network is untouched
        assert torch.allclose(assemble(subs, head)(x), model(x))


def test_streamed_constrained_training_sees_every_training_batch_each_epoch():
    """constrain.data: stream: features computed per batch from (augmented) images through the original network,
    the whole loader every epoch, predecessors mixed in as with the cache; it learns as the cached path does."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    x, y = torch.randn(96, 3, 32, 32), torch.randint(0, 10, (96,))
    subs, head = divide(model, x[:1], 3)
    feats, _ = boundary_features(subs, x[64:])  # held out: never streamed
    sub = subs[2]
    ex = feats[2][:1]
    space = SearchSpace(tuple(prunable_groups(sub.module, ex)))
    cand = pruned_copy(sub.module, ex, space.decode(space.uniform(0.4), group_importance(sub.module, ex)))

    class Loader(list):
        served = 0

        def __iter__(self):
            for batch in list.__iter__(self):
                Loader.served += 1
                yield batch

    loader = Loader([(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)])
    stream = FeatureStream([s.module for s in subs], 3, loader)
    before_, inputs_, target_, labels_ = next(iter(stream))
    with torch.no_grad():
        assert torch.allclose(subs[1].module(before_), inputs_) and torch.allclose(sub.module(inputs_), target_)

    def mse(m):
        with torch.no_grad():
            return torch.nn.functional.mse_loss(m.eval()(feats[2]), feats[3]).item()

    start, Loader.served = mse(cand), 0
    stats = train_constrained(cand, None, None, None, head, predecessors=[subs[1].module, copy.deepcopy(subs[1].module)],
                              lam=0.0, epochs=6, lr=0.01, stream=stream)
    assert mse(cand) < start and stats["feature_mse"] > 0
    assert Loader.served == 6 * 4 + 4  # six epochs of 4 batches, and the first 1,024 images (all 4) for BatchNorm
    with pytest.raises(ValueError, match="needs the training loader"):
        constrain_subnetwork(sub, subs, [{}], feats, y[64:], head, [], ConstrainSettings(data="stream"))
    assert all(p.device.type == "cpu" for p in sub.module.parameters())  # the stream trains on its own copies

    class Shuffled:  # a loader with a generator, as the pipeline's: its order depends on what was drawn before
        generator = torch.Generator()

        def __len__(self):
            return 4

        def __iter__(self):
            order = torch.randperm(64, generator=self.generator)
            for i in range(0, 64, 16):
                yield x[order[i : i + 16]], y[order[i : i + 16]]

    shuffled = FeatureStream([s.module for s in subs], 3, Shuffled())
    start = copy.deepcopy(cand)
    trained = []
    for _ in range(2):
        c = copy.deepcopy(start)
        train_constrained(c, None, None, None, head, lam=0.0, epochs=1, lr=0.01, seed=5, stream=shuffled)
        trained.append(c)
        list(shuffled)  # draws from the loader's generator in between
    # each candidate's data follow its own seed, not what ran before it
    assert all(torch.equal(a, b) for a, b in zip(trained[0].state_dict().values(), trained[1].state_dict().values()))


def _candidates_of(model, x, fracs=(0.3, 0.6)):
    subs, head = divide(model, x[:1], 3)
    feats, _ = boundary_features(subs, x)
    modules, cands = [], []
    for sub in subs:
        ex = feats[sub.index - 1][:1]
        space = SearchSpace(tuple(prunable_groups(sub.module, ex)))
        imp = group_importance(sub.module, ex)
        mods = [pruned_copy(sub.module, ex, space.decode(space.uniform(f), imp)).eval() for f in fracs]
        modules.append(mods)
        cands.append([(m, count_flops_params(m, ex)[0]) for m in mods])
    return subs, head, feats, modules, cands


def test_gpir_choice_beats_the_feasible_combinations_of_the_same_candidates():
    """Every combination of the same candidates that saves enough, measured on the same val features: GPIR's
    choice is at least as accurate as the median one and better than the worst (a ranking that picked any
    feasible combination would not be)."""
    import itertools

    import numpy as np

    model, x, y = self_labelled(96, seed=1)
    subs, head, feats, modules, cands = _candidates_of(model, x, fracs=(0.2, 0.5, 0.8))
    base_acc, table = impairment_table(subs, head, cands, [s.flops for s in subs], feats, y)
    total = count_flops_params(model, x[:1])[0]
    need = int(0.35 * total)
    best = joint_scheme(subs, head, table, modules, base_acc, need, top_t=3, features=feats, labels=y)
    accs = []
    for choice in itertools.product(*(range(len(rows)) for rows in table)):
        if sum(table[k][r]["saving"] for k, r in enumerate(choice)) < need:
            continue
        repl = {k + 1: modules[k][r - 1] for k, r in enumerate(choice) if r > 0}
        accs.append(accuracy_with(subs, head, repl, feats, y))
    assert len(accs) >= 10 and min(accs) < max(accs)  # a real choice among many feasible combinations
    assert best.measured_acc >= float(np.median(accs)) and best.measured_acc > min(accs), (best.measured_acc, sorted(accs))
    info = {"verified": best.verified, "val_cache_acc_base": base_acc}
    assert no_choice_note(info, 3) == ""  # a real choice: nothing to say
    # a target only the most pruned combination meets: GPIR has no choice, and the rank stage says so
    most = sum(max(r["saving"] for r in rows) for rows in table)
    alone = joint_scheme(subs, head, table, modules, base_acc, most, top_t=3, features=feats, labels=y)
    note = no_choice_note({"verified": alone.verified, "val_cache_acc_base": base_acc}, 3)
    assert len(alone.verified) == 1 and "only one combination" in note and f"{alone.measured_acc:.2%}" in note


def test_prefer_capacity_takes_the_combination_keeping_most_parameters_within_one_standard_error():
    """rank.prefer_capacity: at equal FLOPs the models keeping more parameters finetuned better (bench/notes/r20.md),
    so among the verified combinations that tie with the best within one binomial standard error on the val
    labels, the one keeping the most parameters is taken, and the choice says so."""
    import math

    model, x, y = self_labelled(96, seed=1)
    subs, head, feats, modules, cands = _candidates_of(model, x, fracs=(0.2, 0.5, 0.8))
    need = int(0.35 * count_flops_params(model, x[:1])[0])
    classes = int(head(feats[-1][:1]).shape[1])
    # labels the base gets wrong every 8th (and 4th) image: the best scores 0.875 (0.75), with a standard error to tie in
    for every, within, outside in ((8, True, False), (4, False, True)):
        noisy = y.clone()
        noisy[::every] = (noisy[::every] + 1) % classes
        base_acc, table = impairment_table(subs, head, cands, [s.flops for s in subs], feats, noisy)
        plain = joint_scheme(subs, head, table, modules, base_acc, need, top_t=10, features=feats, labels=noisy)
        roomy = joint_scheme(subs, head, table, modules, base_acc, need, top_t=10, features=feats, labels=noisy, prefer_capacity=True)
        assert roomy.verified == plain.verified and plain.chosen_by == ""  # the same combinations measured
        kept = [s.module if r == 0 else modules[k][r - 1] for k, (s, r) in enumerate(zip(subs, roomy.choice))]
        params = sum(p.numel() for m in kept for p in m.parameters())
        se = math.sqrt(plain.measured_acc * (1 - plain.measured_acc) / len(y))
        tied = [v for v in plain.verified if v["measured_acc"] >= plain.measured_acc - se]
        assert params == max(v["params"] for v in tied) and roomy.measured_acc >= plain.measured_acc - se
        assert roomy.choice != plain.choice and f"{len(tied)} of the {len(plain.verified)} verified" in roomy.chosen_by
        # the cases each labelling makes: a less accurate combination inside the error taken for its parameters,
        # and one with more parameters than any tied but outside the error passed over
        assert (roomy.measured_acc < plain.measured_acc) == within
        assert any(v["params"] > params for v in plain.verified if v not in tied) == outside
        # `capacity_window` widens the tie: at 100 standard errors every verified combination ties, the roomiest is taken
        wide = joint_scheme(subs, head, table, modules, base_acc, need, top_t=10, features=feats, labels=noisy, prefer_capacity=True,
                            capacity_window=100.0)
        widest = [s.module if r == 0 else modules[k][r - 1] for k, (s, r) in enumerate(zip(subs, wide.choice))]
        assert sum(p.numel() for m in widest for p in m.parameters()) == max(v["params"] for v in plain.verified)
        assert (wide.choice != roomy.choice) == outside and "within 100 standard error(s)" in wide.chosen_by
    with pytest.raises(ValueError, match=r"capacity_window = 0\.0: allowed: a number of standard errors above 0"):
        joint_scheme(subs, head, table, modules, base_acc, need, top_t=10, features=feats, labels=noisy, prefer_capacity=True, capacity_window=0.0)


def test_constrained_training_mixes_its_predecessors():
    """X~ is drawn per batch from the original S_{k-1} and its trained candidates: every predecessor feeds
    some batches (counted by a wrapper around each real module)."""

    class Counted(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, t):
            self.calls += 1
            return self.inner(t)

    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    subs, head = divide(model, x[:1], 3)
    feats, _ = boundary_features(subs, x)
    ex = feats[2][:1]
    space = SearchSpace(tuple(prunable_groups(subs[2].module, ex)))
    cand = pruned_copy(subs[2].module, ex, space.decode(space.uniform(0.4), group_importance(subs[2].module, ex)))
    preds = [Counted(subs[1].module), Counted(copy.deepcopy(subs[1].module)), Counted(copy.deepcopy(subs[1].module))]
    train_constrained(cand, feats[2], feats[3], y, head, predecessors=preds, predecessor_inputs=feats[1], epochs=2, batch_size=8)
    assert [p.calls for p in preds] and all(p.calls > 0 for p in preds) and sum(p.calls for p in preds) == 16


def _dup(channels: int):
    """A 1x1 convolution writing `channels` inputs twice: output channels c and c + `channels` are equal."""
    from torch import nn

    conv = nn.Conv2d(channels, 2 * channels, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([torch.eye(channels), torch.eye(channels)]).view(2 * channels, channels, 1, 1))
    return conv


def _reads_twice(channels: int, out: int, bias: torch.Tensor):
    """A 1x1 convolution reading 2 x `channels` inputs, channel c and c + `channels` with the same weight halved
    (so duplicated inputs give what the `channels` alone give with the whole weight), and the one that reads only
    the first `channels` with the whole weight: (original, adapted)."""
    from torch import nn

    w = torch.randn(out, channels)
    original, adapted = nn.Conv2d(2 * channels, out, 1), nn.Conv2d(channels, out, 1)
    with torch.no_grad():
        original.weight.copy_(torch.cat([w, w], 1).view(out, 2 * channels, 1, 1) / 2)
        adapted.weight.copy_(w.view(out, channels, 1, 1))
        original.bias.copy_(bias)
        adapted.bias.copy_(bias)
    return original, adapted


def _duplicated_chain(n: int = 512):
    """Three sub-networks, each boundary with 4 channels of which 2-3 copy 0-1. Each sub-network reads all four with
    halved weights, so dropping channels 2-3 halves its input; its adapted twin reads only 0-1 with whole weights
    and computes exactly what it does. Returns (subnetworks, head, features, labels, originals, adapted twins)."""
    from torch import nn

    from pruning.divide import SubNetwork

    torch.manual_seed(0)
    s1 = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), _dup(2))
    a1 = s1[0]  # writes channels 0-1 only
    o2, a2 = _reads_twice(2, 2, torch.tensor([1.0, -1.0]))
    s2, a2 = nn.Sequential(o2, _dup(2)), a2  # a2 reads and writes 0-1 only
    o3, a3 = _reads_twice(2, 3, torch.tensor([1.0, -1.0, 0.0]))
    s3, a3 = nn.Sequential(o3, nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Sequential(a3, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    shapes = [(3, 1, 1), (4, 1, 1), (4, 1, 1), (3,)]  # one pixel: no pooling averages the signal below the biases
    subs = [SubNetwork(i + 1, m.eval(), [f"s{i + 1}"], 100, 10, shapes[i], shapes[i + 1]) for i, m in enumerate((s1, s2, s3))]
    x = 2 * torch.randn(n, 3, 1, 1)
    with torch.no_grad():
        feats = [x]
        for sub in subs:
            feats.append(sub.module(feats[-1]))
    return subs, nn.Identity(), feats, feats[-1].argmax(1), (s1, s2, s3), (a1.eval(), a2.eval(), a3.eval())


def test_candidates_narrowing_boundaries_are_scored_beside_adapted_readers():
    """A candidate writing only channels 0-1 of a boundary, measured alone, is followed by the original next
    sub-network reading zeros in 2-3 and loses much. Paired, it is followed by its readers (the least-pruned next
    candidate reading 0-1, and the next one's when that one narrows too), and scored by what it adds to their
    loss: along that chain the impairments add up to the chain's measured loss. A reader of the full width that
    costs more is not taken: it does not read what the candidate writes."""
    import copy

    from pruning.boundary import BoundaryIO
    from pruning.gpir import paired_impairments

    subs, head, feats, y, originals, adapted = _duplicated_chain()
    keep = [0, 1]
    noisy = copy.deepcopy(adapted[0])  # S_1 narrowed, with a loss of its own
    with torch.no_grad():
        noisy.weight.add_(0.3 * torch.randn_like(noisy.weight))
    c1 = BoundaryIO(noisy, out_keep=keep, out_channels=4).eval()  # writes option 1
    c2 = BoundaryIO(adapted[1], in_keep=keep, out_keep=keep, out_channels=4).eval()  # reads and writes option 1
    wide2 = copy.deepcopy(originals[1]).eval()  # full width in and out, costs more than c2
    c3 = BoundaryIO(adapted[2], in_keep=keep).eval()  # reads option 1
    wide3 = copy.deepcopy(originals[2]).eval()
    cands = [[(c1, 60)], [(c2, 50), (wide2, 95)], [(c3, 50), (wide3, 95)]]
    options = [[(0, 1)], [(1, 1), (0, 0)], [(1, 0), (0, 0)]]
    modules = [[m for m, _ in row] for row in cands]
    base_acc, table = impairment_table(subs, head, cands, [100, 100, 100], feats, y, options=options)
    alone = [table[0][1]["impairment"], table[1][1]["impairment"]]
    assert base_acc == 1.0 and min(alone) > 0.05  # zeros in half of what the original next sub-network reads

    def loss(*chain):
        return base_acc - accuracy_with(subs, head, {k: m for k, m in chain}, feats, y)

    assert paired_impairments(subs, head, table, modules, base_acc, feats, y) == 3  # (c1 c2 c3), (c2 c3) and (c3)
    assert [table[0][1]["impairment_alone"], table[1][1]["impairment_alone"]] == alone
    assert table[0][1]["paired_with"] == [0, 0] and table[1][1]["paired_with"] == [0]  # c2 then c3; c3
    assert "paired_with" not in table[1][2] and "impairment_alone" not in table[1][2]  # writes the full width: as measured
    chain_loss = loss((1, c1), (2, c2), (3, c3))
    assert chain_loss > 0.02  # c1's own loss, the adapted readers add none
    total = table[0][1]["impairment"] + table[1][1]["impairment"] + table[2][1]["impairment"]
    assert total == pytest.approx(chain_loss, abs=1e-9)
    assert table[0][1]["impairment"] == pytest.approx(chain_loss - loss((2, c2), (3, c3)), abs=1e-9)
    assert table[0][1]["pair_val_acc"] == pytest.approx(base_acc - chain_loss)


def test_candidates_just_short_of_the_target_are_ranked_within_the_tolerance_and_said():
    """The most pruned chain of trained candidates saves 698 of 1000: for a 0.7 target with a 0.005 tolerance GPIR
    ranks the combinations saving at least 695 and says why; 0.69 needs no fallback; 0.71 (1.2 points short)
    and a zero tolerance are refused with the reach named."""
    rows = [[{"impairment": 0.0, "saving": 0}, {"impairment": 0.1, "saving": 400}],
            [{"impairment": 0.0, "saving": 0}, {"impairment": 0.2, "saving": 298}]]
    need, note = required_saving(rows, 1000, 0.7, 0.005)
    assert need == 695 and "at most 0.6980, short of the target 0.7 by 0.20 points" in note
    assert required_saving(rows, 1000, 0.69, 0.005) == (690, "")
    for target, tolerance in ((0.71, 0.005), (0.7, 0.0)):
        with pytest.raises(ValueError, match="out of reach for these candidates: together they remove at most 0.6980"):
            required_saving(rows, 1000, target, tolerance)
