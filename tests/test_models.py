"""The model zoo builds every advertised architecture at CIFAR resolution."""
from __future__ import annotations

import pytest
import torch

from pruning.channels import count_flops_params
from pruning.models import build_model


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet56", "resnet110", "vgg16_bn", "mobilenetv2", "torchvision:resnet18"])
def test_models_produce_logits(name):
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_resnet_flops_match_the_literature():
    # ResNet-20 / -56 on CIFAR: 41M and 126M multiply-accumulates with projection shortcuts
    assert count_flops_params(build_model("resnet20", 10), torch.zeros(1, 3, 32, 32))[0] == pytest.approx(41.4e6, rel=0.02)
    assert count_flops_params(build_model("resnet56", 10), torch.zeros(1, 3, 32, 32))[0] == pytest.approx(126.6e6, rel=0.02)


def test_unknown_names_are_rejected_with_the_allowed_ones():
    with pytest.raises(ValueError, match="resnet20"):
        build_model("resnet21", 10)
    with pytest.raises(ValueError, match="unknown torchvision model 'nope'"):
        build_model("torchvision:nope", 10)
