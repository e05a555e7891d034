"""Channel groups, masking and physical pruning agree; the uniform baseline reaches its target."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pruning.channels import (
    channel_groups, count_flops_params, group_importance, keep_by_importance, mask_channels, prune_channels, pruned_copy,
)
from pruning.methods import METHODS, GlobalMagnitude, RandomRatios, Target, Uniform
from pruning.models import build_model

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _trained_like(name: str) -> nn.Module:
    """A model whose BatchNorm layers hold non-trivial statistics, so zeroed channels really matter."""
    torch.manual_seed(0)
    model = build_model(name, 10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn", "mobilenetv2", "torchvision:resnet18"])
def test_physically_pruned_equals_masked(name):
    model = _trained_like(name)
    groups = channel_groups(model, X[:1])
    keep = keep_by_importance(group_importance(model, X[:1]), {g.name: max(1, g.channels // 3) for g in groups})
    pruned = pruned_copy(model, X[:1], keep)
    masked = mask_channels(copy.deepcopy(model), X[:1], keep)
    with torch.no_grad():
        out_pruned, out_masked, out_orig = pruned(X), masked(X), model(X)
    assert torch.allclose(out_pruned, out_masked, atol=1e-4), (out_pruned - out_masked).abs().max()
    assert not torch.allclose(out_orig, out_masked, atol=1e-2)  # the pruning did change the function
    base_flops, base_params = count_flops_params(model, X)
    flops, params = count_flops_params(pruned, X)
    assert flops < 0.5 * base_flops and params < 0.5 * base_params


def test_residual_channels_share_one_group():
    groups = {g.name: g for g in channel_groups(build_model("resnet20", 10), X[:1])}
    assert len(groups) == 12  # stem+stage1 chain, stage2 chain, stage3 chain, and 9 inner convs
    stem = groups["conv1"]
    assert {"layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2", "layer2.0.conv1"} <= set(stem.layers)
    assert "layer2.0.conv2" not in stem.layers and "fc" not in groups


def test_keep_by_importance_keeps_the_largest():
    keep = keep_by_importance({"g": torch.tensor([0.1, 5.0, 0.3, 2.0])}, {"g": 2})
    assert keep == {"g": [1, 3]}
    with pytest.raises(ValueError, match="cannot keep 0 of 4"):
        keep_by_importance({"g": torch.ones(4)}, {"g": 0})


def test_bad_schemes_are_rejected():
    model = build_model("resnet20", 10)
    with pytest.raises(ValueError, match="does not have"):
        prune_channels(model, X[:1], {"nope": [0]})
    with pytest.raises(ValueError, match=r"conv1.*\[0, 16\)"):
        prune_channels(model, X[:1], {"conv1": [0, 99]})


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_uniform_reaches_the_target(target):
    model = _trained_like("resnet20")
    result = Uniform()(model, X[:1], Target(target))
    assert target <= result.flops_reduction <= target + 0.03
    pruned = pruned_copy(model, X[:1], result.scheme)
    assert count_flops_params(pruned, X)[0] == result.flops
    ratios = {len(result.scheme[g.name]) / g.channels for g in channel_groups(model, X[:1])}
    assert max(ratios) - min(ratios) < 0.1  # one keep ratio everywhere (up to rounding)


def test_uniform_params_target_and_unreachable_target():
    model = _trained_like("resnet20")
    assert Uniform()(model, X[:1], Target(0.4, "params")).params_reduction >= 0.4
    with pytest.raises(ValueError, match="out of reach"):
        Uniform()(model, X[:1], Target(0.9999))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        Target(1.0)


@pytest.mark.parametrize("name", ["uniform", "global-magnitude", "random"])
@pytest.mark.parametrize("model_name", ["resnet20", "mobilenetv2"])
def test_one_shot_baselines_reach_the_target(name, model_name):
    model = _trained_like(model_name)
    result = METHODS[name](seed=0)(model, X[:1], Target(0.5))
    assert 0.5 <= result.flops_reduction <= 0.53
    assert count_flops_params(pruned_copy(model, X[:1], result.scheme), X)[0] == result.flops


def test_global_magnitude_prunes_layers_unevenly_and_random_depends_on_seed():
    model = _trained_like("resnet20")
    groups = channel_groups(model, X[:1])
    g = GlobalMagnitude()(model, X[:1], Target(0.5))
    ratios = [len(g.scheme[grp.name]) / grp.channels for grp in groups]
    assert max(ratios) - min(ratios) > 0.1
    a, b = RandomRatios(seed=0)(model, X[:1], Target(0.5)), RandomRatios(seed=1)(model, X[:1], Target(0.5))
    assert a.scheme != b.scheme and RandomRatios(seed=0)(model, X[:1], Target(0.5)).scheme == a.scheme


@pytest.mark.parametrize("name", ["uniform", "global-magnitude", "random"])
def test_one_shot_baselines_round_channel_counts(name):
    """round_to 8 (onnxruntime's blocked kernels): every kept count is a multiple of 8 or the whole group."""
    model = _trained_like("resnet56")
    groups = {g.name: g.channels for g in channel_groups(model, X[:1])}
    result = METHODS[name](round_to=8, seed=0)(model, X[:1], Target(0.5))
    assert result.flops_reduction >= 0.5
    assert all(len(kept) % 8 == 0 or len(kept) == groups[n] for n, kept in result.scheme.items())


def test_grouped_convolutions_are_pruned_in_equal_slices():
    """A grouped (not depthwise) convolution takes its channels in G slices: every slice keeps the same positions,
    so the group count stays valid (removing single channels once built Conv2d(-64, 32, groups=-64) and crashed
    in the FLOPs counter). A group is one unit per slice position; one that cannot be sliced is left out, and said so."""
    from pruning.channels import left_out_groups

    class Grouped(nn.Module):
        def __init__(self, groups_c: int = 1):
            super().__init__()
            self.a, self.ba = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.g, self.bg = nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32)
            width = 16 if groups_c == 1 else 2 * groups_c
            self.c, self.fc = nn.Conv2d(32, width, 1, groups=groups_c), nn.Linear(width, 10)

        def forward(self, x):
            x = torch.relu(self.bg(self.g(torch.relu(self.ba(self.a(x))))))
            return self.fc(self.c(x).mean((2, 3)))

    torch.manual_seed(0)
    model, x = Grouped().eval(), torch.randn(2, 3, 8, 8)
    for m in (model.ba, model.bg):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
    groups = channel_groups(model, x[:1])
    assert [(g.name, g.channels, g.divisor) for g in groups] == [("a", 4, 4), ("g", 8, 4), ("c", 16, 1)]
    assert groups[0].expand([1, 3]) == [1, 3, 5, 7, 9, 11, 13, 15]
    keep = {"a": [1, 3], "g": [0, 2, 5], "c": list(range(8))}
    pruned = pruned_copy(model, x[:1], keep)
    assert (pruned.g.in_channels, pruned.g.out_channels, pruned.g.groups) == (8, 12, 4)
    with torch.no_grad():
        assert torch.allclose(pruned(x), mask_channels(copy.deepcopy(model), x[:1], keep)(x), atol=1e-5)
    assert count_flops_params(pruned, x[:1])[0] < count_flops_params(model, x[:1])[0]
    assert [len(v) for v in group_importance(model, x[:1]).values()] == [4, 8, 16]
    odd = Grouped(groups_c=32).eval()  # c has one input channel per group: g's slices cannot shrink
    assert [(g.name, g.divisor) for g in channel_groups(odd, x[:1])] == [("a", 4), ("c", 32)]
    assert [(n, "cannot go in equal slices" in why) for n, why in left_out_groups(odd, x[:1])] == [("g", True)]


def test_a_per_channel_parameter_of_a_custom_layer_is_pruned_with_its_channels():
    """ConvNeXt's layer scale is a bare (C, 1, 1) parameter of its block: it scales channels, so it goes with them
    along the one dimension longer than 1."""

    class Scale(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.gain = nn.Parameter(torch.linspace(0.5, 2.0, c).view(1, c, 1, 1))  # channels on dimension 1

        def forward(self, x):
            return x * self.gain

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Scale(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    assert [g.name for g in channel_groups(model, x[:1])] == ["0", "3"]
    keep = {"0": [0, 2, 3, 7], "3": [0, 1, 2, 3]}
    pruned = pruned_copy(model, x[:1], keep)
    assert torch.equal(pruned[1].gain.detach().flatten(), model[1].gain.detach().flatten()[[0, 2, 3, 7]])
    with torch.no_grad():
        assert torch.allclose(pruned(x), mask_channels(copy.deepcopy(model), x[:1], keep)(x), atol=1e-5)


def test_channels_torch_pruning_cannot_follow_are_a_clear_error():
    """ShuffleNetV2 (its channel shuffle between split branches) once crashed inside Torch-Pruning's graph build
    with a bare ZeroDivisionError; it is now named as what it is, with the first layers that shuffle channels.
    Flattening for a linear layer is not named."""
    from torchvision.models import shufflenet_v2_x0_5

    from pruning.channels import UnsupportedLayerError
    from pruning.divide import channel_reshapes

    with pytest.raises(UnsupportedLayerError, match=r"cannot follow the channels of ShuffleNetV2 \(ZeroDivisionError: .*") as err:
        channel_groups(shufflenet_v2_x0_5(num_classes=2).eval(), torch.randn(1, 3, 32, 32))
    assert "channels into another axis at stage2.0 (InvertedResidual): view (1, 48, 4, 4) -> (1, 2, 24, 4, 4); stage2.1" in str(err.value)

    class Flattens(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            return self.fc(self.conv(x).view(x.shape[0], -1))

    assert channel_reshapes(Flattens(), torch.randn(1, 3, 8, 8)) == []


def test_the_output_layer_is_found_by_what_the_model_outputs():
    """Class scores are never pruned, whatever layer makes them (SqueezeNet's last convolution); a module with a
    4-D output (a sub-network) keeps no layer whole, a Linear inside it included (ConvNeXt's block MLP)."""
    from pruning.channels import output_layers

    x = torch.randn(1, 3, 8, 8)
    conv_head = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    assert output_layers(conv_head, x) == [conv_head[2]]
    assert [g.name for g in channel_groups(conv_head, x)] == ["0"]
    linear_head = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).eval()
    assert [g.name for g in channel_groups(linear_head, x)] == ["0", "3"]

    class Headless(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.mlp = nn.Conv2d(3, 8, 3), nn.Linear(8, 8)

        def forward(self, x):
            return self.mlp(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    assert output_layers(Headless().eval(), x) == []
    assert [g.name for g in channel_groups(Headless().eval(), x)] == ["conv", "mlp"]
