"""The pipeline end to end through the real CLI, DVC (tmp git repo), Prefect server and MLflow store, and then
through a served deployment whose runs the Prefect scheduler starts."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from mlflow import MlflowClient

from flows.stages import STAGES
from tests.conftest import dvc_project, tiny_params, write_params
from tests.prefect_runs import flow_run_logs, free_port, scheduled_runs, wait_for_deployment

pytestmark = pytest.mark.slow


def _sh(*cmd, cwd, env=None, check=True):
    out = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory, prefect_server):
    root = tmp_path_factory.mktemp("dvcrepo")
    return root, dvc_project(root, tiny_params(root), prefect_server)


def _run(root, env):
    return _sh(sys.executable, "-m", "flows.cli", "run", "--project", str(root), cwd=root, env=env)


def test_pipeline_runs_once_then_only_what_changed(repo):
    root, env = repo
    first = _run(root, env)
    assert f"stages run: {', '.join(STAGES)}" in first.stdout, first.stdout[-2000:]
    for out in ("models/base.pt", "models/pruned.pt", "models/pruned.onnx", "metrics/summary.json", "dvc.lock"):
        assert (root / out).is_file(), out
    summary = json.loads((root / "metrics/summary.json").read_text())
    # the run ends with its result: the FLOPs line carries the numbers of summary.json
    assert f"{summary['base']['flops']:,} -> {summary['pruned']['flops']:,}" in first.stdout, first.stdout[-2000:]

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
    # only the sources stage runs (DVC always runs it; its fingerprint is unchanged, so nothing after it runs)
    assert [ln for ln in bare.stdout.splitlines() if ln.startswith("Running stage")] == ["Running stage 'sources':"], bare.stdout
    assert len(client.search_runs([exp.experiment_id])) == len(STAGES) + 1

    # another target, and the finetune stage's process killed mid-run: EMO-DIR trains candidates near the new
    # target from the same search (nothing before constrain reruns), the killed attempt fails in Prefect and MLflow, and the flow's retry finishes
    # the run from the stage that failed
    _interrupted_finetune_then_retried(root, env, client, exp.experiment_id, target=0.6)
    summary = yaml.safe_load((root / "metrics/summary.json").read_text())
    assert summary["pruned"]["flops_reduction"] >= 0.6

    # both finished pipeline runs are listed, newest first, and the registry aliases follow the rules
    table = _sh(sys.executable, "-m", "flows.cli", "compare", "--last", "5", "--params", str(root / "params.yaml"), cwd=root, env=env)
    rows = [ln for ln in table.stdout.splitlines() if "emo-dir" in ln]
    assert len(rows) == 2 and "0.6" in rows[0] and "0.5" in rows[1], table.stdout  # finished runs only: not the killed attempt
    candidate = client.get_model_version_by_alias("emoprune", "candidate")
    champion = client.get_model_version_by_alias("emoprune", "champion")
    first = client.get_model_version("emoprune", "1")
    assert str(candidate.version) == "2"
    assert str(champion.version) == ("2" if float(candidate.tags["val_acc"]) > float(first.tags["val_acc"]) else "1")
    # every model traces back to its code, params and data
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`emoprune.kind` = 'pipeline'", order_by=["attributes.start_time DESC"])
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert candidate.tags["data_md5"] == lock["stages"]["prepare"]["outs"][0]["md5"] == parents[0].data.tags["emoprune.data_md5"]
    assert candidate.tags["params_hash"] == parents[0].data.tags["emoprune.params_hash"] != parents[-1].data.tags["emoprune.params_hash"]
    assert candidate.tags["commit"] == parents[0].data.tags["mlflow.source.git.commit"]


def test_bad_target_stops_before_any_stage_and_keeps_every_output(repo):
    root, env = repo
    base_before = (root / "models/base.pt").read_bytes()
    summary_before = (root / "metrics/summary.json").read_bytes()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prune"]["target"] = 0.9999  # beyond the search space's reach: preflight refuses it
    write_params(root / "params.yaml", params)
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("emoprune")
    runs_before = len(client.search_runs([exp.experiment_id]))
    out = _sh(sys.executable, "-m", "flows.cli", "run", "--project", str(root), cwd=root, env=env, check=False)
    assert out.returncode == 2
    assert "prune.target = 0.9999" in out.stdout + out.stderr and "out of reach" in out.stdout + out.stderr
    # and what would reach further: the tiny params keep the default boundary widths, down to 0.5
    assert "or narrower boundaries (search.boundary_widths [1.0, 0.75, 0.5]: add 0.25)" in out.stdout + out.stderr
    assert (root / "models/base.pt").read_bytes() == base_before
    assert (root / "metrics/summary.json").read_bytes() == summary_before
    assert len(client.search_runs([exp.experiment_id])) == runs_before
    params["prune"]["target"] = 0.6  # back to what the outputs were made with
    write_params(root / "params.yaml", params)


def _stage_running(client, exp_id: str, stage: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        if client.search_runs([exp_id], filter_string=f"attributes.run_name = '{stage}' and attributes.status = 'RUNNING'"):
            return
        time.sleep(0.2)
    raise AssertionError(f"stage {stage} never started")


def _interrupted_finetune_then_retried(root, env, client, exp_id: str, target: float) -> None:
    """SIGTERM to the finetune stage's process: that attempt fails in Prefect and MLflow, earlier outputs stay,
    and the flow's retry finishes the run from the stage that failed."""
    import psutil

    base_before = (root / "models/base.pt").read_bytes()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prune"]["target"] = target
    params["finetune"]["epochs"] = 4  # a few seconds to be interrupted in
    params["orchestration"].update(retries=1, retry_delay_seconds=0)
    write_params(root / "params.yaml", params)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--project", str(root)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _stage_running(client, exp_id, "finetune", proc)
    victims = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if p.name() not in ("sh", "bash", "dash") and "stage" in p.cmdline() and "finetune" in p.cmdline()]
    assert victims
    for p in victims:
        p.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    parents = client.search_runs([exp_id], filter_string=f"attributes.run_name = 'digits-resnet20-emo-dir-{target}'",
                                 order_by=["attributes.start_time ASC"])
    # the SIGTERM stopped the first attempt (it once went unseen: pruning/stopping.py), and the retry finished
    assert [r.info.status for r in parents] == ["FAILED", "FINISHED"], out[-2000:]
    assert "stages run: finetune, export, report" in out, out[-2000:]  # the retry: constrain and rank had finished in the first attempt
    assert (root / "models/base.pt").read_bytes() == base_before

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as prefect:
        latest = [r for r in prefect.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=20)
                  if prefect.read_flow(r.flow_id).name == "emoprune-pipeline"][0]
    assert latest.state.is_completed() and latest.run_count == 2  # failed once, retried once
    first = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert {r.info.run_name: r.info.status for r in first} == {"constrain": "FINISHED", "rank": "FINISHED", "finetune": "FAILED"}
    second = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parents[1].info.run_id}'")
    assert {r.info.run_name: r.info.status for r in second} == {"finetune": "FINISHED", "export": "FINISHED", "report": "FINISHED"}


def test_dvc_experiments_metrics_plots_and_params_diff(repo):
    """`dvc exp run -S ...` tries another method and target; DVC shows accuracy against FLOPs across experiments."""
    root, env = repo
    # as the README says: commit the run, then experiment on top of it
    _sh("git", "add", "-A", cwd=root)
    _sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline run", cwd=root)
    out = _sh(sys.executable, "-m", "dvc", "exp", "run", "-n", "gm", "-S", "prune.target=0.6", "-S", "prune.method=global-magnitude",
              cwd=root, env=env)
    assert "Running stage 'pretrain'" not in out.stdout and "Running stage 'finetune'" in out.stdout, out.stdout[-2000:]
    exps = json.loads(_sh(sys.executable, "-m", "dvc", "exp", "show", "--json", cwd=root, env=env).stdout)
    gm = [e for x in exps for e in (x.get("experiments") or []) if e.get("name") == "gm"]
    assert gm, exps
    metrics = gm[0]["revs"][0]["data"]["metrics"]["metrics/summary.json"]["data"]
    assert metrics["method"] == "global-magnitude" and metrics["pruned"]["flops_reduction"] >= 0.6
    workspace = json.loads(_sh(sys.executable, "-m", "dvc", "metrics", "show", "--json", cwd=root, env=env).stdout)
    assert "metrics/summary.json" in json.dumps(workspace)
    diff = json.loads(_sh(sys.executable, "-m", "dvc", "params", "diff", "HEAD", "gm", "--json", cwd=root, env=env).stdout)
    assert diff["params.yaml"]["prune.method"] == {"old": "emo-dir", "new": "global-magnitude"}
    plots = json.loads(_sh(sys.executable, "-m", "dvc", "plots", "diff", "HEAD", "gm", "--json", "--split", cwd=root, env=env).stdout)
    models = {p["model"] for p in _records(plots)}
    assert {"base", "emo-dir@0.6", "global-magnitude@0.6"} <= models, json.dumps(plots)[:2000]


def _records(tree) -> list[dict]:
    """Every data point (a dict with a "model" key) anywhere in DVC's plots JSON."""
    if isinstance(tree, dict):
        return [tree] if "model" in tree else [r for v in tree.values() for r in _records(v)]
    if isinstance(tree, list):
        return [r for v in tree for r in _records(v)]
    return []


def test_scheduled_runs_fire_then_ctrl_c_stops_the_runner_and_its_server(repo, tmp_path):
    """`emoprune serve --interval 15` with no server configured (cron schedules take the same path through the
    scheduler; `make serve CRON="* * * * *"` was checked by hand): it starts a real Prefect server (scheduler
    service included), the scheduler creates the runs and the served process executes them; the first runs the
    stages a params change put out of date, the next finds nothing changed; Ctrl-C then stops the runner and the
    server it started. Last in this module: it serves the project the tests above ran, and a new registry name puts
    only the report stage out of date (a whole pipeline through DVC is the first test's)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serving import answers

    root, env = repo
    if json.loads(_sh(sys.executable, "-m", "dvc", "status", "--json", cwd=root, env=env).stdout or "{}").keys() - {"sources"}:
        _run(root, env)  # run alone (-k): the whole pipeline first; after the tests above nothing is out of date
    env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    # the runner looks for due runs every 2 s (10 s by default): less idle time in the test
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_LOGGING_LEVEL="INFO", PREFECT_RUNNER_POLL_FREQUENCY="2")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"]["registered_model"] = "emoprune-served"  # read by the report stage alone: only it reruns
    write_params(root / "params.yaml", params)
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("emoprune")
    before = {r.info.run_id for r in client.search_runs([exp.experiment_id])}
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--interval", "15", "--name", "test-serve",
                                  "--server-port", str(port), "--project", str(root)], cwd=root, env=env, stdout=out,
                                 stderr=subprocess.STDOUT)
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            deployment = wait_for_deployment("emoprune-pipeline/test-serve", serve, timeout=240)
            assert [s.schedule.interval.total_seconds() for s in deployment.schedules] == [15] and deployment.schedules[0].active
            assert deployment.parameters["project_dir"] == str(root)
            first, second = scheduled_runs(deployment.id, serve, log, want=2, timeout=480)[:2]
            assert first.auto_scheduled and second.auto_scheduled, "runs not created by the scheduler"
            assert first.state.is_completed() and second.state.is_completed(), (first.state, second.state)
            assert any("nothing changed" in m for m in flow_run_logs(second.id, "nothing changed"))

        new = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id not in before]
        parent = [r for r in new if r.data.tags.get("emoprune.kind") == "pipeline"]
        assert len(parent) == 1 and parent[0].info.status == "FINISHED", [(r.info.run_name, r.info.status) for r in new]
        stages = [r for r in new if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
        assert [(r.info.run_name, r.info.status) for r in stages] == [("report", "FINISHED")]
        assert len(new) == 2  # the second run logged nothing
        assert client.get_model_version_by_alias("emoprune-served", "candidate")  # the run did the report's work

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
