"""The search's sub-network tasks on every task runner params offer: the same fronts as the threaded run."""
from __future__ import annotations

import shutil

import pytest

from flows.stages import run_stage, stage_flow
from tasks import paths
from tasks.io import read_json
from tests.conftest import tiny_params, write_params


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_server):
    """A project where prepare, pretrain and selectors have run: ready to search."""
    root = tmp_path_factory.mktemp("runners")
    params_path = write_params(root / "params.yaml", tiny_params(root, **{"divide.k": 2}))
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    for name in ("prepare", "pretrain", "selectors"):
        stage_flow(name, str(params_path))
    yield root
    mp.undo()


def _search_with(root, runner: str) -> list[list[dict]]:
    params = tiny_params(root, **{"divide.k": 2, "orchestration.task_runner": runner, "orchestration.workers": 2})
    params_path = write_params(root / f"params-{runner}.yaml", params)
    shutil.rmtree(root / paths.CHECKPOINTS, ignore_errors=True)  # no resuming from the previous runner's search
    out = run_stage("search", str(params_path))
    assert [r["tag"] for r in out["subnetworks"]] == ["s1", "s2"] and not any(r["resumed"] for r in out["subnetworks"])
    return [[{k: m[k] for k in ("genes", "cost", "error", "flops", "params", "scheme")} for m in read_json(root / paths.SEARCH / f"front_s{k}.json")["members"]]
            for k in (1, 2)]


@pytest.mark.slow
def test_dask_local_cluster_and_process_pool_give_the_threaded_fronts(project):
    threads = _search_with(project, "threads")
    assert all(threads)
    assert _search_with(project, "dask") == threads  # a real two-worker LocalCluster
    assert _search_with(project, "processes") == threads


def test_bad_dask_address_is_named(tmp_path):
    from tasks.config import ConfigError, parse_params

    with pytest.raises(ConfigError, match="orchestration.dask_address = 'localhost'"):
        parse_params({"orchestration": {"task_runner": "dask", "dask_address": "localhost"}})
