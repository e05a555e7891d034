"""Shared fixtures: a real Prefect test server, a tmp SQLite MLflow store and tiny pipeline params."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before Prefect or MLflow are imported anywhere: keep their state out of the user's home.
_STATE = Path(tempfile.mkdtemp(prefix="emoprune-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_STATE / "prefect"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.pop("EMOPRUNE_PARENT_RUN_ID", None)

# One share of the cores per xdist worker, for this process and every process a test starts (stages, the CLI):
# two workers with two OpenMP threads each (plus their subprocesses) oversubscribe 2 cores, and OpenMP threads
# that spin waiting for each other made some tests 4x slower.
_THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ["OMP_NUM_THREADS"] = str(_THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(_THREADS)


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API server for the whole session; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def self_labelled(n: int, name: str = "resnet20", seed: int = 0):
    """An untrained model and `n` random images labelled by its own predictions: the unpruned network is right
    by definition, so pruning trades accuracy for FLOPs. Returns (model in eval mode, images, labels)."""
    from pruning.models import build_model

    torch.manual_seed(seed)
    model = build_model(name, 10).eval()
    x = torch.randn(n, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def tiny_params(tmp: Path, **overrides) -> dict:
    """params.yaml content for a run of seconds: 150 digits images, 1-2 epochs, a 2-generation search, few latency repeats."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"]["uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    params["data"].update(limit_train=150, batch_size=64)
    params["pretrain"]["epochs"] = 2
    params["finetune"]["epochs"] = 1
    params["export"].update(latency_repeats=3, latency_batch_sizes=[1, 8])
    params["divide"].update(k=3, cache_train=128, cache_val=96)
    params["selectors"].update(epochs=2)
    params["search"].update(pop_size=6, generations=2, calib_samples=64)
    params["constrain"].update(candidates=2, epochs=1)
    params["orchestration"].update(retries=0, retry_delay_seconds=0)
    for dotted, value in overrides.items():
        section, key = dotted.split(".") if "." in dotted else (None, dotted)
        (params[section] if section else params)[key] = value
    return params


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def dvc_project(root: Path, params: dict, prefect_url: str) -> dict[str, str]:
    """Make `root` a git + DVC project with this repository's code and `params`; returns the environment
    for running its CLI against the Prefect server at `prefect_url`."""
    import shutil
    import subprocess
    import sys

    for d in ("pruning", "tasks", "flows"):
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    write_params(root / "params.yaml", params)
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\n.emoprune/\n")
    env = dict(os.environ, PREFECT_API_URL=prefect_url, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("EMOPRUNE_PARENT_RUN_ID", None)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["cp", str(REPO / ".dvcignore"), "."],
                ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return env


# The longest files, longest first. `make test` runs `-n 2 --dist loadfile --no-loadscope-reorder`: each file goes
# whole to one worker, in collection order, so the longest start first and the short ones fill the gaps after
# (xdist's default order, most tests first, started the two longest files last and left one worker idle at the end).
LONGEST_FIRST = ("test_pipeline_dvc.py", "test_kill_resume.py", "test_latency.py", "test_stages.py", "test_deploy.py", "test_runners.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: file order otherwise kept
