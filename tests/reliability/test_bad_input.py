"""Every bad input is refused before any work by the real `emoprune` process: exit code 2, the message names
the key and the bad value, and the project folder is left exactly as it was."""
from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from pruning.channels import UnsupportedLayerError, channel_groups
from pruning.models import build_model
from tests.conftest import tiny_params, write_params
from tests.reliability.conftest import emoprune, snapshot


def _set(params: dict, dotted: str, value) -> None:
    section, _, key = dotted.rpartition(".")
    (params.setdefault(section, {}) if section else params)[key] = value


def _cifar_with_a_damaged_batch(root):
    folder = root / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).write_bytes(b"not the real batch")
    return "cifar"


def _imagefolder_with_a_damaged_image(root):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / "images" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / "images" / split / c / "0.png")
    (root / "images" / "train" / "dog" / "0.png").write_bytes(b"\x89PNG truncated")
    return "images"


def _weights(root, name="resnet20"):
    torch.save(build_model(name, 10).state_dict(), root / "weights.pt")
    return "weights.pt"


MIXING_MODEL = """
import torch
from torch import nn


class Mix(nn.Module):  # a custom layer mixing channels through its own matrix: channel pruning cannot follow it
    def __init__(self, c):
        super().__init__()
        self.matrix = nn.Parameter(torch.eye(c))

    def forward(self, x):
        return torch.einsum("oc,nchw->nohw", self.matrix, x)


def build(num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(Mix(8), nn.ReLU()), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))
"""


def _mixing_model(root):
    (root / "mixing.py").write_text(MIXING_MODEL)
    return "python:mixing:build"


def _garbage(root):
    (root / "weights.pt").write_bytes(b"PK\x03\x04 this is no torch file" * 20)
    return "weights.pt"


# (id, {key: value or a function of the project folder returning the value}, command, what the message must name)
CASES = [
    ("misspelled-key", {"prune.targte": 0.5}, "check", ["prune.targte", "unknown key"]),
    ("unknown-section", {"pruen": {"target": 0.5}}, "check", ["pruen", "unknown key"]),
    ("wrong-type", {"data.batch_size": "many"}, "check", ["data.batch_size = 'many'", "integer"]),
    ("bool-for-number", {"pretrain.epochs": True}, "check", ["pretrain.epochs = True", "not a boolean"]),
    ("ratio-above-1", {"data.val_fraction": 1.5}, "check", ["data.val_fraction = 1.5", "less than 1"]),
    ("ratio-0", {"prune.target": 0.0}, "check", ["prune.target = 0.0", "greater than 0"]),
    ("target-out-of-reach", {"prune.target": 0.97}, "stage search", ["prune.target = 0.97", "out of reach", "at most 0.93"]),
    # every inner group kept at half or more: the reach falls, and the check before the search knows it
    ("out-of-reach-with-min-keep", {"prune.target": 0.8, "search.min_keep": 0.5}, "stage search",
     ["prune.target = 0.8", "out of reach", "search.min_keep 0.5", "at most 0.7437"]),
    ("min-keep-1", {"search.min_keep": 1.0}, "check", ["search.min_keep = 1.0", "less than 1"]),
    ("channels-last-maybe", {"finetune.channels_last": "maybe"}, "check", ["finetune.channels_last = 'maybe'", "'auto'"]),
    ("k-above-blocks", {"divide.k": 12}, "check", ["divide.k = 12", "10 blocks", "1..9"]),
    ("missing-data-root", {"data.source": "imagefolder", "data.root": "nowhere"}, "stage prepare", ["data.root = 'nowhere'", "no such folder"]),
    ("damaged-cifar-root", {"data.source": "cifar10", "data.root": _cifar_with_a_damaged_batch}, "check",
     ["data.root = 'cifar'", "data_batch_1", "corrupted"]),
    ("damaged-image-root", {"data.source": "imagefolder", "data.root": _imagefolder_with_a_damaged_image}, "check",
     ["data.root = 'images'", "dog/0.png", "not a readable image"]),
    ("missing-checkpoint", {"model.checkpoint": "absent.pt"}, "stage pretrain", ["model.checkpoint = 'absent.pt'", "does not exist"]),
    ("damaged-checkpoint", {"model.checkpoint": _garbage}, "stage pretrain", ["model.checkpoint = 'weights.pt'", "not a readable torch file"]),
    ("checkpoint-of-another-model", {"model.checkpoint": _weights, "model.name": "resnet32"}, "stage pretrain",
     ["model.checkpoint = 'weights.pt'", "does not fit model 'resnet32'", "missing"]),
    ("unsupported-layer", {"model.name": _mixing_model}, "check",
     ["model.name = 'python:mixing:build'", "'1.0' (Mix)", "'matrix' of shape (8, 8)", "per-channel parameters"]),
    ("image-too-small", {"model.name": "vgg16_bn", "data.image_size": 16}, "check", ["data.image_size = 16", "vgg16_bn"]),
    ("unreachable-mlflow-server", {"tracking.uri": "http://127.0.0.1:9"}, "run", ["tracking.uri = 'http://127.0.0.1:9'", "nothing answers"]),
    ("unwritable-mlflow-store", {"tracking.uri": "sqlite:///params.yaml/mlflow.db"}, "check",
     ["tracking.uri = 'sqlite:///params.yaml/mlflow.db'", "is a file"]),
    ("memory-budget-too-small", {"resources.memory_budget_mb": 16}, "check", ["resources.memory_budget_mb = 16", "needs about"]),
    ("no-cuda", {"device": "cuda"} if not torch.cuda.is_available() else {"device": "cuda:99"}, "check", ["device = 'cuda"]),
]


@pytest.mark.parametrize("changes, command, named", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_fast_naming_the_value(tmp_path, changes, command, named):
    params = tiny_params(tmp_path)
    for key, value in changes.items():
        _set(params, key, value(tmp_path) if callable(value) else value)
    write_params(tmp_path / "params.yaml", params)
    before = snapshot(tmp_path)
    out = emoprune(*command.split(), cwd=tmp_path, timeout=300)
    message = out.stderr + out.stdout
    assert out.returncode == 2, message
    for fragment in named:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert "Traceback" not in message
    assert snapshot(tmp_path) == before  # nothing created, changed or half-written


def test_unsupported_layer_in_a_users_model_is_named_with_its_path():
    class Mix(nn.Module):  # a custom layer mixing channels through its own matrix: the dependency graph cannot follow it
        def __init__(self, c):
            super().__init__()
            self.matrix = nn.Parameter(torch.eye(c))

        def forward(self, x):
            return torch.einsum("oc,nchw->nohw", self.matrix, x)

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(Mix(8), nn.ReLU()), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(UnsupportedLayerError, match=r"layer '1\.0' \(Mix\) holds parameter 'matrix' of shape \(8, 8\).*supported"):
        channel_groups(model, torch.zeros(1, 3, 8, 8))


def test_all_problems_are_listed_at_once(tmp_path):
    params = tiny_params(tmp_path)
    params["divide"]["k"] = 40
    params["tracking"]["uri"] = "http://127.0.0.1:9"
    write_params(tmp_path / "params.yaml", params)
    out = emoprune("check", cwd=tmp_path, timeout=300)
    assert out.returncode == 2
    assert "2 problems" in out.stderr and "divide.k = 40" in out.stderr and "tracking.uri" in out.stderr


def test_good_params_pass_and_check_prints_them(tmp_path):
    write_params(tmp_path / "params.yaml", tiny_params(tmp_path))
    out = emoprune("check", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["divide"]["k"] == 3
