"""Scheduled deployments: `emoprune serve` with a real Prefect server whose scheduler starts the runs, a clean stop,
`prefect deploy` from prefect.yaml onto a process work pool, and the MLflow UI's stop."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
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
            except (ObjectNotFound, httpx.TransportError):  # not registered yet, or the server not up yet
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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scheduled_runs(deployment_id, proc: subprocess.Popen, log: Path, want: int, timeout: float) -> list:
    """The deployment's flow runs once `want` of them, created by the server's scheduler, have ended."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
            ended = [r for r in runs if r.state and r.state.is_final()]
            if len(ended) >= want:
                return sorted(ended, key=lambda r: r.expected_start_time)
            assert time.monotonic() < deadline, f"after {timeout:.0f} s: {[(r.name, r.state_name) for r in runs]}"
            time.sleep(2)


def test_scheduled_runs_fire_then_ctrl_c_stops_the_runner_and_its_server(tmp_path):
    """`emoprune serve --interval 15` with no server configured (cron schedules take the same path through the
    scheduler; `make serve CRON="* * * * *"` was checked by hand): it starts a real Prefect server (scheduler
    service included), the scheduler creates the runs and the served process executes them; the first runs the
    pipeline, the next finds nothing changed; Ctrl-C then stops the runner and the server it started."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serving import answers

    root = tmp_path / "project"
    root.mkdir()
    env = dvc_project(root, tiny_params(root), "")
    env.pop("PREFECT_API_URL")
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_LOGGING_LEVEL="INFO")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--interval", "15", "--name", "test-serve",
                                  "--server-port", str(port), "--project", str(root)], cwd=root, env=env, stdout=out,
                                 stderr=subprocess.STDOUT)
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            deployment = _wait_for_deployment("emoprune-pipeline/test-serve", serve, timeout=240)
            assert [s.schedule.interval.total_seconds() for s in deployment.schedules] == [15] and deployment.schedules[0].active
            assert deployment.parameters["project_dir"] == str(root)
            first, second = _scheduled_runs(deployment.id, serve, log, want=2, timeout=480)[:2]
            assert first.auto_scheduled and second.auto_scheduled, "runs not created by the scheduler"
            assert first.state.is_completed() and second.state.is_completed(), (first.state, second.state)
            assert any("nothing changed" in m for m in _flow_run_logs(second.id, "nothing changed"))

        client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
        exp = client.get_experiment_by_name("emoprune")
        parent = client.search_runs([exp.experiment_id], filter_string="tags.`emoprune.kind` = 'pipeline'")
        assert len(parent) == 1 and parent[0].info.status == "FINISHED"
        stages = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent[0].info.run_id}'")
        assert sorted(r.info.run_name for r in stages) == sorted(STAGES) and all(r.info.status == "FINISHED" for r in stages)
        assert len(client.search_runs([exp.experiment_id])) == len(STAGES) + 1  # the second run logged nothing

        assert (root / ".emoprune" / "prefect-server.log").stat().st_size > 0
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=120) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "Traceback" not in text and text.rstrip().endswith("stopped"), text[-3000:]
        assert not answers(url), "the Prefect server started by `emoprune serve` is still answering"
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ui_stops_with_its_workers_on_sigterm(tmp_path):
    """`emoprune ui` runs the MLflow UI (a server with worker processes); SIGTERM stops all of them."""
    from flows.serving import answers

    params = tiny_params(tmp_path)
    (tmp_path / "params.yaml").write_text(__import__("yaml").safe_dump(params))
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--port", str(port)], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not answers(f"http://127.0.0.1:{port}"):
            assert ui.poll() is None and time.monotonic() < deadline, ui.communicate()[0][-3000:] if ui.poll() is not None else "no answer"
            time.sleep(0.5)
        family = _descendants(ui.pid)
        assert family, "the MLflow UI runs in no child process"
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=30) == 0
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in family if _alive(p)], "MLflow UI processes outlived `emoprune ui`"
    finally:
        if ui.poll() is None:
            ui.kill()


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
