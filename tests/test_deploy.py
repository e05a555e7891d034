"""Deployments: `prefect deploy` from prefect.yaml onto a process work pool, `emoprune serve`'s refusal of a bad
schedule, and the MLflow UI's stop. The served deployment whose runs the scheduler starts is tested in
test_pipeline_dvc.py, on the project the pipeline already ran."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, dvc_project, tiny_params
from tests.prefect_runs import free_port

pytestmark = pytest.mark.slow


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
    """`emoprune ui` runs the MLflow UI (its own process and the server's, with one worker as by default: two take
    longer to start); SIGTERM stops all of them."""
    from flows.serving import answers

    params = tiny_params(tmp_path)
    (tmp_path / "params.yaml").write_text(__import__("yaml").safe_dump(params))
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--port", str(port), "--workers", "1"], cwd=tmp_path,
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
