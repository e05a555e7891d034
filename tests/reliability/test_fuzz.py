"""Randomly damaged params files and checkpoints (seeded, so every case replays) meet only the project's own
clean errors, never a traceback from deep inside yaml, pydantic, torch, pickle or pymoo."""
from __future__ import annotations

import random

import pytest
import torch
import yaml

from pruning.models import build_model
from pruning.train import ResumeError, TrainConfig, fit
from tasks.checkpoints import CheckpointError, load_model, load_resume, load_user_weights, save_model, save_resume
from tasks.config import ConfigError, load_params
from tasks.preflight import preflight
from tests.conftest import tiny_params, write_params
from tests.reliability.conftest import emoprune

RANDOM_VALUES = [None, True, -1, 0, 1, 7, 10**12, -(10**12), 0.5, -0.5, 1.5, 1e300, float("nan"), float("inf"), "", "x" * 300,
                 "resnet20", "vgg16_bn", "torchvision:nope", [], [1, 2], {}, {"a": 1}, "sqlite:///", "http://:99999"]
# same type as the value replaced, so more cases get past validation into the preflight checks
PLAUSIBLE = {int: [1, 2, 3, 9, 10, 64], float: [0.01, 0.5, 0.99],
             str: ["resnet32", "vgg16_bn", "cifar10", "imagefolder", "whole-emo", "uniform", "random", "binary", "cpu", "params",
                   "sqlite:///sub/dir/m.db", "http://127.0.0.1:9"]}


def _leaves(d: dict, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,)


def _damage_params(text: str, params: dict, rng: random.Random) -> str:
    kind = rng.choice(["flip", "drop-lines", "truncate", "value", "plausible", "plausible", "plausible", "garbage-line", "indent"])
    if kind == "flip":
        raw = bytearray(text.encode())
        for _ in range(rng.randint(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return raw.decode("latin-1") if rng.random() < 0.5 else bytes(raw).decode("utf-8", "surrogateescape")
    lines = text.splitlines()
    if kind == "drop-lines":
        for _ in range(rng.randint(1, 5)):
            lines.pop(rng.randrange(len(lines)))
        return "\n".join(lines)
    if kind == "truncate":
        return text[: rng.randrange(len(text))]
    if kind == "garbage-line":
        lines.insert(rng.randrange(len(lines)), rng.choice(["  : :", "- [", "}{", "\t\tx: 1", "key: *alias", "!!python/object:os.system x"]))
        return "\n".join(lines)
    if kind == "indent":
        i = rng.randrange(len(lines))
        lines[i] = " " * rng.randint(1, 6) + lines[i]
        return "\n".join(lines)
    path = rng.choice(list(_leaves(params)))  # a random key of params.yaml gets a random value
    node = params
    for k in path[:-1]:
        node = node[k]
    old = node[path[-1]]
    node[path[-1]] = rng.choice(PLAUSIBLE.get(type(old), RANDOM_VALUES) if kind == "plausible" else RANDOM_VALUES)
    return yaml.safe_dump(params, sort_keys=False)


@pytest.mark.parametrize("case", range(30))
def test_damaged_params_meet_clean_errors(tmp_path, case):
    rng = random.Random(case)
    params = tiny_params(tmp_path)
    text = yaml.safe_dump(params, sort_keys=False)
    damaged = _damage_params(text, params, rng)
    path = tmp_path / "params.yaml"
    path.write_bytes(damaged.encode("utf-8", "surrogateescape"))
    try:
        p = load_params(path)
    except ConfigError as err:
        assert str(err).strip() and "Traceback" not in str(err)
        return
    try:  # params that validate go on to every stage's preflight checks: a clean refusal or notes, nothing else
        preflight(p, root=tmp_path)
    except ConfigError as err:
        assert str(err).strip()


@pytest.mark.parametrize("case", [0, 3, 5])
def test_damaged_params_through_the_cli(tmp_path, case):
    rng = random.Random(1000 + case)
    params = tiny_params(tmp_path)
    path = write_params(tmp_path / "params.yaml", params)
    path.write_bytes(_damage_params(path.read_text(), params, rng).encode("utf-8", "surrogateescape"))
    out = emoprune("check", cwd=tmp_path, timeout=300)
    assert out.returncode in (0, 2), out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout


def _damage_bytes(blob: bytes, rng: random.Random) -> bytes:
    raw = bytearray(blob)
    kind = rng.choice(["truncate", "flip", "zero-block", "flip"])
    if kind == "truncate":
        return bytes(raw[: rng.randrange(len(raw))])
    if kind == "zero-block":
        start = rng.randrange(len(raw))
        n = min(rng.randint(1, 512), len(raw) - start)
        raw[start:start + n] = bytes(n)
        return bytes(raw)
    for _ in range(rng.randint(1, 8)):
        raw[rng.randrange(len(raw))] ^= rng.randrange(1, 256)  # XOR with a nonzero byte: always a change
    return bytes(raw) if bytes(raw) != blob else _damage_bytes(blob, rng)  # a zeroed block that was zeros already


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    """A model file, a bare state_dict and a resume checkpoint of a real (tiny) training run."""
    root = tmp_path_factory.mktemp("ckpt")
    model = build_model("resnet20", 4)
    save_model(model, root / "model.pt", name="resnet20", num_classes=4, image_size=16)
    torch.save(model.state_dict(), root / "weights.pt")
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
    states = []
    fit(model, [(x, y)], TrainConfig(epochs=1, lr=0.01), torch.device("cpu"), progress=False, on_checkpoint=states.append)
    save_resume(states[0], root / "resume.pt")
    return {name: (root / name).read_bytes() for name in ("model.pt", "weights.pt", "resume.pt")}


def _load(name: str, path) -> None:
    if name == "model.pt":
        load_model(path)
    elif name == "weights.pt":
        load_user_weights(path, "resnet20", 4)
    else:
        state = load_resume(path)
        x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
        fit(build_model("resnet20", 4), [(x, y)], TrainConfig(epochs=2, lr=0.01), torch.device("cpu"), progress=False, resume=state)


def test_damaged_checkpoints_are_refused_by_name(tmp_path, good_files):
    """36 seeded damages (truncation, flipped bytes, zeroed blocks) of three kinds of file. The files emoprune
    writes carry a checksum over everything they hold, so every damage to them is refused with a message
    naming the file. A user's bare state_dict has no checksum: a flipped bit inside its tensor data is
    indistinguishable from other weights, so there only damage to the file's structure must be refused."""
    refused, undetectable = 0, []
    for case in range(36):
        rng = random.Random(case)
        name = ["model.pt", "weights.pt", "resume.pt"][case % 3]
        path = tmp_path / f"{case}-{name}"
        damaged = _damage_bytes(good_files[name], rng)
        assert damaged != good_files[name]
        path.write_bytes(damaged)
        try:
            _load(name, path)
        except (CheckpointError, ResumeError) as err:
            assert str(path) in str(err), err
            refused += 1
            continue
        if name == "weights.pt" and len(damaged) == len(good_files[name]):
            undetectable.append(case)  # same length, bytes changed in place: possibly inside tensor data
            continue
        raise AssertionError(f"case {case}: damaged {name} loaded without error")
    # all 24 damaged files of emoprune's own formats reached the check and were refused; of the 12 bare
    # state_dicts, those cut short or broken in structure were refused, the rest had bytes changed in place
    assert refused + len(undetectable) == 36 and refused >= 24 and all(case % 3 == 1 for case in undetectable), (refused, undetectable)


def test_damaged_checkpoint_through_the_cli(tmp_path, good_files):
    params = tiny_params(tmp_path, **{"model.checkpoint": "weights.pt"})
    write_params(tmp_path / "params.yaml", params)
    blob = good_files["weights.pt"]
    (tmp_path / "weights.pt").write_bytes(blob[: len(blob) // 2])  # a copy cut short
    out = emoprune("check", cwd=tmp_path, timeout=300)
    assert out.returncode == 2 and "model.checkpoint = 'weights.pt'" in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr



def test_resume_checksum_covers_the_whole_training_state(tmp_path, good_files):
    """A change anywhere in a resume checkpoint's state (here one momentum value of the optimizer, written back
    as a valid torch file with the old checksum) is refused: the checksum is not over the weights alone."""
    path = tmp_path / "resume.pt"
    path.write_bytes(good_files["resume.pt"])
    blob = torch.load(path, weights_only=True)
    buffers = [s["momentum_buffer"] for s in blob["optimizer"]["state"].values() if "momentum_buffer" in s]
    assert buffers, "the fixture's optimizer state holds no momentum buffer to alter"
    buffers[0].add_(1.0)
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_resume(path)
