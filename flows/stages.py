"""Each pipeline stage as a Prefect flow, and the pipeline flow that chains them through DVC."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import mlflow
from prefect import flow, get_run_logger, task

from tasks import export, finetune, prepare, pretrain, prune, report
from tasks.config import load_params
from tasks.tracking import PARENT_ENV, connect, git_commit, pipeline_run_name

STAGES: dict[str, Callable] = {
    "prepare": prepare.run,
    "pretrain": pretrain.run,
    "prune": prune.run,
    "finetune": finetune.run,
    "export": export.run,
    "report": report.run,
}


@flow(name="emoprune-stage", flow_run_name="{name}", log_prints=True)
def stage_flow(name: str, params_path: str = "params.yaml") -> dict:
    """Run one stage in the current folder with the params in `params_path`."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; allowed: {', '.join(STAGES)}")
    return STAGES[name](load_params(params_path))


def _dvc(*args: str, env: dict[str, str] | None = None, cwd: str | Path = ".") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True, env=env, cwd=cwd)


@task(name="dvc-repro", task_run_name="repro-{stage}")
def repro_stage(stage: str, env: dict[str, str], force: bool, cwd: str) -> bool:
    """`dvc repro --single-item STAGE`; True when DVC ran the stage, False when it was up to date."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if proc.wait() != 0:
        last = [line.rstrip() for line in lines if line.strip()][-3:]
        raise RuntimeError(f"stage {stage!r} failed (dvc exit code {proc.returncode}); its output is above. Last lines:\n" + "\n".join(last))
    skipped = any("didn't change, skipping" in line for line in lines)
    logger.info("stage %s %s", stage, "up to date" if skipped else "ran")
    return not skipped


def _api_url() -> str | None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


@flow(name="emoprune-pipeline", log_prints=True)
def pipeline_flow(project_dir: str = ".", force: bool = False) -> dict:
    """Bring every DVC stage of `project_dir` up to date, one Prefect task per stage, under one MLflow parent run."""
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    params = load_params(project / "params.yaml")
    status = _dvc("status", "--json", cwd=project)
    if status.returncode != 0:
        raise RuntimeError(f"dvc status failed in {project}: {status.stderr.strip() or status.stdout.strip()}")
    if not force and json.loads(status.stdout or "{}") == {}:
        logger.info("nothing changed: every stage is up to date, no stage ran")
        return {"ran": [], "parent_run_id": None, "up_to_date": True}
    cwd = os.getcwd()
    os.chdir(project)  # the tracking URI (sqlite:///mlflow.db) is relative to the project
    try:
        connect(params)
        tags = {"emoprune.kind": "pipeline"}
        if commit := git_commit():
            tags["mlflow.source.git.commit"] = commit
        with mlflow.start_run(run_name=pipeline_run_name(params), tags=tags) as parent:
            mlflow.log_params({"data.source": params.data.source, "model.name": params.model.name,
                               "prune.method": params.prune.method, "prune.target": params.prune.target})
            env = dict(os.environ)
            env[PARENT_ENV] = parent.info.run_id
            env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
            if url := _api_url():
                env["PREFECT_API_URL"] = url  # stage flows report to this flow's server instead of starting their own
            ran = [stage for stage in STAGES if repro_stage(stage, env, force, str(project))]
            mlflow.set_tag("emoprune.stages_run", ",".join(ran) or "none")
            return {"ran": ran, "parent_run_id": parent.info.run_id, "up_to_date": False}
    finally:
        os.chdir(cwd)
