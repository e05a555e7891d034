"""Inputs outside the repository: a changed image reruns `prepare`, an unchanged source reruns nothing."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tasks.sources import fingerprint, write
from tests.conftest import dvc_project, tiny_params


def _image_folder(root, n=4):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.bmp")  # uncompressed: a pixel can change in place


def _edit_in_place(image):
    """New pixels, same name and byte size: only the modification time tells."""
    size, before = image.stat().st_size, image.read_bytes()
    data = bytearray(before)
    data[-20] ^= 0xFF  # a pixel byte
    image.write_bytes(bytes(data))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert image.stat().st_size == size and image.read_bytes() != before


def test_the_fingerprint_follows_every_file_of_the_source(tmp_path):
    _image_folder(tmp_path / "raw")
    params = {"data": {"source": "imagefolder", "root": str(tmp_path / "raw")}}
    first = fingerprint(params)
    assert first["data"]["files"] == 16 and first["checkpoint"] is None
    assert fingerprint(params) == first
    _edit_in_place(tmp_path / "raw/train/cat/1.bmp")
    edited = fingerprint(params)
    assert edited["data"]["digest"] != first["data"]["digest"] and edited["data"]["files"] == 16
    (tmp_path / "raw/test/dog/0.bmp").unlink()
    assert fingerprint(params)["data"]["files"] == 15
    assert fingerprint({"data": {"source": "digits"}})["data"] == {"source": "digits", "paths": [], "files": 0, "bytes": 0,
                                                                   "digest": fingerprint({})["data"]["digest"]}
    # written only when it changes, so DVC sees the same file (and reruns nothing) for the same source
    (tmp_path / "params.yaml").write_text(f"data: {{source: imagefolder, root: {tmp_path / 'raw'}}}\n")
    assert write(tmp_path / "params.yaml", tmp_path / "sources.json") is True
    assert write(tmp_path / "params.yaml", tmp_path / "sources.json") is False


@pytest.mark.slow
def test_dvc_reruns_prepare_when_an_image_changes_and_only_then(tmp_path, prefect_server):
    _image_folder(tmp_path / "raw")
    root = tmp_path / "project"
    root.mkdir()
    env = dvc_project(root, tiny_params(root, **{"data.source": "imagefolder", "data.root": str(tmp_path / "raw"),
                                                 "data.limit_train": None, "data.val_fraction": 0.25}), prefect_server)

    def repro():
        out = subprocess.run([sys.executable, "-m", "dvc", "repro", "prepare"], cwd=root, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return out.stdout

    assert "Running stage 'prepare'" in repro()
    assert "Stage 'prepare' didn't change, skipping" in repro()
    _edit_in_place(tmp_path / "raw/train/dog/2.bmp")
    assert "Running stage 'prepare'" in repro()
