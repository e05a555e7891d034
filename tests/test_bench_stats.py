"""The benchmark's paired statistics (bench/stats.py): the interval covers a true zero difference, excludes a
real one, and McNemar's exact test matches the binomial tail."""
from __future__ import annotations

import doctest
import importlib.util

import numpy as np
import pytest

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("bench_stats", REPO / "bench" / "stats.py")
stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stats)


def test_no_difference_gives_an_interval_around_zero():
    rng = np.random.default_rng(1)
    a = rng.random((3, 3000)) < 0.9
    b = a.copy()
    for s in range(3):  # 60 images flip each way per seed: the two disagree often, yet neither is better
        right, wrong = rng.permutation(np.flatnonzero(a[s]))[:60], rng.permutation(np.flatnonzero(~a[s]))[:60]
        b[s, right], b[s, wrong] = False, True
    d = stats.paired_difference(a, b, seed=0)
    assert d["diff_points"] == 0 and d["low"] < 0 < d["high"] and not d["significant"]
    assert all(p == 1.0 for p in d["mcnemar_p"])


def test_a_real_difference_is_significant_and_named_in_points():
    rng = np.random.default_rng(2)
    b = rng.random((3, 3000)) < 0.85
    a = b | (rng.random((3, 3000)) < 0.1)  # A also gets about 1.5 points more right
    d = stats.paired_difference(a, b, seed=0)
    assert d["significant"] and d["low"] > 0 and d["low"] < d["diff_points"] < d["high"]
    assert d["diff_points"] == pytest.approx(100 * (a.mean() - b.mean()))
    assert all(p < 0.01 for p in d["mcnemar_p"])


def test_mcnemar_matches_the_binomial_tail():
    a = np.array([True] * 7 + [False] * 3 + [True] * 10)
    b = np.array([False] * 7 + [True] * 3 + [True] * 10)  # 7 images only A gets right, 3 only B
    p = sum(__import__("math").comb(10, i) for i in range(4)) / 2**10 * 2
    assert stats.mcnemar_p(a, b) == pytest.approx(p)
    assert stats.mcnemar_p(a, a) == 1.0


def test_shapes_must_match():
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 4\)"):
        stats.paired_difference(np.ones((2, 5), bool), np.ones((2, 4), bool))


def test_docstring_examples_run():
    result = doctest.testmod(stats)
    assert result.attempted > 0 and result.failed == 0


def test_a_unit_goes_stale_only_when_params_its_method_reads_change():
    """bench/run.py keys each unit by the params dvc.yaml's stages on its method's path read: a search setting
    reruns EMO-DIR's units, not the baselines' (which cost as long to redo)."""
    import copy
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
        run = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(run)
    finally:
        sys.path.remove(str(REPO / "bench"))
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert "search" in run.unit_params(params, "emo-dir") and "constrain" in run.unit_params(params, "emo-dir")
    assert not {"search", "constrain", "selectors", "divide"} & set(run.unit_params(params, "global-magnitude"))
    other = copy.deepcopy(params)
    other["search"]["pop_size"] += 1
    digest = lambda p, m: run._digest(p, [], m, 0.5, 0)  # noqa: E731
    assert digest(other, "global-magnitude") == digest(params, "global-magnitude")
    assert digest(other, "emo-dir") != digest(params, "emo-dir")
    other["finetune"]["epochs"] += 1  # every method finetunes
    assert digest(other, "global-magnitude") != digest(params, "global-magnitude")
