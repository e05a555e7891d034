"""Landing on the target: a scheme that overshoots is given channels back, most important first."""

from __future__ import annotations

import pytest
import torch

from pruning.channels import channel_groups, count_flops_params, group_importance, pruned_copy
from pruning.exact import TOLERANCE, Landing, land_on_target, transplant
from pruning.methods import GlobalMagnitude, Target, Uniform
from pruning.models import build_model
from tests.conftest import self_labelled

X = torch.zeros(1, 3, 32, 32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("resnet20", 10).eval()


@pytest.mark.parametrize("method, round_to, target", [(Uniform, 8, 0.5), (Uniform, 4, 0.6), (GlobalMagnitude, 1, 0.5)])
def test_an_overshooting_scheme_lands_within_half_a_point_above_the_target(model, method, round_to, target):
    coarse = method(round_to=round_to)(model, X, Target(target))
    assert coarse.flops_reduction > target + TOLERANCE  # the case this step exists for
    importance = group_importance(model, X)
    landing = land_on_target(model, X, coarse.scheme, target, importance, round_to=round_to)
    base = count_flops_params(model, X)[0]
    measured = 1 - count_flops_params(pruned_copy(model, X, landing.scheme), X)[0] / base
    assert measured == pytest.approx(landing.reduction) and target <= measured <= target + TOLERANCE
    assert landing.reduction_before == pytest.approx(coarse.flops_reduction)
    added = 0
    for name, kept in coarse.scheme.items():
        assert set(kept) <= set(landing.scheme[name])  # channels are only given back
        extra = len(landing.scheme[name]) - len(kept)
        assert extra % round_to == 0
        added += extra
    assert added == landing.channels_added > 0


@pytest.mark.parametrize("round_to, target", [(16, 0.5)])
def test_when_no_coarse_step_fits_above_the_target_the_closest_one_below_within_the_tolerance_is_taken(model, round_to, target):
    coarse = Uniform(round_to=round_to)(model, X, Target(target))
    importance = group_importance(model, X)
    landing = land_on_target(model, X, coarse.scheme, target, importance, round_to=round_to)
    base = count_flops_params(model, X)[0]
    measured = 1 - count_flops_params(pruned_copy(model, X, landing.scheme), X)[0] / base
    assert measured == pytest.approx(landing.reduction) and target - TOLERANCE <= measured < target
    assert landing.channels_added % round_to == 0 and landing.channels_added > 0
    # said, and carried into the method's fallbacks beside the ones it had
    assert f"no removed channel fits back above the target {target}" in landing.below and "within the tolerance" in landing.below
    info = landing.info({"fallbacks": ["earlier"], "genes": [1]})
    assert info["fallbacks"] == ["earlier", landing.below] and info["genes"] == [1]
    assert "fallbacks" not in Landing(coarse.scheme, 0.6, 0.6, 0).info({})



@pytest.mark.parametrize("method, round_to, target", [(Uniform, 4, 0.55), (GlobalMagnitude, 2, 0.5)])
def test_pricing_each_channel_count_once_lands_where_pricing_every_step_does(model, method, round_to, target):
    """The landing prices a scheme by its channel counts once, and passes over a group's units once one of their size
    did not fit; the result is the one of the plain procedure: bisect the ranked units, then try the next 32 one by one."""
    from pruning.exact import _add, _units

    coarse = method(round_to=round_to)(model, X, Target(target))
    importance = group_importance(model, X)
    base = count_flops_params(model, X)[0]

    def reduction(s):
        return 1 - count_flops_params(pruned_copy(model, X, s), X)[0] / base

    units = _units(coarse.scheme, importance, round_to)
    lo, hi = 0, len(units)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if reduction(_add(coarse.scheme, units[:mid])) >= target else (lo, mid - 1)
    chosen = units[:lo]
    for unit in units[lo + 1 : lo + 33]:
        if reduction(_add(coarse.scheme, [*chosen, unit])) >= target:
            chosen = [*chosen, unit]
    landing = land_on_target(model, X, coarse.scheme, target, importance, round_to=round_to)
    assert len(chosen) > lo + 1  # the one-by-one tries gave units back (two of one group for Uniform): what the shortcuts change
    assert landing.scheme == _add(coarse.scheme, chosen)
    assert landing.reduction == pytest.approx(reduction(landing.scheme))

def test_channels_given_back_are_the_most_important_of_their_group(model):
    coarse = Uniform(round_to=8)(model, X, Target(0.5))
    importance = group_importance(model, X)
    landing = land_on_target(model, X, coarse.scheme, 0.5, importance, round_to=1)
    for name, kept in coarse.scheme.items():
        back = set(landing.scheme[name]) - set(kept)
        left = set(range(len(importance[name]))) - set(landing.scheme[name])
        if back and left:
            assert min(float(importance[name][i]) for i in back) >= max(float(importance[name][i]) for i in left) - 1e-12


def test_a_scheme_short_of_the_target_by_less_than_the_tolerance_is_kept_and_said(model):
    coarse = Uniform(round_to=16)(model, X, Target(0.5))  # removes 0.5278
    landing = land_on_target(model, X, coarse.scheme, coarse.flops_reduction + 0.004, group_importance(model, X), round_to=16)
    assert landing.scheme == coarse.scheme and landing.channels_added == 0
    assert landing.reduction == pytest.approx(coarse.flops_reduction) and "-0.40 points from the target" in landing.below


def test_a_scheme_short_of_the_target_is_refused(model):
    light = Uniform()(model, X, Target(0.2)).scheme
    with pytest.raises(ValueError, match="less than the target 0.5"):
        land_on_target(model, X, light, 0.5, group_importance(model, X))


def test_transplant_keeps_the_trained_weights_and_gives_channels_back_with_the_base_weights():
    model, x, _ = self_labelled(8)
    groups = channel_groups(model, x[:1])
    narrow = {g.name: list(range(0, g.channels, 2)) for g in groups}
    wide = {g.name: sorted({*narrow[g.name], 1, g.channels - 1}) for g in groups}
    trained = pruned_copy(model, x[:1], narrow)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # stands for constrained training
    filled = transplant(trained, model, x[:1], narrow, wide)
    assert count_flops_params(filled, x[:1]) == count_flops_params(pruned_copy(model, x[:1], wide), x[:1])
    # removing the given-back channels again leaves exactly the trained network
    back = pruned_copy(filled, x[:1], {n: [wide[n].index(c) for c in narrow[n]] for n in narrow})
    with torch.no_grad():
        assert torch.allclose(back(x), trained(x), atol=1e-5)
        # and the given-back channels carry the base's weights: filled from the base alone, they are the base's
        base_only = transplant(pruned_copy(model, x[:1], narrow), model, x[:1], narrow, wide)
        assert torch.allclose(base_only(x), pruned_copy(model, x[:1], wide)(x), atol=1e-5)
    with pytest.raises(ValueError, match="not kept by the wider one"):
        transplant(trained, model, x[:1], wide, narrow)
