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


def _bench_run():
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
        run = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(run)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return run


def test_a_variant_is_held_against_its_profiles_units_on_the_same_seeds_and_images(monkeypatch):
    """An ablation (a variant of EMO-DIR) is paired with the profile's own EMO-DIR and global-magnitude units at
    its target and seeds, image by image; units of another target or another seed are not used."""
    run = _bench_run()
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # run.py imports bench/stats.py as `stats`, as when run as a script
    rng = np.random.default_rng(3)
    n = 4000

    def unit(method, target, seed, right):
        bits = np.packbits(right).tobytes().hex()
        return {"method": method, "target": target, "seed": seed, "test_acc": float(right.mean()), "test_correct": bits,
                "test_images": n, "commit": "c", "flops_reduction": target}

    truth = {s: rng.random(n) < 0.85 for s in (0, 1, 2)}
    better = {s: truth[s] | (rng.random(n) < 0.2) for s in truth}  # about 3 points more right, on every seed
    profile = [unit("emo-dir", 0.5, s, truth[s]) for s in truth]
    profile += [unit("global-magnitude", 0.5, s, truth[s]) for s in (0, 1)]
    profile += [unit("global-magnitude", 0.7, 2, ~truth[2])]  # another target: not compared
    variant = [unit("emo-dir", 0.5, s, better[s]) for s in truth]
    (row,) = run.aggregate(variant, profile)
    vs = row["vs_profile"]
    assert set(vs) == {"emo-dir", "global-magnitude"}
    assert vs["emo-dir"]["seeds"] == 3 and vs["global-magnitude"]["seeds"] == 2
    expected = 100 * np.mean([better[s].mean() - truth[s].mean() for s in (0, 1)])
    assert vs["global-magnitude"]["diff_points"] == pytest.approx(expected)
    assert vs["emo-dir"]["significant"] and vs["emo-dir"]["low"] > 0
    assert "vs_profile" not in run.aggregate(variant)[0]  # no profile given: nothing to hold it against


def test_a_unit_goes_stale_only_when_params_its_method_reads_change():
    """bench/run.py keys each unit by the params dvc.yaml's stages on its method's path read: a search setting
    reruns EMO-DIR's units, not the baselines' (which cost as long to redo)."""
    import copy

    run = _bench_run()
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert "search" in run.unit_params(params, "emo-dir") and "constrain" in run.unit_params(params, "emo-dir")
    assert not {"search", "constrain", "selectors", "divide"} & set(run.unit_params(params, "global-magnitude"))
    other = copy.deepcopy(params)
    other["search"]["pop_size"] += 1
    digest = lambda p, m: run._digest(p, [], m, 0.5, 0)  # noqa: E731
    assert digest(other, "global-magnitude") == digest(params, "global-magnitude")
    assert digest(other, "emo-dir") != digest(params, "emo-dir")
    # a param added later, at the value that does what the code did before it, leaves the units recorded before it
    # current (as if the key were not there); at another value they go stale
    for key, before in run.ADDED_AT.items():
        section, leaf = key.split(".")
        sets = ["prune.metric=latency"] if section == "latency" else []  # the latency section counts only then
        emo = lambda p: run._digest(p, sets, "emo-dir", 0.5, 0)  # noqa: E731
        without = copy.deepcopy(params)
        without[section].pop(leaf, None)
        at = copy.deepcopy(params)
        at[section][leaf] = before
        assert emo(at) == emo(without)
        at[section][leaf] = not before if isinstance(before, bool) else None
        assert emo(at) != emo(without), key
    # a memory layout changes how a unit runs, not what it computes: true, false, auto or absent, the same unit
    for key in run.EXECUTION:
        section, leaf = key.split(".")
        layouts = []
        for value in (True, False, "auto", None):
            p = copy.deepcopy(params)
            p[section].pop(leaf, None) if value is None else p[section].__setitem__(leaf, value)
            layouts.append(digest(p, "emo-dir"))
        assert len(set(layouts)) == 1, key
    other["finetune"]["epochs"] += 1  # every method finetunes
    assert digest(other, "global-magnitude") != digest(params, "global-magnitude")


def test_the_profiles_keep_their_bf16_protocol_and_refuse_to_emulate_it(monkeypatch):
    """Every committed unit trained and scored under bf16 autocast: the profiles keep it whatever params.yaml's
    default (`auto`), and where the device has no native bf16 the benchmark stops before any work, naming the
    keys and the fp32 variant that would run."""
    import pruning.train as train

    run = _bench_run()
    params = run.profile_params("digits")
    assert [params[s]["precision"] for s in ("pretrain", "search", "finetune")] == ["bf16"] * 3
    monkeypatch.setattr(train, "native_bf16", lambda device: True)
    assert run.bf16_refusal(params, []) is None
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    why = run.bf16_refusal(params, ["search.precision=fp32"])
    assert why.startswith("pretrain.precision, finetune.precision = bf16 (the units' protocol)"), why
    assert why.endswith("--variant fp32 --set pretrain.precision=fp32 --set finetune.precision=fp32"), why
    assert run.bf16_refusal(params, [f"{s}.precision=fp32" for s in ("pretrain", "search", "finetune")]) is None


def test_a_latency_variant_runs_every_method_but_the_flops_only_rows():
    run = _bench_run()
    r20 = run.PROFILES["r20"]
    assert run.default_methods(r20, flops_targets=True) == [*run.METHODS, run.TP, run.NONE]
    assert run.default_methods(r20, flops_targets=False) == run.METHODS
    assert run.default_methods(run.PROFILES["quick"], flops_targets=True) == run.METHODS  # no `none` row asked


def test_the_search_speed_ratio_is_whole_emo_time_per_evaluation_over_emo_dirs(monkeypatch):
    """The report's search speed ratio: the median over seeds of each unit's search seconds per evaluation, whole-emo's
    over EMO-DIR's at the same target (issue 15 asks EMO-DIR's search to be K times faster per evaluation)."""
    run = _bench_run()
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    right = np.packbits(np.ones(8, bool)).tobytes().hex()

    def unit(method, seed, seconds, evaluations, target=0.5):
        return {"method": method, "target": target, "seed": seed, "test_acc": 1.0, "test_correct": right, "test_images": 8,
                "commit": "abcdef0123", "flops_reduction": target, "search_seconds": seconds, "evaluations": evaluations}

    resumed = {**unit("emo-dir", 2, 1.0, 200), "search_resumed": True}  # its seconds miss the checkpointed evaluations
    paused = {**unit("whole-emo", 1, 9000.0, 200), "timing_disturbed": "paused while tests ran"}  # its seconds count the pause
    slowed = unit("emo-dir", 3, 300.0, 100)  # a unit slowed by other work: the median over seeds barely moves
    units = [unit("emo-dir", 0, 10.0, 100), unit("emo-dir", 1, 60.0, 200), slowed, resumed, paused, unit("whole-emo", 0, 120.0, 200),
             unit("whole-emo", 0, 1.0, 1, target=0.7), unit("uniform", 0, 0.0, 0)]
    rows = run.aggregate(units)
    ms = {(r["method"], r["target"]): r.get("search_ms_per_evaluation") for r in rows}
    assert ms[("emo-dir", 0.5)] == pytest.approx(300.0) and ms[("whole-emo", 0.5)] == pytest.approx(600.0)  # 100, 300, 3000
    assert ms[("uniform", 0.5)] is None  # no search, no time per evaluation
    (line,) = [ln for ln in report._search_speed({"rows": rows}) if ln]
    assert "at 0.5" in line and "EMO-DIR 300 ms" in line and "whole-emo 600 ms" in line and "2.00x less time" in line
    times = {"emo-dir": 800.0, "whole-emo": 400.0}  # EMO-DIR slower: said as such, not as "0.50x faster"
    slower = [{**r, "search_ms_per_evaluation": times[r["method"]]} if r["method"] in times else r for r in rows]
    assert "2.00x more time" in "".join(report._search_speed({"rows": slower}))


def test_stage_seconds_are_the_mean_over_the_units_that_ran_alone(monkeypatch):
    """A unit marked `timing_disturbed` keeps its accuracy in the row but not its seconds; a row whose every seed was
    disturbed keeps the seconds and is marked."""
    run = _bench_run()
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # run.py imports bench/stats.py as `stats`, as when run as a script
    right = np.packbits(np.ones(8, bool)).tobytes().hex()

    def unit(method, seed, seconds, **extra):
        return {"method": method, "target": 0.5, "seed": seed, "test_acc": 1.0, "test_correct": right, "test_images": 8,
                "commit": "abcdef0123", "flops_reduction": 0.5, "finetune_seconds": seconds,
                "method_seconds": {"search": seconds / 10, "rank": 1.0}, **extra}

    shared = "tests ran beside it"
    units = [unit("emo-dir", 0, 1000.0), unit("emo-dir", 1, 5000.0, timing_disturbed=shared), unit("emo-dir", 2, 2000.0),
             unit("global-magnitude", 0, 800.0, timing_disturbed=shared)]
    rows = {r["method"]: r for r in run.aggregate(units)}
    assert rows["emo-dir"]["finetune_seconds"] == pytest.approx(1500.0) and rows["emo-dir"]["method_seconds"]["search"] == pytest.approx(150.0)
    assert rows["emo-dir"]["seeds"] == [0, 1, 2] and not rows["emo-dir"].get("timing_disturbed")
    assert rows["global-magnitude"]["finetune_seconds"] == pytest.approx(800.0) and rows["global-magnitude"]["timing_disturbed"]
