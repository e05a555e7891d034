"""Data sources and splits, and model files that rebuild pruned architectures."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pruning.channels import channel_groups, group_importance, keep_by_importance, pruned_copy
from pruning.models import build_model
from tasks.checkpoints import CheckpointError, load_model, load_resume, load_user_weights, save_model, save_resume
from tasks.config import DataParams
from tasks.datasets import DataError, load_split, prepare


def test_digits_split_is_stratified_disjoint_and_deterministic(tmp_path):
    meta = prepare(DataParams(), seed=0, out_dir=tmp_path / "a")
    assert meta["num_classes"] == 10 and meta["materialized"]
    assert sum(meta["counts"].values()) == 1797
    again = prepare(DataParams(), seed=0, out_dir=tmp_path / "b")
    assert again["fingerprint"] == meta["fingerprint"]
    assert prepare(DataParams(), seed=1, out_dir=tmp_path / "c")["fingerprint"] != meta["fingerprint"]
    splits = {s: torch.load(tmp_path / "a" / f"{s}.pt") for s in ("train", "val", "test")}
    # disjoint: no image appears in two splits (digits has a few exact duplicates, so compare counts of unique rows)
    flat = {s: {bytes(x.numpy().tobytes()) for x in b["images"]} for s, b in splits.items()}
    assert len(flat["val"] & flat["train"]) <= 2 and len(flat["test"] & flat["val"]) <= 2
    val_counts = np.bincount(splits["val"]["labels"].numpy(), minlength=10)
    assert val_counts.min() >= 12 and val_counts.max() <= 16  # stratified: ~14 per class
    x, y = load_split(tmp_path / "a", "train", train=True)[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= int(y) < 10


def _image_folder(root, n_per_class=6, classes=("cat", "dog", "emu")):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n_per_class):
                Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


@pytest.mark.parametrize("materialize", ["yes", "no"])
def test_imagefolder_source(tmp_path, materialize):
    _image_folder(tmp_path / "raw")
    p = DataParams(source="imagefolder", root=str(tmp_path / "raw"), val_fraction=0.34, materialize=materialize)
    meta = prepare(p, seed=0, out_dir=tmp_path / "prep")
    assert meta["classes"] == ["cat", "dog", "emu"] and meta["materialized"] == (materialize == "yes")
    assert meta["counts"] == {"train": 11, "val": 7, "test": 18}
    for split in ("train", "val", "test"):
        x, _ = load_split(tmp_path / "prep", split, train=split == "train")[0]
        assert x.shape == (3, 32, 32)


def test_missing_data_roots_are_named(tmp_path):
    with pytest.raises(DataError, match="train/ and val/ or test/"):
        prepare(DataParams(source="imagefolder", root=str(tmp_path / "nowhere")), 0, tmp_path / "p")
    with pytest.raises(DataError, match="data.root is required"):
        prepare(DataParams(source="cifar10"), 0, tmp_path / "p")
    with pytest.raises(DataError, match=str(tmp_path)):
        prepare(DataParams(source="cifar10", root=str(tmp_path)), 0, tmp_path / "p")
    assert not (tmp_path / "p" / "meta.json").exists()


def test_pruned_model_file_round_trip(tmp_path):
    model = build_model("resnet20", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    groups = channel_groups(model, x[:1])
    keep = keep_by_importance(group_importance(model, x[:1]), {g.name: g.channels // 2 for g in groups})
    pruned = pruned_copy(model, x[:1], keep)
    save_model(pruned, tmp_path / "p.pt", name="resnet20", num_classes=10, image_size=32, scheme=keep)
    loaded, meta = load_model(tmp_path / "p.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert meta["scheme"] == keep


def test_user_checkpoints(tmp_path):
    model = build_model("resnet20", 10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "dp.pt")
    loaded = load_user_weights(tmp_path / "dp.pt", "resnet20", 10)
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)
    with pytest.raises(CheckpointError, match="does not fit model 'resnet32'"):
        load_user_weights(tmp_path / "dp.pt", "resnet32", 10)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_user_weights(tmp_path / "dp.pt", "resnet20", 100)
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="junk.pt.*not a readable torch file"):
        load_user_weights(tmp_path / "junk.pt", "resnet20", 10)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "absent.pt")


def test_flipped_bits_in_saved_weights_are_caught(tmp_path):
    save_model(build_model("resnet20", 10), tmp_path / "m.pt", name="resnet20", num_classes=10, image_size=32)
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    blob["state_dict"]["conv1.weight"][0, 0, 0, 0] += 1.0  # what a flipped bit in the tensor data does, unseen by torch.load
    torch.save(blob, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="m.pt.*do not match the checksum"):
        load_model(tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="m.pt.*do not match the checksum"):
        load_user_weights(tmp_path / "m.pt", "resnet20", 10)


def test_resume_checkpoints(tmp_path):
    assert load_resume(tmp_path / "none.pt") is None  # nothing to resume: a fresh start
    state = {"epoch": 1, "model": build_model("resnet20", 10).state_dict(), "loss_fn": {}, "optimizer": {}, "scheduler": {},
             "history": [{"train_loss": 1.0}], "rng": {}}
    save_resume(state, tmp_path / "r.pt")
    assert load_resume(tmp_path / "r.pt")["epoch"] == 1
    save_resume({**state, "epoch": 2}, tmp_path / "r.pt")  # epoch and history disagree
    with pytest.raises(CheckpointError, match="r.pt.*delete it to start the stage over"):
        load_resume(tmp_path / "r.pt")
    (tmp_path / "r.pt").write_bytes((tmp_path / "r.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="r.pt.*not a readable torch file"):
        load_resume(tmp_path / "r.pt")


def test_split_seed_keeps_the_split_while_seed_varies(tmp_path, monkeypatch):
    """Benchmarks repeat runs over seeds on the split the base model was trained on: data.split_seed fixes the
    val/test split, and without it the split follows `seed`."""
    from tasks import prepare as prepare_stage
    from tasks.config import Params
    from tests.conftest import tiny_params

    monkeypatch.chdir(tmp_path)

    def fingerprint(seed, split_seed):
        params = tiny_params(tmp_path, seed=seed, **{"data.split_seed": split_seed})
        return prepare_stage.run(Params.model_validate(params))["fingerprint"]

    assert fingerprint(1, 0) == fingerprint(2, 0) == fingerprint(0, None) != fingerprint(1, None)
