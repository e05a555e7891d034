"""Stage sources: a fingerprint of the pipeline's inputs that live outside the repository.

`data.root` (CIFAR or ImageFolder) and `model.checkpoint` may name files anywhere on disk, and a
`python:<module>:<callable>` model is the user's code, where DVC does not look. This stage lists them (relative path, size, modification time) and writes one digest per input to
`data/sources.json`. It runs on every `dvc repro` (`always_changed` in dvc.yaml) and costs a directory walk,
not a read of the data; `prepare` and `pretrain` depend on its output, so a changed, added or removed image
or a new checkpoint reruns them, and an unchanged source reruns nothing.

It imports nothing heavy on purpose: no torch, Prefect or MLflow (it is not a Prefect flow and logs no run)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

SOURCES = Path("data/sources.json")
_CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def listing(paths: list[Path]) -> dict[str, Any]:
    """Digest of every regular file under `paths` (files or folders), by relative path, size and mtime."""
    rows = []
    for top in paths:
        if top.is_file():
            st = top.stat()
            rows.append(f"{top.name}\t{st.st_size}\t{st.st_mtime_ns}")
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                f = Path(dirpath) / name
                st = f.stat()
                rows.append(f"{f.relative_to(top.parent)}\t{st.st_size}\t{st.st_mtime_ns}")
    return {
        "paths": [str(p) for p in paths],
        "files": len(rows),
        "bytes": sum(int(r.split("\t")[1]) for r in rows),
        "digest": hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16],
    }


def data_inputs(source: str, root: str | None) -> list[Path]:
    """The files and folders outside the repository that data.source reads (none for the bundled digits).

    A missing path is listed as it is: prepare (and preflight before it) says what is wrong with it."""
    if source == "digits" or root is None:
        return []
    base = Path(root)
    if source in _CIFAR_DIRS:
        return [base / _CIFAR_DIRS[source]] if (base / _CIFAR_DIRS[source]).exists() else [base]
    return [base / n for n in ("train", "val", "test") if (base / n).exists()] or [base]


def fingerprint(params: dict[str, Any]) -> dict[str, Any]:
    """{"data": ..., "checkpoint": ...} from a params.yaml mapping (read as plain YAML: validating it would
    import torch for the model registry; `emoprune check` and each stage validate)."""
    data = params.get("data") or {}
    source = data.get("source", "digits")
    out: dict[str, Any] = {"data": {"source": source, **listing(data_inputs(source, data.get("root")))}}
    checkpoint = (params.get("model") or {}).get("checkpoint")
    out["checkpoint"] = listing([Path(checkpoint)]) if checkpoint and Path(checkpoint).is_file() else None
    name = str((params.get("model") or {}).get("name") or "")
    if name.startswith("python:"):  # the user's model code: an edit rebuilds the model (located, not imported)
        out["model_code"] = {"name": name, **listing(user_model_files(name.split(":")[1]))}
    return out


def user_model_files(module: str) -> list[Path]:
    """The source of `module` under the project folder: its .py file or its package folder (none when installed)."""
    path = Path(*module.split("."))
    found = [p for p in (path.with_suffix(".py"), path) if p.exists()]
    return found[:1]


def write(params_path: str | Path = "params.yaml", out: Path = SOURCES) -> bool:
    """Write the fingerprint to `out`; the file is only rewritten when it changes. True when it changed."""
    params = yaml.safe_load(Path(params_path).read_text()) or {}
    text = json.dumps(fingerprint(params), indent=2, sort_keys=True) + "\n"
    if out.is_file() and out.read_text() == text:
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return True
