"""Each pipeline stage as a Prefect flow, and the pipeline flow that chains them through DVC."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped

from pruning import stopping
from pruning.methods import method_spec
from tasks import sources
from tasks.config import Params, load_params
from tasks.paths import STAGES as STAGE_NAMES
from tasks.tracking import PARENT_ENV, close_orphans, connect, owner_tags, pipeline_run_name, trace_tags


@task(name="search-subnetwork", task_run_name="search-s{k}", cache_policy=NO_CACHE)
def search_subnetwork_task(k: int, params_path: str, run_id: str, project: str) -> dict:
    """NSGA-II on one sub-network: independent of the others, so the flow maps it over all K.

    Under the process or Dask runners this runs in another process (or machine, given a shared filesystem
    at the same path), so it moves to the project folder first: every stage path is relative to it."""
    if Path.cwd() != Path(project):
        os.chdir(project)
    from tasks import search

    return search.search_subnetwork(load_params(params_path), k, run_id)


def _search_stage(params: Params, params_path: str) -> dict:
    project = str(Path.cwd().resolve())
    params_path = str(Path(params_path).resolve())

    def mapper(ks, run_id):
        futures = search_subnetwork_task.map(ks, params_path=unmapped(params_path), run_id=unmapped(run_id), project=unmapped(project))
        return [f.result() for f in futures]

    from tasks import search

    return search.run(params, mapper)


def _module_stage(name: str) -> Callable[[Params, str], dict]:
    # imported when the stage runs: each stage process loads only its own module (torchvision alone costs seconds)
    return lambda params, _: importlib.import_module(f"tasks.{name}").run(params)


_RUN: dict[str, Callable[[Params, str], dict]] = {name: _module_stage(name) for name in STAGE_NAMES}
_RUN["search"] = _search_stage
STAGES: dict[str, Callable[[Params, str], dict]] = {name: _RUN[name] for name in STAGE_NAMES}  # dvc.yaml order


@flow(name="emoprune-stage", flow_run_name="{name}", log_prints=True, retries=0)  # the pipeline flow retries
def stage_flow(name: str, params_path: str = "params.yaml") -> dict:
    """Run one stage in the current folder with the params in `params_path`."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; allowed: {', '.join(STAGES)}")
    # inside the flow, where Prefect has put its own SIGTERM handler: a stop request is also recorded, so the
    # training and search loops still stop if the handler's exception is lost (see pruning/stopping.py)
    with stopping.recorded():
        return STAGES[name](load_params(params_path), params_path)


def task_runner(params: Params) -> TaskRunner:
    """The runner for the search's K sub-network tasks, as `orchestration` in params says.

    threads: one process (the default; torch releases the GIL in its kernels). processes: a local process pool.
    dask: a LocalCluster of one single-threaded worker process per sub-network, or the scheduler at
    `dask_address`. The search results do not depend on the runner: every task seeds itself."""
    o = params.orchestration
    workers = o.workers or params.divide.k
    if o.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if o.task_runner == "processes":
        return ProcessPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner

    if o.dask_address:
        return DaskTaskRunner(address=o.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None},
    )


def _api_url() -> str | None:
    """The API URL of the Prefect server this process talks to: the configured one, or the ephemeral server
    Prefect starts when none is configured (which the settings alone would not name)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def _export_api_url() -> None:
    """Worker processes inherit the environment, not this process's Prefect settings: hand them the API URL,
    so their task runs report to the same server as the flow instead of starting servers of their own."""
    if url := _api_url():
        os.environ["PREFECT_API_URL"] = url
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def run_stage(name: str, params_path: str = "params.yaml") -> dict:
    """`stage_flow` with the task runner chosen in params (it only matters for the search)."""
    params = load_params(params_path)
    if name != "search" or method_spec(params.prune.method).search != "subnetworks":  # one search task per sub-network
        # Prefect's with_options annotation is narrower than the task runners it takes
        return stage_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))(name, params_path)  # type: ignore[arg-type]
    if params.orchestration.task_runner != "threads":
        _export_api_url()
    return stage_flow.with_options(task_runner=task_runner(params))(name, params_path)  # type: ignore[arg-type]


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
        stopping.check()
        lines.append(line)
        if (route := output_route(line)) == "raw":
            sys.stdout.write(line)
            sys.stdout.flush()
        elif route == "log":
            print(line, end="", flush=True)
    if proc.wait() != 0:
        last = [line.rstrip() for line in lines if line.strip()][-3:]
        raise RuntimeError(
            f"stage {stage!r} failed (dvc exit code {proc.returncode}); its output is above. Last lines:\n" + "\n".join(last)
        )
    skipped = any("didn't change, skipping" in line for line in lines)
    logger.info("stage %s %s", stage, "up to date" if skipped else "ran")
    return not skipped


_PREFECT_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| ")
# DVC's advice after every stage (git add, autostage, dvc push) says nothing about this run
_DVC_HINTS = ("To track the changes with git", "To enable auto staging", "dvc config core.autostage", "Use `dvc push`", "git add ")


def output_route(line: str) -> str | None:
    """Where a line of `dvc repro`'s output goes: None (dropped: DVC's git hints, blank lines), "raw" (a log line of
    the stage's own flow, already timestamped and already in Prefect under that flow: printed as it is, not
    stamped a second time) or "log" (DVC's own lines: printed into the pipeline flow's log)."""
    if not line.strip() or line.strip().startswith(_DVC_HINTS):
        return None
    return "raw" if _PREFECT_LINE.match(line) else "log"


def retry_settings(params: Params) -> dict[str, str]:
    """Prefect settings giving flows `orchestration.retries`: for processes that import the flow afresh
    (a served deployment's flow runs), where options set on a flow object do not reach."""
    o = params.orchestration
    return {"PREFECT_FLOWS_DEFAULT_RETRIES": str(o.retries), "PREFECT_FLOWS_DEFAULT_RETRY_DELAY_SECONDS": str(o.retry_delay_seconds)}


def with_retries(params: Params):
    """The pipeline flow with `orchestration.retries` for an in-process run (`emoprune run`)."""
    o = params.orchestration
    return pipeline_flow.with_options(retries=o.retries, retry_delay_seconds=o.retry_delay_seconds)


@flow(name="emoprune-pipeline", log_prints=True)
def pipeline_flow(project_dir: str = ".", force: bool = False) -> dict:
    """Bring every DVC stage of `project_dir` up to date, one Prefect task per stage, under one MLflow parent run.

    A failure fails the flow run and the MLflow parent run (and the failing stage's run); DVC keeps the
    outputs of every stage that finished, so a retry resumes at the stage that failed. Retries come from
    `orchestration` in params (see `with_retries`)."""
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    params = load_params(project / "params.yaml")
    # the `sources` stage, here in-process: DVC always counts it as changed, what matters is whether its output did
    if sources.write(project / "params.yaml", project / sources.SOURCES):
        logger.info("inputs outside the repository changed (%s)", sources.SOURCES)
    status = _dvc("status", "--json", cwd=project)
    if status.returncode != 0:
        raise RuntimeError(f"dvc status failed in {project}: {status.stderr.strip() or status.stdout.strip()}")
    if not force and not {k: v for k, v in json.loads(status.stdout or "{}").items() if k != "sources"}:
        logger.info("nothing changed: every stage is up to date, no stage ran")
        return {"ran": [], "parent_run_id": None, "up_to_date": True}
    cwd = os.getcwd()
    os.chdir(project)  # the tracking URI (sqlite:///mlflow.db) is relative to the project
    try:
        connect(params)
        if closed := close_orphans(params):
            print(f"marked {len(closed)} MLflow run(s) of killed processes KILLED: {', '.join(closed)}")
        tags = {"emoprune.kind": "pipeline", **owner_tags(), **trace_tags(params)}
        with mlflow.start_run(run_name=pipeline_run_name(params), tags=tags) as parent:
            mlflow.log_params(
                {
                    "data.source": params.data.source,
                    "model.name": params.model.name,
                    "prune.method": params.prune.method,
                    "prune.target": params.prune.target,
                }
            )
            env = dict(os.environ)
            env[PARENT_ENV] = parent.info.run_id
            env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
            if url := _api_url():
                env["PREFECT_API_URL"] = url  # stage flows report to this flow's server instead of starting their own
            with stopping.recorded():  # a stop request ends the run even if its exception is lost
                ran = []
                for stage in STAGES:
                    stopping.check()
                    if repro_stage(stage, env, force, str(project)):
                        ran.append(stage)
            mlflow.set_tag("emoprune.stages_run", ",".join(ran) or "none")
            return {"ran": ran, "parent_run_id": parent.info.run_id, "up_to_date": False}
    finally:
        os.chdir(cwd)
