"""Scheduled deployments: `emoprune serve` against a real Prefect server, a triggered run, the cron schedule,
and `prefect deploy` from prefect.yaml onto a process work pool."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from flows.stages import STAGES
from tests.conftest import REPO, dvc_project, tiny_params

pytestmark = pytest.mark.slow


def _wait_for_deployment(name: str, proc: subprocess.Popen, timeout: float = 120):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                time.sleep(1)
    raise AssertionError(f"deployment {name} never appeared")


def _flow_run_logs(flow_run_id, expect: str, timeout: float = 60) -> list[str]:
    """The flow run's log messages on the server (sent in batches: wait until `expect` shows or `timeout`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            messages = [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
            if any(expect in m for m in messages) or time.monotonic() > deadline:
                return messages
            time.sleep(1)


def test_served_deployment_runs_on_trigger_and_registers_its_schedule(tmp_path, prefect_server):
    from prefect.deployments import run_deployment

    root = tmp_path / "project"
    root.mkdir()
    env = dvc_project(root, tiny_params(root), prefect_server)
    env["PREFECT_LOGGING_LEVEL"] = "INFO"  # the served flow's "nothing changed" line reaches the server's logs
    serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--cron", "*/30 * * * *", "--name", "test-serve",
                              "--project", str(root)], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deployment = _wait_for_deployment("emoprune-pipeline/test-serve", serve)
        assert [s.schedule.cron for s in deployment.schedules] == ["*/30 * * * *"] and deployment.schedules[0].active
        assert deployment.parameters["project_dir"] == str(root)

        run = run_deployment("emoprune-pipeline/test-serve", timeout=900, poll_interval=2)
        assert run.state.is_completed(), run.state
        client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
        exp = client.get_experiment_by_name("emoprune")
        parent = client.search_runs([exp.experiment_id], filter_string="tags.`emoprune.kind` = 'pipeline'")
        assert len(parent) == 1 and parent[0].info.status == "FINISHED"
        stages = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'")
        assert sorted(r.info.run_name for r in stages) == sorted(STAGES) and all(r.info.status == "FINISHED" for r in stages)

        # the next scheduled run finds nothing changed: it ends at once and logs no new run
        again = run_deployment("emoprune-pipeline/test-serve", timeout=300, poll_interval=1)
        assert again.state.is_completed()
        assert any("nothing changed" in m for m in _flow_run_logs(again.id, "nothing changed"))
        assert len(client.search_runs([exp.experiment_id])) == len(STAGES) + 1
    finally:
        serve.terminate()
        serve.wait(timeout=60)


def test_serve_rejects_a_bad_cron_expression(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    out = CliRunner().invoke(app, ["serve", "--cron", "every night", "--project", str(tmp_path)])
    assert out.exit_code == 2 and "every night" in out.output


def test_prefect_deploy_from_prefect_yaml_registers_the_nightly_schedule(tmp_path, prefect_server):
    from prefect.client.orchestration import get_client

    root = tmp_path / "project"
    root.mkdir()
    env = dvc_project(root, tiny_params(root), prefect_server)
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    subprocess.run([*prefect, "work-pool", "create", "emoprune-local", "--type", "process"], cwd=root, env=env, check=True,
                   capture_output=True)
    out = subprocess.run([*prefect, "deploy", "--all"], cwd=root, env={**env, "PWD": str(root)}, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("emoprune-pipeline/nightly")
    assert dep.work_pool_name == "emoprune-local" and [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"]
    assert dep.entrypoint == "flows/stages.py:pipeline_flow"
    assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(root)}}]
