"""Helpers for the reliability suite: real `emoprune` processes in tmp project folders, file snapshots."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_params, write_params


def cli_env(prefect_url: str | None = None) -> dict[str, str]:
    env = dict(os.environ, COLUMNS="400", PYTHONPATH=str(REPO))  # wide: rich would wrap error lines mid-value
    env.pop("EMOPRUNE_PARENT_RUN_ID", None)
    if prefect_url:
        env["PREFECT_API_URL"] = prefect_url
    return env


def emoprune(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`emoprune ARGS` as a real process in the project folder `cwd`."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env or cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (the .emoprune/ work area aside) with a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".emoprune" not in p.relative_to(root).parts}


def clone(base: Path, dest: Path, **overrides) -> Path:
    """A copy of project `base` (no resume checkpoints, its own MLflow store) with params overridden."""
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("mlflow.db", "checkpoints", "params-*.yaml"))
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["tracking"]["uri"] = f"sqlite:///{dest / 'mlflow.db'}"
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    write_params(dest / "params.yaml", params)
    return dest


@pytest.fixture(scope="session")
def base_project(tmp_path_factory, prefect_server):
    """A project where prepare, pretrain (2 epochs), selectors, rank (uniform: no search needed) and finetune
    (1 epoch) ran once, in process: the inputs of the long stages and their "last good" outputs."""
    from flows.stages import stage_flow

    root = tmp_path_factory.mktemp("base")
    write_params(root / "params.yaml", tiny_params(root))
    uniform = write_params(root / "params-uniform.yaml", tiny_params(root, **{"prune.method": "uniform"}))
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.delenv("EMOPRUNE_PARENT_RUN_ID", raising=False)
    try:
        for name in ("prepare", "pretrain", "selectors"):
            stage_flow(name, "params.yaml")
        for name in ("rank", "finetune"):
            stage_flow(name, str(uniform))
    finally:
        mp.undo()
    return root
