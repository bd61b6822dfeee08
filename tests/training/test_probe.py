"""The linear probe: a second reader on the same splits, in the report next to LightGBM."""
from __future__ import annotations

import json

import numpy as np

from tests.training.test_evaluate import FAST, PlantedSource, ml_home  # noqa: F401 (module fixture)
from training.evaluate import EvaluateConfig, evaluate
from training.evaluate.probe import LinearProbe
from training.evaluate.protocol import cv_splits, run_protocol

FAST_PROBE = LinearProbe(cs=(0.01, 1.0), alphas=(1.0, 100.0))


def test_the_probe_reads_a_linear_signal_that_trees_read_poorly():
    # one informative direction spread over 200 weak columns: linear in the sum, invisible per column
    rng = np.random.default_rng(0)
    n, d = 400, 200
    z = rng.normal(size=n)
    X = z[:, None] * 0.15 + rng.normal(size=(n, d))
    X[rng.random(X.shape) < 0.05] = np.nan  # missing values are imputed, not a crash
    for task, y in (("binary", (z > 0).astype(int)), ("regression", 10 * z)):
        splits = cv_splits(y, task, seed=0, folds=3, repeats=1)
        linear = run_protocol("cv", X, y, task, splits, FAST_PROBE, seed=0)
        trees = run_protocol("cv", X, y, task, splits, FAST, seed=0)
        noise = run_protocol("cv", rng.normal(size=(n, d)), y, task, splits, FAST_PROBE, seed=0)
        if task == "binary":
            assert linear.mean("roc_auc") > 0.85 > trees.mean("roc_auc") and noise.mean("roc_auc") < 0.65
        else:
            assert linear.mean("mae") < 0.7 * min(trees.mean("mae"), noise.mean("mae"))


def test_an_empty_column_in_a_training_split_keeps_the_width():
    X = np.column_stack([np.arange(40.0), np.full(40, np.nan)])
    X[30:, 1] = 1.0  # only the last rows have the second feature
    y = (np.arange(40) % 2).astype(int)
    model = FAST_PROBE.model("binary", seed=0).fit(X[:30], y[:30])
    assert model.predict_proba(X[30:]).shape == (10, 2)


def test_every_feature_set_gets_a_linear_row_on_the_same_views(ml_home, tmp_path):  # noqa: F811
    home, users = ml_home
    config = EvaluateConfig(features=("coles", "llm4es"), cv_repeats=1, lgbm=FAST, linear=FAST_PROBE,
                            out_dir=tmp_path / "reports")
    result = evaluate(home, "movielens-100k", config, source=PlantedSource(users))
    r = result.report
    assert r["feature_sets"] == ["no features", "coles", "coles (linear)", "llm4es", "llm4es (linear)"]
    gender, age = r["results"]["gender"], r["results"]["age"]
    assert gender["llm4es (linear)"]["views"] == gender["llm4es"]["views"] == ["ml__llm4es_e2"]
    assert gender["llm4es (linear)"]["reader"] == "linear" and gender["llm4es"]["reader"] == "lightgbm"
    for protocol in ("paper", "cv"):
        assert gender["llm4es (linear)"]["protocols"][protocol]["roc_auc"]["mean"] > 0.9
        assert gender["coles (linear)"]["protocols"][protocol]["roc_auc"]["mean"] < 0.8
        assert (age["llm4es (linear)"]["protocols"][protocol]["mae"]["mean"]
                < 0.5 * age["coles (linear)"]["protocols"][protocol]["mae"]["mean"])
    # same splits: as many scores as LightGBM's
    assert len(gender["llm4es (linear)"]["protocols"]["cv"]["roc_auc"]["scores"]) == 5
    md = result.paths["markdown"].read_text()
    auc = gender["llm4es (linear)"]["protocols"]["cv"]["roc_auc"]
    assert f"| llm4es (linear) | {auc['mean']:.3f} ± {auc['std']:.3f} |" in md
    off = evaluate(home, "movielens-100k", EvaluateConfig(features=("coles",), targets=("age",), cv_repeats=1,
                                                          lgbm=FAST, linear_probe=False, out_dir=tmp_path / "off"),
                   source=PlantedSource(users))
    assert off.report["feature_sets"] == ["no features", "coles"]


def test_linear_rows_merge_by_feature_set_like_the_others(ml_home, tmp_path):  # noqa: F811
    home, users = ml_home
    base = dict(targets=("age",), protocols=("paper",), lgbm=FAST, linear=FAST_PROBE, out_dir=tmp_path)
    first = evaluate(home, "movielens-100k", EvaluateConfig(features=("agg",), **base), source=PlantedSource(users))
    evaluate(home, "movielens-100k", EvaluateConfig(features=("llm4es",), **base), source=PlantedSource(users))
    latest = json.loads((tmp_path / "evaluation.json").read_text())
    assert {"agg", "agg (linear)", "llm4es", "llm4es (linear)"} <= set(latest["feature_sets"])
    assert latest["results"]["age"]["agg (linear)"] == json.loads(
        json.dumps(first.report["results"]["age"]["agg (linear)"]))
