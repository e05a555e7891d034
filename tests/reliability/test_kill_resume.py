"""Each long stage killed (SIGKILL to its process group) after its first checkpoint: the last good outputs
survive, and the rerun resumes and ends exactly where an uninterrupted run in another folder ends."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.reliability.conftest import cli_env, clone, emoprune, snapshot

pytestmark = pytest.mark.slow

CHECKPOINTS = Path(".emoprune/checkpoints")


def _kill_after_first_checkpoint(project: Path, stage: str, pattern: str, env: dict, log: Path) -> None:
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "stage", stage], cwd=project, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while not list((project / CHECKPOINTS).glob(pattern)):
            assert proc.poll() is None, f"{stage} ended (code {proc.returncode}) before its first checkpoint:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint {pattern} after 600 s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, f"{stage} finished before the kill: pick more epochs/generations"


def _run(project: Path, stage: str, env: dict) -> str:
    out = emoprune("stage", stage, cwd=project, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def _run_in_process(project: Path, stage: str) -> None:
    """The uninterrupted reference run, in this process (what `emoprune stage` calls, without a process start)."""
    from flows.stages import run_stage

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        mp.delenv("EMOPRUNE_PARENT_RUN_ID", raising=False)
        run_stage(stage, "params.yaml")


def _metrics(project: Path, stage: str, drop=("seconds", "resumed_from_epoch")) -> dict:
    doc = json.loads((project / "metrics" / f"{stage}.json").read_text())
    return {k: v for k, v in doc.items() if k not in drop}


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:5]


def _outputs(project: Path) -> dict[str, str]:
    return {k: v for k, v in snapshot(project).items() if k.split("/")[0] in ("models", "metrics", "plots", "artifacts")}


@pytest.mark.parametrize("stage, model_file, overrides", [
    ("pretrain", "models/base.pt", {"pretrain.epochs": 6}),
    ("finetune", "models/pruned.pt", {"finetune.epochs": 5, "finetune.kd": "dynamickd"}),
])
def test_killed_training_resumes_to_the_uninterrupted_result(base_project, prefect_server, tmp_path, stage, model_file, overrides):
    env = cli_env(prefect_server)
    whole = clone(base_project, tmp_path / "whole", **overrides)
    killed = clone(base_project, tmp_path / "killed", **overrides)
    _run_in_process(whole, stage)

    before = _outputs(killed)
    _kill_after_first_checkpoint(killed, stage, f"{stage}_*.pt", env, tmp_path / "killed.log")
    assert _outputs(killed) == before  # the last good outputs are untouched, nothing half-written appeared

    _run(killed, stage, env)
    _assert_same_weights(whole / model_file, killed / model_file)
    assert _metrics(whole, stage) == _metrics(killed, stage)
    resumed = json.loads((killed / "metrics" / f"{stage}.json").read_text())["resumed_from_epoch"]
    assert 1 <= resumed < overrides[f"{stage}.epochs"]
    assert json.loads((whole / "metrics" / f"{stage}.json").read_text())["resumed_from_epoch"] == 0
    history = f"plots/{stage}_history.csv"
    assert (whole / history).read_text() == (killed / history).read_text()
    assert not list((killed / CHECKPOINTS).glob(f"{stage}_*.pt"))  # removed once the outputs are written


def test_killed_search_resumes_to_the_uninterrupted_fronts(base_project, prefect_server, tmp_path):
    env = cli_env(prefect_server)
    overrides = {"search.generations": 5}
    whole = clone(base_project, tmp_path / "whole", **overrides)
    killed = clone(base_project, tmp_path / "killed", **overrides)
    _run_in_process(whole, "search")

    _kill_after_first_checkpoint(killed, "search", "search_*.pkl", env, tmp_path / "killed.log")
    assert not (killed / "metrics/search.json").exists()  # the killed run did not pass for a finished one
    _run(killed, "search", env)

    def front(project: Path, k: int) -> dict:
        doc = json.loads((project / f"artifacts/search/front_s{k}.json").read_text())
        doc.pop("seconds")
        return doc

    for k in (1, 2, 3):
        a, b = front(whole, k), front(killed, k)
        assert a["members"] and a == b, f"front_s{k} differs after the resume"
    summary = json.loads((killed / "metrics/search.json").read_text())
    assert any(s["resumed"] for s in summary["subnetworks"])
    assert not list((killed / CHECKPOINTS).glob("search_*.pkl"))  # removed once the fronts are written
