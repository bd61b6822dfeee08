"""Late fusion of ensemble members: honest (nothing read from scored rows), and it reads weak members as weak."""
from __future__ import annotations

import numpy as np
import pytest

from tests.training.test_evaluate import FAST, PlantedSource, ml_home  # noqa: F401 (module fixture)
from tests.training.test_probe import FAST_PROBE
from training.evaluate import EvaluateConfig, FusionConfig, evaluate
from training.evaluate.fusion import fit_and_predict, run_fusion
from training.evaluate.protocol import cv_splits, run_protocol

READERS = {"lightgbm": FAST, "linear": FAST_PROBE}
BOTH = FusionConfig(methods=("stack", "mean"))


def _members(n: int = 240, seed: int = 0):
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=n)
    strong = np.column_stack([signal + 0.7 * rng.normal(size=n), rng.normal(size=(n, 4))])
    noise = rng.normal(size=(n, 5))
    return rng, signal, strong, noise


@pytest.mark.parametrize("task", ["binary", "multiclass", "regression"])
def test_a_scored_rows_prediction_ignores_the_labels_of_the_scored_rows(task):
    rng, signal, strong, noise = _members()
    y = {"binary": (signal > 0).astype(int), "multiclass": np.digitize(signal, [-0.7, 0, 0.7]),
         "regression": 30 + 10 * signal}[task]
    split = cv_splits(y, task, seed=0, folds=4, repeats=1)[0]
    fused, _ = fit_and_predict(task, [strong, noise], y, split.train, [split.score], READERS, BOTH, seed=0)
    shuffled = y.copy()
    shuffled[split.score] = rng.permutation(y[split.score])  # other scored rows' labels change, training rows' do not
    shuffled[split.score[0]] = y[split.score].max() if task != "regression" else 1e3
    again, _ = fit_and_predict(task, [strong, noise], shuffled, split.train, [split.score], READERS, BOTH, seed=0)
    for method in BOTH.methods:
        assert np.array_equal(fused[method][0], again[method][0]), method
    # and the training labels do matter (the check above is not vacuous)
    moved = y.copy()
    moved[split.train] = rng.permutation(y[split.train])
    other, _ = fit_and_predict(task, [strong, noise], moved, split.train, [split.score], READERS, BOTH, seed=0)
    assert not np.allclose(fused["stack"][0], other["stack"][0])


def test_members_of_pure_noise_fuse_to_chance():
    # a fusion that picked weights or readers on the scored rows would lift six noise columns above chance
    rng, signal, _, _ = _members(n=200, seed=3)
    y = (signal > 0).astype(int)
    members = [rng.normal(size=(200, 5)) for _ in range(3)]
    splits = cv_splits(y, "binary", seed=0, folds=4, repeats=2)
    results, _ = run_fusion("cv", members, y, "binary", splits, READERS, BOTH, seed=0)
    for method, r in results.items():
        assert abs(r.mean("roc_auc") - 0.5) < 0.06, method


def test_stacking_weighs_a_noise_member_down_and_keeps_the_strong_members_score():
    _, signal, strong, noise = _members(n=300, seed=1)
    for task, y, metric in (("binary", (signal > 0).astype(int), "roc_auc"), ("regression", 30 + 10 * signal, "mae")):
        splits = cv_splits(y, task, seed=0, folds=3, repeats=1)
        alone = run_protocol("cv", strong, y, task, splits, FAST_PROBE, seed=0).mean(metric)
        results, weights = run_fusion("cv", [strong, noise], y, task, splits, READERS, BOTH, seed=0)
        stacked = results["stack"].mean(metric)
        w = np.asarray(weights["stack"])
        assert w[2:].sum() < 0.25 * w[:2].sum()  # columns: strong/lightgbm, strong/linear, noise/lightgbm, noise/linear
        if task == "binary":
            assert stacked > alone - 0.02
        else:  # the equal-weight mean has to average the noise member in; the stack need not
            assert stacked < 1.05 * alone and stacked < results["mean"].mean(metric)


def test_ensembles_get_fused_rows_on_the_same_splits_in_every_report(ml_home, tmp_path):  # noqa: F811
    home, users = ml_home
    config = EvaluateConfig(features=("llm4es", "coles+llm4es"), cv_repeats=1, lgbm=FAST, linear=FAST_PROBE,
                            fusion=BOTH, out_dir=tmp_path / "reports")
    result = evaluate(home, "movielens-100k", config, source=PlantedSource(users))
    r = result.report
    assert r["feature_sets"] == ["no features", "llm4es", "llm4es (linear)", "coles+llm4es", "coles+llm4es (linear)",
                                 "coles+llm4es (stacked)", "coles+llm4es (mean)"]
    gender, age = r["results"]["gender"], r["results"]["age"]
    stacked = gender["coles+llm4es (stacked)"]
    assert stacked["views"] == gender["coles+llm4es"]["views"] == ["ml__coles_embedding", "ml__llm4es_e2"]
    assert stacked["reader"] == "fusion: stack"
    for protocol in ("paper", "cv"):
        assert len(stacked["protocols"][protocol]["roc_auc"]["scores"]) == \
            len(gender["coles+llm4es"]["protocols"][protocol]["roc_auc"]["scores"])
        assert stacked["protocols"][protocol]["roc_auc"]["mean"] > 0.9  # the planted LLM4ES member carries it
        weights = stacked["fusion_weights"][protocol]
        assert sum(w for c, w in weights.items() if "llm4es" in c) > sum(w for c, w in weights.items() if "coles" in c)
        assert (age["coles+llm4es (stacked)"]["protocols"][protocol]["mae"]["mean"]
                < 0.6 * r["results"]["age"]["no features"]["protocols"][protocol]["mae"]["mean"])
    md = result.paths["markdown"].read_text()
    auc = stacked["protocols"]["cv"]["roc_auc"]
    assert f"| coles+llm4es (stacked) | {auc['mean']:.3f} ± {auc['std']:.3f} |" in md
    assert "## Fusion weights" in md and result.paths["png"].stat().st_size > 0
    assert [name for name, _ in result.table("cv")] == r["feature_sets"]  # the printed table's rows
    off = evaluate(home, "movielens-100k", EvaluateConfig(features=("coles+llm4es",), targets=("age",), cv_repeats=1,
                                                          protocols=("cv",), lgbm=FAST, linear=FAST_PROBE,
                                                          fusion=FusionConfig(methods=()), out_dir=tmp_path / "off"),
                   source=PlantedSource(users))
    assert off.report["feature_sets"] == ["no features", "coles+llm4es", "coles+llm4es (linear)"]
