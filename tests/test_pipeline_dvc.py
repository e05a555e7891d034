"""The pipeline end to end through the real CLI, DVC (tmp git repo), Prefect server and MLflow store."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml
from mlflow import MlflowClient

from flows.stages import STAGES
from tests.conftest import REPO, tiny_params, write_params

pytestmark = pytest.mark.slow


def _sh(*cmd, cwd, env=None, check=True):
    out = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory, prefect_server):
    root = tmp_path_factory.mktemp("dvcrepo")
    for d in ("pruning", "tasks", "flows"):
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    write_params(root / "params.yaml", tiny_params(root))
    env = dict(os.environ, PREFECT_API_URL=prefect_server, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("EMOPRUNE_PARENT_RUN_ID", None)
    _sh("git", "init", "-q", cwd=root)
    _sh(sys.executable, "-m", "dvc", "init", "-q", cwd=root)
    _sh("git", "add", "-A", cwd=root)
    _sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=root)
    return root, env


def _run(root, env):
    return _sh(sys.executable, "-m", "flows.cli", "run", "--project", str(root), cwd=root, env=env)


def test_pipeline_runs_once_then_only_what_changed(repo):
    root, env = repo
    first = _run(root, env)
    assert f"stages run: {', '.join(STAGES)}" in first.stdout, first.stdout[-2000:]
    for out in ("models/base.pt", "models/pruned.pt", "models/pruned.onnx", "metrics/summary.json", "dvc.lock"):
        assert (root / out).is_file(), out

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("emoprune")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`emoprune.kind` = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.run_name == "digits-resnet20-emo-dir-0.5"
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)

    # nothing changed: no stage reruns, through the pipeline or bare `dvc repro`
    second = _run(root, env)
    assert "up to date: no stage ran" in second.stdout
    bare = _sh(sys.executable, "-m", "dvc", "repro", cwd=root, env=env)
    assert "Running stage" not in bare.stdout
    assert len(client.search_runs([exp.experiment_id])) == len(STAGES) + 1

    # another target: EMO-DIR ranks again from the same search; nothing before rank reruns
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prune"]["target"] = 0.6
    write_params(root / "params.yaml", params)
    third = _run(root, env)
    assert "stages run: rank, finetune, export, report" in third.stdout, third.stdout[-2000:]
    summary = yaml.safe_load((root / "metrics/summary.json").read_text())
    assert summary["pruned"]["flops_reduction"] >= 0.6


def test_failed_stage_exits_non_zero_and_keeps_earlier_outputs(repo):
    root, env = repo
    base_before = (root / "models/base.pt").read_bytes()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prune"]["target"] = 0.9999  # beyond every candidate's reach: the rank stage fails
    write_params(root / "params.yaml", params)
    out = _sh(sys.executable, "-m", "flows.cli", "run", "--project", str(root), cwd=root, env=env, check=False)
    assert out.returncode != 0
    assert "out of reach" in out.stdout + out.stderr
    assert (root / "models/base.pt").read_bytes() == base_before
    assert (root / "metrics/summary.json").is_file()
