"""A user's own network by import path (`model.name: python:<module>:<callable>`, with its trained weights in
`model.checkpoint`) through every stage, as real Prefect flows logging to a tmp SQLite MLflow store."""
from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from flows.stages import STAGES, stage_flow
from tasks import paths
from tasks.checkpoints import load_model
from tasks.io import read_json
from tests.conftest import tiny_params, write_params

# A plain chain of convolutions no family rule of pruning/divide.py knows: divided from its traced graph. With
# every boundary kept (search.boundary_widths [1.0]) its second and third sub-networks (one convolution each)
# have nothing to search.
USER_MODEL = """
import torch.nn as nn


def unit(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def build(num_classes=10):
    return nn.Sequential(*unit(3, 16), nn.MaxPool2d(2), *unit(16, 24), *unit(24, 32), nn.MaxPool2d(2), *unit(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_server):
    root = tmp_path_factory.mktemp("usermodel")
    (root / "mynets.py").write_text(USER_MODEL)
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setattr(sys, "path", list(sys.path))  # the stages put the project folder on it; undone after the module
    mp.delitem(sys.modules, "mynets", raising=False)
    namespace: dict = {}
    exec(USER_MODEL, namespace)
    torch.manual_seed(0)
    torch.save(namespace["build"](10).state_dict(), root / "weights.pt")  # the user's weights: a bare state_dict
    params = tiny_params(root)
    params["model"].update(name="python:mynets:build", checkpoint="weights.pt")
    params["prune"]["target"] = 0.12
    params["search"]["boundary_widths"] = [1.0]
    params_path = write_params(root / "params.yaml", params)
    results = {name: stage_flow(name, str(params_path)) for name in STAGES}
    yield root, results
    mp.undo()


def test_a_users_model_by_import_path_runs_every_stage(project):
    root, results = project
    base, base_meta = load_model(root / paths.BASE)
    assert base_meta["model"] == "python:mynets:build"
    assert torch.equal(base[0].weight, torch.load(root / "weights.pt")["0.weight"])  # the checkpoint, not a retrained model
    assert results["selectors"]["subnetworks"][0]["blocks"][0].startswith("fx|")  # divided from the traced graph
    pruned, meta = load_model(root / paths.PRUNED)  # rebuilt from the import path and the scheme
    assert meta["model"] == "python:mynets:build" and meta["scheme"]
    summary = read_json(root / "metrics/summary.json")
    assert 0.12 <= summary["pruned"]["flops_reduction"] <= 0.12 + 0.02, summary["pruned"]
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(root / paths.PRUNED_ONNX), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, pruned.eval()(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_sub_networks_with_nothing_to_search_are_kept_whole_and_say_why(project):
    root, _ = project
    for k in (2, 3):
        front = read_json(root / paths.SEARCH / f"front_s{k}.json")
        assert front["members"] == [] and "no prunable channel group" in front["kept_whole"], front["kept_whole"]
    assert read_json(root / paths.SEARCH / "front_s1.json")["kept_whole"] is None
    index = read_json(root / paths.CANDIDATES / "index.json")
    assert [len(s["candidates"]) for s in index["subnetworks"]] == [2, 0, 0]
    info = read_json(root / paths.SCHEME)["info"]
    assert sorted(info["kept_whole"]) == ["s2", "s3"]
    pruned, _ = load_model(root / paths.PRUNED)
    assert [m.out_channels for m in pruned if isinstance(m, torch.nn.Conv2d)][1:] == [24, 32, 32]  # only conv 0 was pruned


def test_parallel_tasks_each_get_their_own_division_traced_once(project):
    """The search's sub-network tasks load the division in parallel threads. Tracing a model patches torch for
    every thread, so the base model is traced once and each task gets a deep copy (sharing nothing with another):
    a task that has its copy runs it while another task loads."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tasks import division as division_module
    from tasks.config import load_params

    root, _ = project
    params = load_params(str(root / "params.yaml"))
    x = torch.randn(4, 3, 32, 32)
    first_loaded, second_loaded = threading.Event(), threading.Event()

    def first():
        d = division_module.load_division(params)
        first_loaded.set()
        outputs = []
        with torch.no_grad():
            while not second_loaded.is_set() or not outputs:
                y = x
                for sub in d.subnetworks:
                    y = sub.module(y)
                outputs.append((d.head(y), d.model(x)))
        return d, outputs

    def second():
        first_loaded.wait(timeout=60)
        try:
            return division_module.load_division(params)
        finally:
            second_loaded.set()

    division_module._DIVIDED.clear()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often, as under a loaded machine: a race shows every time
    try:
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.submit(first), pool.submit(second)
            (d1, outputs), d2 = a.result(timeout=120), b.result(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    for through_subnetworks, whole in outputs:
        torch.testing.assert_close(through_subnetworks, whole)
    for d in (d1, d2):
        first_conv = next(m for m in d.subnetworks[0].module.modules() if isinstance(m, torch.nn.Conv2d))
        assert first_conv is d.model[0]  # a sub-network holds its own copy's modules
    assert d1.model[0] is not d2.model[0]  # and no module is shared between tasks
