"""A SIGKILLed process cannot end its MLflow runs: the next stage or pipeline run marks them KILLED."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import mlflow

from tasks.config import parse_params
from tasks.tracking import close_orphans, owner_tags
from tests.conftest import REPO, tiny_params

CHILD = textwrap.dedent("""
    import os, signal, sys
    import mlflow
    from tasks.tracking import owner_tags
    mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_experiment(sys.argv[2])
    run = mlflow.start_run(run_name="killed-stage", tags=owner_tags())
    print(run.info.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_runs_of_killed_processes_are_closed_and_live_ones_kept(tmp_path):
    params = parse_params(tiny_params(tmp_path))
    uri, name = params.tracking.uri, params.tracking.experiment
    child = subprocess.run([sys.executable, "-c", CHILD, uri, name], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    killed = child.stdout.split()[0]

    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(killed).info.status == "RUNNING"  # what MLflow alone would show forever
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(name)
    with mlflow.start_run(run_name="live", tags=owner_tags()) as live:  # this process: alive
        other = client.create_run(live.info.experiment_id, tags={"emoprune.host": "elsewhere", "emoprune.pid": "1"})
        assert close_orphans(params) == [killed]
        assert client.get_run(live.info.run_id).info.status == "RUNNING"
    run = client.get_run(killed)
    assert run.info.status == "KILLED" and run.info.end_time is not None
    assert f"process {run.data.tags['emoprune.pid']}" in run.data.tags["emoprune.orphaned"]
    assert client.get_run(other.info.run_id).info.status == "RUNNING"  # another host's run: not ours to judge
    assert close_orphans(params) == []  # nothing left to close
    assert int(run.data.tags["emoprune.pid"]) != os.getpid()
