"""The model zoo builds every advertised architecture at CIFAR resolution."""

from __future__ import annotations

import re

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


USER_MODEL = """
import torch.nn as nn


def build(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


def not_a_model():
    return "a string"
"""


def test_a_users_own_model_builds_from_its_import_path(tmp_path, monkeypatch):
    import sys

    from tasks.sources import fingerprint

    (tmp_path / "mynets.py").write_text(USER_MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the project folder is put on it; undone after the test
    monkeypatch.delitem(sys.modules, "mynets", raising=False)
    model = build_model("python:mynets:build", 7)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    for name, message in [
        ("python:mynets", "expected python:<module>:<callable>"),
        ("python:nosuchmodule:build", "cannot import module 'nosuchmodule'"),
        ("python:mynets:biuld", "has no callable 'biuld'; it has: build, not_a_model"),
        ("python:mynets:not_a_model", "returned str, not a torch.nn.Module"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            build_model(name, 7)
    # the sources stage fingerprints the model's code, so an edit reruns what builds the model
    before = fingerprint({"model": {"name": "python:mynets:build"}})["model_code"]
    (tmp_path / "mynets.py").write_text(USER_MODEL + "\n# edited\n")
    assert fingerprint({"model": {"name": "python:mynets:build"}})["model_code"]["digest"] != before["digest"]
    assert before["files"] == 1
