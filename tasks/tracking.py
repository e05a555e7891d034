"""MLflow bookkeeping: one run per stage, nested under the pipeline's parent run when there is one."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from typing import Any

import mlflow

from tasks.config import Params

PARENT_ENV = "EMOPRUNE_PARENT_RUN_ID"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def params_hash(params: Params) -> str:
    """sha256 of the resolved params (every section that can change a result), as a short hex string:
    equal hashes mean equal settings, whatever the params file's layout or comments."""
    import hashlib
    import json

    dump = params.model_dump(exclude={"orchestration"})
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def data_md5(lock: str = "dvc.lock") -> str | None:
    """DVC's md5 of the prepared data (from dvc.lock), which names the exact data a model was trained on."""
    import yaml

    try:
        doc = yaml.safe_load(open(lock)) or {}
        return str(doc["stages"]["prepare"]["outs"][0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return None


def trace_tags(params: Params) -> dict[str, str]:
    """Tags tracing a run back to its code (git commit), params (hash) and data (DVC md5)."""
    tags = {"emoprune.params_hash": params_hash(params)}
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    if md5 := data_md5():
        tags["emoprune.data_md5"] = md5
    return tags


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def connect(params: Params) -> None:
    mlflow.set_tracking_uri(params.tracking.uri)
    mlflow.set_experiment(params.tracking.experiment)


def owner_tags() -> dict[str, str]:
    """Which process holds a run open: closing runs left RUNNING by a killed process needs it."""
    return {"emoprune.host": socket.gethostname(), "emoprune.pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap check: never close another process's run
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_orphans(params: Params) -> list[str]:
    """Mark KILLED the experiment's runs still RUNNING whose process (on this host) is gone.

    A SIGKILL (or a power cut) gives a process no chance to end its MLflow runs; without this they would
    show as running forever in the UI. Runs of live processes, and of other hosts, are left alone.
    Returns the ids of the runs it closed."""
    client = mlflow.MlflowClient(tracking_uri=params.tracking.uri)
    exp = client.get_experiment_by_name(params.tracking.experiment)
    if exp is None:
        return []
    host = socket.gethostname()
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`emoprune.host` = '{host}'")
    closed = []
    for run in runs:
        pid = run.data.tags.get("emoprune.pid", "")
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            client.set_tag(run.info.run_id, "emoprune.orphaned", f"process {pid} on {host} ended without closing this run")
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


def pipeline_run_name(params: Params) -> str:
    return f"{params.data.source}-{params.model.name}-{params.prune.method}-{params.prune.target:g}"


@contextmanager
def stage_run(params: Params, stage: str, sections: tuple[str, ...]) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for `stage`, logging the params of `sections`; nested under $EMOPRUNE_PARENT_RUN_ID if set."""
    connect(params)
    close_orphans(params)
    parent = os.environ.get(PARENT_ENV) or None
    tags = {
        **owner_tags(),
        "emoprune.stage": stage,
        "emoprune.pipeline": pipeline_run_name(params),
        "emoprune.data": params.data.source,
        "emoprune.model": params.model.name,
        "emoprune.method": params.prune.method,
        "emoprune.target": f"{params.prune.target:g}",
        **trace_tags(params),
    }
    dump = params.model_dump()
    logged = {"seed": params.seed, "device": params.device}
    for s in sections:
        logged.update(flatten(dump[s], s + "."))
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=parent is not None, tags=tags) as run:
        mlflow.log_params({k: ("null" if v is None else v) for k, v in logged.items()})
        yield run


def report_runs(params: Params, last: int) -> list[dict[str, Any]]:
    """The latest finished `report` stage runs of the experiment, newest first, as plain rows."""
    from datetime import datetime

    client = mlflow.MlflowClient(tracking_uri=params.tracking.uri)
    exp = client.get_experiment_by_name(params.tracking.experiment)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.`emoprune.stage` = 'report' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=last,
    )
    rows = []
    for r in runs:
        m, t = r.data.metrics, r.data.tags
        rows.append(
            {
                "finished": datetime.fromtimestamp((r.info.end_time or r.info.start_time) / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
                "data": t.get("emoprune.data", "?"),
                "model": t.get("emoprune.model", "?"),
                "method": t.get("emoprune.method", "?"),
                "target": t.get("emoprune.target", "?"),
                "flops": m.get("pruned.flops", float("nan")),
                "flops_reduction": m.get("pruned.flops_reduction", float("nan")),
                "params": m.get("pruned.params", float("nan")),
                "test_acc": m.get("pruned.test_acc", float("nan")),
                "base_test_acc": m.get("base.test_acc", float("nan")),
                "search_seconds": m.get("search.seconds", 0.0),
                "run_id": r.info.run_id,
            }
        )
    return rows
