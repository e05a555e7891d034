"""Landing on the target: a scheme that overshoots is given channels back, most important first."""
from __future__ import annotations

import pytest
import torch

from pruning.channels import count_flops_params, group_importance, pruned_copy
from pruning.exact import TOLERANCE, land_on_target
from pruning.methods import GlobalMagnitude, Target, Uniform
from pruning.models import build_model

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


def test_channels_given_back_are_the_most_important_of_their_group(model):
    coarse = Uniform(round_to=8)(model, X, Target(0.5))
    importance = group_importance(model, X)
    landing = land_on_target(model, X, coarse.scheme, 0.5, importance, round_to=1)
    for name, kept in coarse.scheme.items():
        back = set(landing.scheme[name]) - set(kept)
        left = set(range(len(importance[name]))) - set(landing.scheme[name])
        if back and left:
            assert min(float(importance[name][i]) for i in back) >= max(float(importance[name][i]) for i in left) - 1e-12


def test_a_scheme_short_of_the_target_is_refused(model):
    light = Uniform()(model, X, Target(0.2)).scheme
    with pytest.raises(ValueError, match="less than the target 0.5"):
        land_on_target(model, X, light, 0.5, group_importance(model, X))
