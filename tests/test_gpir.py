"""GPIR on real sub-network candidates: the impairment table, the joint scheme, the merged whole model."""
from __future__ import annotations

import copy

import pytest
import torch

from pruning.channels import count_flops_params, group_importance, pruned_copy
from pruning.constrain import FeatureStream, train_constrained
from pruning.divide import assemble, boundary_features, divide
from pruning.emodir import ConstrainSettings, constrain_subnetwork
from pruning.gpir import accuracy_with, impairment_table, joint_pareto, joint_scheme, merge_into
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


def _duplicated_chain(n: int = 256):
    """Two sub-networks whose boundary X_1 has 4 channels, 2 and 3 copies of 0 and 1: S_2 reads all four with equal
    weights, so dropping channels 2-3 halves its input, while a successor reading only 0-1 with doubled weights
    computes exactly what S_2 does. Returns (subnetworks, head, features, labels, s1, s2)."""
    from torch import nn

    from pruning.divide import SubNetwork

    torch.manual_seed(0)
    s1 = nn.Conv2d(3, 2, 1, bias=False)
    s1_dup = nn.Sequential(s1, nn.Conv2d(2, 4, 1, bias=False))
    with torch.no_grad():
        s1_dup[1].weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1]]).view(4, 2, 1, 1))
    s2 = nn.Sequential(nn.Conv2d(4, 3, 1, bias=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        w = torch.randn(3, 2)
        s2[0].weight.copy_(torch.cat([w, w], 1).view(3, 4, 1, 1) / 2)
        s2[0].bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    subs = [SubNetwork(1, s1_dup.eval(), ["s1"], 100, 10, (3, 4, 4), (4, 4, 4)),
            SubNetwork(2, s2.eval(), ["s2"], 100, 10, (4, 4, 4), (3,))]
    x = torch.randn(n, 3, 4, 4)
    with torch.no_grad():
        x1 = s1_dup(x)
        x2 = s2(x1)
    return subs, nn.Identity(), [x, x1, x2], x2.argmax(1), s1_dup, s2


def test_a_candidate_narrowing_a_boundary_is_scored_beside_an_adapted_successor():
    """Alone, a candidate that writes only channels 0-1 of X_1 is followed by the original S_2 reading zeros in
    2-3, and loses much; beside the successor candidate that reads 0-1 the pair loses exactly what that successor
    loses alone, so the candidate's paired impairment is 0. Candidates no successor reads keep their measurement."""
    import copy

    from torch import nn

    from pruning.boundary import BoundaryIO
    from pruning.gpir import paired_impairments

    subs, head, feats, y, s1, s2 = _duplicated_chain()
    narrow = BoundaryIO(copy.deepcopy(s1[0]), out_keep=[0, 1], out_channels=4).eval()  # channels 0-1 only: width option 1
    reader = copy.deepcopy(s2)
    with torch.no_grad():
        reader[0] = nn.Conv2d(2, 3, 1, bias=True)
        reader[0].weight.copy_(s2[0].weight[:, :2] * 2)
        reader[0].bias.copy_(s2[0].bias + torch.tensor([0.0, 1.5, 0.0]))  # and loses a little on its own
    reader = BoundaryIO(reader.eval(), in_keep=[0, 1]).eval()  # reads width option 1
    half = copy.deepcopy(s2).eval()  # a successor at full width, to check full-width rows are left alone
    cands = [[(narrow, 60)], [(reader, 90), (half, 50)]]
    options = [[(0, 1)], [(1, 0), (0, 0)]]
    base_acc, table = impairment_table(subs, head, cands, [100, 100], feats, y, options=options)
    alone = table[0][1]["impairment"]
    assert base_acc == 1.0 and alone > 0.1  # zeros in half the channels S_2 reads
    own = table[1][1]["impairment"]
    assert own > 0.02  # the reader alone, after the original S_1 (it reads only channels 0-1 of it)
    before = copy.deepcopy(table)
    assert paired_impairments(subs, head, table, [[narrow], [reader, half]], base_acc, feats, y) == 1
    # the pair computes what the reader does after the original S_1: all its loss is the reader's own
    assert table[0][1]["impairment"] == pytest.approx(0.0, abs=1e-12) and table[0][1]["impairment_alone"] == alone
    assert table[0][1]["paired_with"] == 0
    assert table[1] == before[1]  # the last sub-network writes nothing another reads: untouched
