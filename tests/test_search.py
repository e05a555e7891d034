"""The per-sub-network NSGA-II search: valid fronts, both encodings, resumable with identical results."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from pruning.channels import count_flops_params, group_importance, pruned_copy
from pruning.divide import boundary_features, divide
from pruning.emodir import SearchSettings
from pruning.models import build_model
from pruning.search import (
    BoundaryGene,
    Scorer,
    SearchSpace,
    _Search,
    choose_for_target,
    group_exclusions,
    prunable_groups,
    recalibrate_bn,
    run_search,
    spread_indices,
)
from pruning.selectors import FeatureSelector, folded, selector_accuracy, train_selector
from tests.conftest import self_labelled


@pytest.fixture(scope="module")
def setting():
    model, x, y = self_labelled(80)
    subs, head = divide(model, x[:1], 3)
    feats, _ = boundary_features(subs, x)
    sub = subs[2]
    ex = feats[2][:1]
    scorer = Scorer(head, feats[2][:32], feats[2][32:], y[32:])
    space = SearchSpace(tuple(prunable_groups(sub.module, ex)))
    return sub, ex, scorer, space


def _nondominated(points):
    return all(not any(b != a and b[0] <= a[0] and b[1] <= a[1] for b in points) for a in points)


def test_boundary_channels_are_not_genes(setting):
    sub, ex, _, space = setting
    names = [g.name for g in space.groups]
    assert names == ["0.conv1", "1.conv1", "2.conv1"]  # the residual chain feeding X_3 keeps its width
    scheme = space.decode(space.uniform(0.5), group_importance(sub.module, ex))
    with torch.no_grad():
        assert pruned_copy(sub.module, ex, scheme)(ex).shape == sub.module(ex).shape


def test_groups_left_out_are_listed_with_the_reason_and_other_errors_are_raised(setting):
    sub, ex, _, space = setting
    kept, excluded = group_exclusions(sub.module, ex)
    assert [g.name for g in kept] == [g.name for g in space.groups]
    assert excluded == [("0.conv2", "reaches the output: the boundary keeps its channels")]

    # a block whose identity shortcut adds its input: the chain it writes is the input's, which stays whole
    block = build_model("resnet20", 10).eval().layer1[1]
    kept, excluded = group_exclusions(block, torch.randn(1, 16, 32, 32))
    assert [g.name for g in kept] == ["conv1"] and [name for name, _ in excluded] == ["conv2"]
    assert "one channel fewer: The size of tensor a (15) must match the size of tensor b (16)" in excluded[0][1]

    class Fussy(torch.nn.Module):  # a forward that fails for a reason other than a channel mismatch
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            h = self.a(x)
            if h.shape[1] != 8:
                raise RuntimeError("a defect in the model's own code")
            return self.b(h)

    with pytest.raises(RuntimeError, match="a defect in the model's own code"):
        group_exclusions(Fussy().eval(), torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("encoding", ["levels", "binary"])
def test_front_is_nondominated_and_costs_are_real(setting, encoding):
    sub, ex, scorer, space = setting
    space = SearchSpace(space.groups, encoding=encoding)
    front = run_search(sub.module, ex, scorer, space=space, pop_size=6, generations=3, seed=0)
    pts = [(m.cost, m.error) for m in front.members]
    assert len(pts) >= 2 and _nondominated(pts)
    assert pts == sorted(pts)
    base = count_flops_params(sub.module, ex)[0]
    imp = group_importance(sub.module, ex)
    for m in front.members:
        pruned = pruned_copy(sub.module, ex, space.decode(m.genes, imp))
        assert count_flops_params(pruned, ex)[0] == m.flops and m.cost == pytest.approx(m.flops / base)
    assert [h["generation"] for h in front.history] == [1, 2, 3]
    assert front.history[-1]["hypervolume"] >= front.history[0]["hypervolume"]  # the archive never loses ground


def test_killed_search_resumes_to_the_same_front(setting):
    sub, ex, scorer, space = setting
    states = []
    full = run_search(
        sub.module, ex, scorer, space=space, pop_size=6, generations=4, seed=3, on_generation=lambda g, m, blob: states.append(blob)
    )
    assert len(states) == 4 and "algorithm" in pickle.loads(states[1])
    resumed = run_search(sub.module, ex, scorer, space=space, pop_size=6, generations=4, seed=3, state=states[1])
    assert [(m.genes, m.cost, m.error) for m in resumed.members] == [(m.genes, m.cost, m.error) for m in full.members]
    assert resumed.history == full.history and resumed.evaluations == full.evaluations
    # every evaluation re-estimates BatchNorm on the calibration inputs and scores the val inputs, and the
    # checkpoint carries the count across the resume
    assert full.images.forwarded == full.evaluations * (len(scorer.calib) + len(scorer.val_x)) > 0
    assert resumed.images == full.images and full.images.trained == 0
    other = run_search(sub.module, ex, scorer, space=space, pop_size=6, generations=4, seed=4)
    assert other.history != full.history  # the seed matters


def test_spread_and_choice_helpers():
    assert spread_indices([0.1, 0.2, 0.3, 0.4, 0.5, 1.0], 3) == [0, 2, 4]
    assert spread_indices([0.1, 1.0], 0) == [0]
    costs, errors = [0.2, 0.45, 0.5, 0.7], [0.9, 0.3, 0.35, 0.1]
    assert choose_for_target(costs, errors, 0.5, 0.02) == (2, None)  # only 0.5 is within target..target+2pp
    assert choose_for_target(costs, errors, 0.5, 0.1) == (1, None)  # 0.45 is allowed and more accurate
    # nothing within 0.4..0.42: the most accurate member that removes more, and the note says so
    index, note = choose_for_target(costs, errors, 0.4, 0.02)
    assert index == 1 and "no front member removes between 0.4 and 0.4200" in note and "(0.5500)" in note
    with pytest.raises(ValueError, match="at most 0.8000"):
        choose_for_target(costs, errors, 0.9, 0.02)


def test_bf16_scoring_ranks_like_fp32(setting):
    """The search's scoring pass under bf16 autocast: not the fp32 numbers (autocast is on), but the same
    order of candidates within rounding, and BatchNorm statistics re-estimated in fp32 either way."""
    sub, ex, scorer, space = setting
    imp = group_importance(sub.module, ex)
    fast = Scorer(scorer.selector, scorer.calib, scorer.val_x, scorer.val_y, precision="bf16")
    modules = [pruned_copy(sub.module, ex, space.decode(space.uniform(f), imp)) for f in (0.2, 0.5, 1.0)]
    exact, rounded = [scorer(m) for m in modules], [fast(m) for m in modules]
    assert exact != rounded and max(abs(a - b) for a, b in zip(exact, rounded)) < 0.02 * max(exact)
    assert sorted(range(3), key=exact.__getitem__) == sorted(range(3), key=rounded.__getitem__)
    with pytest.raises(ValueError, match="precision 'fp16' is not supported; allowed: auto, bf16, fp32"):
        Scorer(scorer.selector, scorer.calib, scorer.val_x, scorer.val_y, precision="fp16")


def test_scoring_runs_channels_last_with_the_selector_folded_and_keeps_the_error():
    """The search's scoring pass runs in channels_last with the selector's BatchNorm folded into its
    convolution: the selector error is the plain NCHW pass's with the selector as trained, to rounding."""
    model, x, y = self_labelled(96)
    subs, _ = divide(model, x[:1], 3)
    feats, _ = boundary_features(subs, x)
    g = train_selector(feats[1], y, 10, epochs=2, seed=0)  # BatchNorm statistics of its own, not the init's
    f = folded(g)
    assert isinstance(f.bn, torch.nn.Identity) and isinstance(g.bn, torch.nn.BatchNorm2d)  # a copy: g untouched
    ex = feats[0][:1]
    space = SearchSpace(tuple(prunable_groups(subs[0].module, ex)))
    scheme = space.decode(space.uniform(0.5), group_importance(subs[0].module, ex))
    module = pruned_copy(subs[0].module, ex, scheme)
    reference = pruned_copy(subs[0].module, ex, scheme)
    recalibrate_bn(reference, feats[0][:32], 256, torch.device("cpu"))
    with torch.no_grad():
        expected = F.cross_entropy(g(reference(feats[0][32:])), y[32:]).item()
    layouts = []

    def watch(conv):
        conv.register_forward_hook(lambda m, inp, out: layouts.append(inp[0].is_contiguous(memory_format=torch.channels_last)))

    watch(next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d)))
    scorer = Scorer(g, feats[0][:32], feats[0][32:], y[32:])
    assert isinstance(scorer.selector.bn, torch.nn.Identity)  # the selector it scores with is the folded one
    watch(scorer.selector.conv)
    assert scorer(module) == pytest.approx(expected, rel=1e-4)
    assert len(layouts) > 2 and all(layouts)  # BatchNorm re-estimation, the val pass and the selector: channels_last
    layouts.clear()
    plain = Scorer(g, feats[0][:32], feats[0][32:], y[32:], channels_last=False)
    watch(plain.selector.conv)
    assert plain(module) == pytest.approx(expected, rel=1e-4)
    assert len(layouts) > 2 and not any(layouts)
    head = torch.nn.Sequential(torch.nn.Conv2d(16, 10, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    Scorer(head, feats[0][:32], feats[0][32:], y[32:])
    assert head[0].weight.is_contiguous()  # a caller's module (a model's own head) is not converted in place


def test_selector_pools_maps_wider_than_sixteen():
    """A selector reads a 32x32 map pooled 2x2 (the same work as a 16x16 map), a 56x56 one pooled 4x4 (a whole
    factor, to 14x14); maps of 16 or less as they are."""
    torch.manual_seed(0)
    g = FeatureSelector(8, 10).eval()
    wide, wider, narrow = torch.randn(2, 8, 32, 32), torch.randn(2, 8, 56, 56), torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        assert torch.allclose(g(wide), g(F.avg_pool2d(wide, 2)), atol=1e-6)
        assert torch.allclose(g(wider), g(F.avg_pool2d(wider, 4)), atol=1e-6)
        assert not torch.allclose(g(narrow), g(F.avg_pool2d(narrow, 2)), atol=1e-3)


def test_candidates_are_spread_by_cost_and_crowd_near_the_target():
    # by cost, not by position: four members crowd at 0.1-0.14, the middle pick is the one nearest 0.5
    assert spread_indices([0.1, 0.11, 0.12, 0.13, 0.14, 0.9, 1.0], 3) == [0, 4, 5]
    costs = [round(0.05 + 0.01 * i, 2) for i in range(91)]  # 0.05 .. 0.95
    even = [costs[i] for i in spread_indices(costs, 6)]
    assert even == [0.05, 0.23, 0.41, 0.59, 0.77, 0.95]
    near = [costs[i] for i in spread_indices(costs, 6, target=0.5)]  # cost 0.5 is the target's
    # half over the whole front, ends included; half within 0.1 of 0.5 (0.5 itself taken: the next nearest)
    assert near == [0.05, 0.45, 0.49, 0.5, 0.55, 0.95]
    assert [costs[i] for i in spread_indices(costs, 4, target=0.3)] == [0.05, 0.67, 0.73, 0.95]  # cost 0.7
    assert spread_indices(costs, 0, target=0.5) == list(range(91))
    assert [costs[i] for i in spread_indices(costs, 1, target=0.5)] == [0.5]  # one candidate: at the target
    assert [costs[i] for i in spread_indices(costs, 2, target=0.5)] == [0.05, 0.5]


def test_genes_that_decode_to_one_network_are_evaluated_once(setting):
    sub, ex, scorer, space = setting
    calls = []
    rounded = SearchSpace(space.groups, levels=10, round_to=8)  # 64-channel groups: levels 2 and 3 both keep 16
    search = _Search(sub.module, ex, rounded, lambda m: calls.append(1) or float(scorer(m)), "flops")
    a, b = [2] * len(space.groups), [3] * len(space.groups)
    assert rounded.network_key(a) == rounded.network_key(b)
    assert search(a) == search(b) and search.evaluations == 1 and len(calls) == 1
    search([10] * len(space.groups))
    assert search.evaluations == 2 and len(calls) == 2
    binary = SearchSpace(space.groups, encoding="binary")  # an all-zero group keeps its most important channel
    n = binary.n_var
    assert binary.network_key([0] * n) == binary.network_key(
        ([1] + [0] * (space.groups[0].channels - 1)) + [0] * (n - space.groups[0].channels)
    )


def test_selector_learns_separable_features():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (120,))
    x = torch.randn(120, 8, 4, 4) * 0.1 + torch.nn.functional.one_hot(y, 8).float()[:, :, None, None]
    g = train_selector(x[:90], y[:90], 3, epochs=30, lr=1e-2)
    assert selector_accuracy(g, x[90:], y[90:]) > 0.9
    assert not any(p.requires_grad for p in g.parameters())


def test_round_to_keeps_channel_counts_on_multiples(setting):
    _, _, _, space = setting
    rounded = SearchSpace(space.groups, levels=10, round_to=16)
    for level in range(1, 11):
        counts = rounded.keep_counts([level] * len(space.groups))
        assert all(c % 16 == 0 and 16 <= c <= 64 for c in counts.values()), counts


def test_min_keep_bounds_every_inner_group_from_below(setting):
    """search.min_keep: no channel group of any evaluated network keeps less than that fraction, where the
    unbounded search does go below it; a bad fraction fails naming min_keep."""
    sub, ex, scorer, space = setting
    assert SearchSpace(space.groups, min_keep=0.25).min_level == 3 and SearchSpace(space.groups).min_level == 1

    def smallest_share(space_):
        front = run_search(sub.module, ex, scorer, space=space_, pop_size=8, generations=3, seed=0)
        return min(space_.keep_counts(m.genes)[g.name] / g.channels for m in front.members for g in space_.groups)

    assert smallest_share(space) < 0.3  # unbounded, the search cuts some group below 30%
    bounded = SearchSpace(space.groups, levels=10, min_keep=0.3)
    assert bounded.bounds[0].min() == 3 and bounded.uniform(0.1).min() == 3
    assert smallest_share(bounded) >= 0.3
    # the floor holds whatever the rounding: level 3 of 64 channels is 19, and round_to 8 would give 16
    assert min(bounded.keep_counts([3] * len(space.groups)).values()) >= 20
    assert min(SearchSpace(space.groups, round_to=8, min_keep=0.3).keep_counts([1] * len(space.groups)).values()) == 24
    with pytest.raises(ValueError, match="min_keep"):
        SearchSettings(min_keep=1.0)  # the API's settings fail before any work
    with pytest.raises(ValueError, match="binary"):
        SearchSpace(space.groups, encoding="binary", min_keep=0.2)


def test_boundary_genes_refuse_binary_encoding():
    """Boundary genes are width levels: a binary space with boundary genes fails when built, naming both."""
    gene = BoundaryGene("b", 4, ((0, 1, 2, 3), (0, 1)), reads=1)
    assert SearchSpace((), boundary=(gene,)).n_var == 1
    with pytest.raises(ValueError, match="boundary genes need encoding 'levels'"):
        SearchSpace((), encoding="binary", boundary=(gene,))


def test_genes_exclude_groups_reaching_a_boundary_inside_a_stage():
    """K=2 cuts ResNet-20 inside stage 2: its residual chain reaches the second sub-network's input
    (an identity shortcut adds X_1), so there only the inner convs are genes; S_1 holds all of stage 1's
    residual chain, which is a gene. Every gene prunes cleanly."""
    model = build_model("resnet20", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    subs, _ = divide(model, x[:1], 2)
    feats, _ = boundary_features(subs, x)
    assert subs[1].block_names[0].startswith("layer2.") and subs[1].block_names[0] != "layer2.0"
    for k, sub in enumerate(subs):
        ex = feats[k][:1]  # X_k, the input of S_{k+1}
        groups = prunable_groups(sub.module, ex)
        inner = [g.name for g in groups if g.name.endswith("conv1")]
        assert inner and len(groups) == len(inner) + (k == 0), [g.name for g in groups]
        for g in groups:
            probe = pruned_copy(sub.module, ex, {g.name: list(range(g.channels // 2))})
            assert probe(ex).shape == sub.module(ex).shape


def test_batchnorm_re_estimation_averages_the_inputs_and_restores_the_momentum():
    """Statistics = the plain mean and variance over the images; the BatchNorm's momentum is put back, so training
    afterwards in the same process (the API's finetuning) keeps its usual running average."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from pruning.emodir import reestimate_bn

    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, momentum=0.1)
    model = nn.Sequential(conv, bn)
    x = torch.randn(40, 3, 8, 8) * 2 + 1
    loader = DataLoader(TensorDataset(x, torch.zeros(40)), batch_size=16)
    assert reestimate_bn(model, loader, 32, "cpu") == 32  # the first 32 images of the loader
    with torch.no_grad():
        z = conv(x[:32])
    assert torch.allclose(bn.running_mean, z.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, z.var(dim=(0, 2, 3), unbiased=False), rtol=1e-2)
    assert bn.momentum == 0.1 and not model.training
    assert reestimate_bn(model, loader, 0, "cpu") == 0
