"""Downstream evaluation: protocols on synthetic matrices, and a run over a fixture warehouse.

The run uses an in-memory feature source (the Feast path is tested in tests/feature_repo and the
CLI tests); features are planted so the right answer is known: one view carries the label,
another is noise.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from producers.datasets.definition import load_builtin
from producers.ingest import IngestConfig, ingest
from producers.stores.warehouse import Home
from tests.fixtures.movielens_files import write_grouplens
from training.evaluate import EvaluateConfig, EvaluateError, evaluate
from training.evaluate.protocol import (LgbmParams, ProtocolResult, best_candidate, cv_splits, encode_labels,
                                        paper_splits, run_protocol)
from validation.run import ValidateConfig, validate

FAST = LgbmParams(n_estimators=40, learning_rate=0.2, num_leaves=7, min_child_samples=5, n_jobs=1)


def test_paper_splits_hold_out_a_test_set_and_cover_the_rest_once():
    y = np.array([0] * 70 + [1] * 30)
    splits = paper_splits(y, "binary", seed=3)
    test = set(splits[0].score)
    assert len(splits) == 5 and len(test) == 10
    assert all(set(s.score) == test for s in splits)
    assert sum(y[list(test)]) == 3  # stratified: 30% positives in the test set too
    valid = [set(s.valid) for s in splits]
    assert set().union(*valid) == set(range(100)) - test
    assert sum(len(v) for v in valid) == 90  # each dev user validates exactly once
    for s in splits:
        assert not set(s.train) & (set(s.valid) | test)


def test_cv_scores_every_user_once_per_repeat():
    y = np.arange(50, dtype=float)
    splits = cv_splits(y, "regression", seed=0, folds=5, repeats=3)
    counts = np.bincount(np.concatenate([s.score for s in splits]), minlength=50)
    assert len(splits) == 15 and (counts == 3).all()


def test_informative_features_beat_noise_per_task():
    rng = np.random.default_rng(0)
    n = 300
    signal = rng.normal(size=n)
    noise = rng.normal(size=(n, 5))
    informative = np.column_stack([signal + 0.2 * rng.normal(size=n), noise])
    cases = {"binary": (signal > 0).astype(int), "multiclass": np.digitize(signal, [-0.7, 0, 0.7]),
             "regression": 30 + 10 * signal}
    for task, y in cases.items():
        splits = cv_splits(y, task, seed=0, folds=3, repeats=1)
        good = run_protocol("cv", informative, y, task, splits, FAST, seed=0)
        bad = run_protocol("cv", noise, y, task, splits, FAST, seed=0)
        if task == "binary":
            assert good.mean("roc_auc") > 0.9 > 0.7 > bad.mean("roc_auc")
        if task == "multiclass":
            assert good.mean("accuracy") > 0.6 > 0.4 > bad.mean("accuracy")
        if task == "regression":
            assert good.mean("mae") < 0.5 * bad.mean("mae")


def test_splits_fitted_in_parallel_score_exactly_as_one_by_one():
    from training.evaluate.probe import LinearProbe

    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 8))
    y = (X[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(int)
    for task, params, splits in (("binary", FAST, paper_splits(y, "binary", seed=0)),
                                 ("binary", LinearProbe(cs=(0.01, 1.0)), cv_splits(y, "binary", seed=0, repeats=2)),
                                 ("regression", FAST, cv_splits(X[:, 0], "regression", seed=0, repeats=1))):
        target = X[:, 0] * 3 if task == "regression" else y
        one = run_protocol("cv", X, target, task, splits, params, seed=0, workers=1)
        two = run_protocol("cv", X, target, task, splits, params, seed=0, workers=2)
        assert one.scores == two.scores and one.valid_scores == two.valid_scores
        assert len(next(iter(two.scores.values()))) == len(splits)


def test_epoch_is_chosen_by_validation_scores_not_test_scores():
    a = ProtocolResult("paper", scores={"roc_auc": [0.9]}, valid_scores={"roc_auc": [0.6]})
    b = ProtocolResult("paper", scores={"roc_auc": [0.5]}, valid_scores={"roc_auc": [0.7]})
    assert best_candidate({"epoch1": a, "epoch2": b}, "binary") == "epoch2"
    lo = ProtocolResult("paper", scores={"mae": [1.0]}, valid_scores={"mae": [5.0]})
    hi = ProtocolResult("paper", scores={"mae": [9.0]}, valid_scores={"mae": [4.0]})
    assert best_candidate({"lo": lo, "hi": hi}, "regression") == "hi"


def test_labels_are_encoded_in_declared_order_and_unknown_values_fail():
    y, classes = encode_labels(["M", "F", "M"], "binary", ["M", "F"])
    assert y.tolist() == [0, 1, 0] and classes == ["M", "F"]
    with pytest.raises(ValueError, match="X"):
        encode_labels(["M", "X"], "binary", ["M", "F"])


@dataclass
class FakeView:
    name: str
    kind: str
    is_default: bool = False
    run: str | None = None
    epoch: int | None = None
    text_kind: str | None = None
    features: tuple = ("vector",)


class PlantedSource:
    """LLM4ES epoch 2 encodes gender and age; epoch 1 and CoLES are noise; agg encodes age only."""

    def __init__(self, users: dict):
        self.users = users  # user_id -> (gender, age)
        self.asked = None

    def views(self):
        return [FakeView("ml__agg_features", "agg", True), FakeView("ml__coles_embedding", "coles", True),
                FakeView("ml__llm4es_e1", "llm4es", False, "runs/ml/r", 1, "serialized"),
                FakeView("ml__llm4es_e2", "llm4es", True, "runs/ml/r", 2, "serialized")]

    def matrices(self, views, entity_df):
        self.asked = entity_df
        rng = np.random.default_rng(1)
        ids = entity_df["user_id"].tolist()
        g = np.array([1.0 if self.users[u][0] == "F" else 0.0 for u in ids])
        age = np.array([float(self.users[u][1]) for u in ids])
        n = len(ids)
        planted = {"ml__llm4es_e2": np.column_stack([g + 0.1 * rng.normal(size=n), age, rng.normal(size=(n, 3))]),
                   "ml__llm4es_e1": rng.normal(size=(n, 5)), "ml__coles_embedding": rng.normal(size=(n, 4)),
                   "ml__agg_features": np.column_stack([age + rng.normal(size=n), rng.normal(size=n)])}
        return {v: planted[v] for v in views}


@pytest.fixture(scope="module")
def ml_home(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    source = write_grouplens(root / "ml-100k", n_users=120, n_movies=30, per_user=(20, 22))
    home = Home.resolve(root / "home")
    ingest(home, load_builtin("movielens-100k"), IngestConfig(source=source))
    assert validate(home, "movielens-100k", ValidateConfig(data_docs=False)).success
    users = {}
    for line in (source / "u.user").read_text().splitlines():
        uid, age, gender, *_ = line.split("|")
        users[int(uid)] = (gender, int(age))
    return home, users


def test_evaluate_ranks_planted_features_picks_the_epoch_and_writes_reports(ml_home, tmp_path):
    home, users = ml_home
    source = PlantedSource(users)
    config = EvaluateConfig(features=("agg", "coles", "llm4es", "coles+llm4es"), cv_repeats=1, lgbm=FAST,
                            out_dir=tmp_path / "reports")
    result = evaluate(home, "movielens-100k", config, source=source)
    r = result.report
    assert r["n_users"] == 120 and [t["name"] for t in r["targets"]] == ["gender", "age"]
    # every labelled user fetched once, at one label time (the last event)
    assert sorted(source.asked["user_id"]) == sorted(users) and source.asked["event_timestamp"].nunique() == 1
    gender, age = r["results"]["gender"], r["results"]["age"]
    assert gender["llm4es"]["chosen_view"] == "ml__llm4es_e2" == age["llm4es"]["chosen_view"]
    assert gender["llm4es"]["candidates"]["ml__llm4es_e2"] > gender["llm4es"]["candidates"]["ml__llm4es_e1"]
    for protocol in ("paper", "cv"):
        assert gender["llm4es"]["protocols"][protocol]["roc_auc"]["mean"] > 0.9
        assert gender["coles"]["protocols"][protocol]["roc_auc"]["mean"] < 0.8
        mae = {name: age[name]["protocols"][protocol]["mae"]["mean"] for name in ("llm4es", "coles")}
        assert mae["llm4es"] < 0.5 * mae["coles"]
    assert len(gender["llm4es"]["protocols"]["paper"]["roc_auc"]["scores"]) == 5
    # the constant baseline: AUC 0.5, accuracy = the majority share, MAE of the median
    base = gender["no features"]["protocols"]["cv"]
    majority = max(sum(g == "M" for g, _ in users.values()), sum(g == "F" for g, _ in users.values())) / len(users)
    assert base["roc_auc"]["mean"] == 0.5 and abs(base["accuracy"]["mean"] - majority) < 0.03
    ages = np.array([a for _, a in users.values()])
    assert abs(age["no features"]["protocols"]["cv"]["mae"]["mean"] - np.abs(ages - np.median(ages)).mean()) < 1.0
    assert r["feature_sets"][0] == "no features"
    assert len(gender["llm4es"]["protocols"]["cv"]["roc_auc"]["scores"]) == 5
    assert gender["coles+llm4es"]["views"] == ["ml__coles_embedding", "ml__llm4es_e2"]
    assert gender["coles+llm4es"]["n_features"] == 4 + 5

    on_disk = json.loads(result.paths["json"].read_text())
    assert on_disk["results"]["gender"]["llm4es"]["protocols"] == json.loads(json.dumps(gender["llm4es"]["protocols"]))
    md = result.paths["markdown"].read_text()
    auc = gender["llm4es"]["protocols"]["paper"]["roc_auc"]
    assert f"| llm4es | {auc['mean']:.3f} ± {auc['std']:.3f} |" in md
    assert result.paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_is_deterministic_given_the_seed(ml_home, tmp_path):
    home, users = ml_home
    config = EvaluateConfig(features=("agg",), targets=("age",), protocols=("paper",), lgbm=FAST)
    a = evaluate(home, "movielens-100k", config, source=PlantedSource(users)).report["results"]
    b = evaluate(home, "movielens-100k", config, source=PlantedSource(users)).report["results"]
    assert a == b


@pytest.mark.parametrize("config, message", [
    (EvaluateConfig(targets=("income",)), "unknown target"),
    (EvaluateConfig(features=("llm4es+tfidf",)), "'tfidf' is neither a kind"),
    (EvaluateConfig(protocols=("holdout",)), "protocols must be"),
])
def test_evaluate_names_what_is_wrong(ml_home, config, message):
    home, users = ml_home
    with pytest.raises(EvaluateError, match=message):
        evaluate(home, "movielens-100k", config, source=PlantedSource(users))


def test_session_rollups_resolve_by_kind_and_session_keyed_views_are_refused():
    from training.evaluate.run import resolve_feature_set

    @dataclass
    class SessionView(FakeView):
        join_key: str = "user_id"

    views = [SessionView("ml__session_embedding_rollup", "sessions", True),
             SessionView("ml__intent_shares", "intents", True),
             SessionView("ml__session_embedding", "session_embedding", True, join_key="session_id"),
             *PlantedSource({}).views()]
    parts = resolve_feature_set("sessions+intents+llm4es", views)
    assert [p.view for p in parts] == ["ml__session_embedding_rollup", "ml__intent_shares", "ml__llm4es_e2"]
    with pytest.raises(EvaluateError, match="keyed by session"):
        resolve_feature_set("session_embedding", views)
    with pytest.raises(EvaluateError, match="llm4es intents distill"):
        resolve_feature_set("intents", PlantedSource({}).views())


class AggColesOnly(PlantedSource):
    """What a user has before any LLM work: agg and CoLES published, no LLM4ES view."""

    def views(self):
        return [v for v in super().views() if v.kind in ("agg", "coles")]


def test_default_features_are_the_published_ones_and_the_missing_are_named(ml_home, tmp_path):
    home, users = ml_home
    config = EvaluateConfig(targets=("age",), protocols=("paper",), lgbm=FAST, linear_probe=False, out_dir=tmp_path)
    r = evaluate(home, "movielens-100k", config, source=AggColesOnly(users)).report
    assert r["feature_sets"] == ["no features", "agg", "coles", "coles+agg", "coles+agg (stacked)"]
    assert set(r["missing"]) == {"llm4es", "coles+llm4es"}
    assert "llm4es embed" in r["missing"]["llm4es"] and "llm4es embed" in r["missing"]["coles+llm4es"]
    assert r["results"]["age"]["coles+agg"]["views"] == ["ml__coles_embedding", "ml__agg_features"]
    assert "## Not evaluated (not published)" in (tmp_path / "evaluation.md").read_text()


def test_default_features_fail_only_when_none_is_published_and_named_sets_must_exist(ml_home, tmp_path):
    home, users = ml_home

    class Nothing(PlantedSource):
        def views(self):
            return []

    with pytest.raises(EvaluateError, match="none of the default feature sets"):
        evaluate(home, "movielens-100k", EvaluateConfig(out_dir=tmp_path), source=Nothing(users))

    class SessionsOnly(PlantedSource):  # a clickstream home that published only the second paper's views
        def views(self):
            return [FakeView("bank__session_rollup", "sessions", True),
                    FakeView("bank__intent_shares", "intents", True)]

    with pytest.raises(EvaluateError, match="`--features intents,sessions`"):
        evaluate(home, "movielens-100k", EvaluateConfig(out_dir=tmp_path), source=SessionsOnly(users))
    named = EvaluateConfig(features=("agg", "llm4es"), out_dir=tmp_path)
    with pytest.raises(EvaluateError, match="no llm4es features are published"):
        evaluate(home, "movielens-100k", named, source=AggColesOnly(users))


def test_reports_keep_one_file_per_call_and_merge_the_latest_by_feature_set(ml_home, tmp_path):
    home, users = ml_home
    base = dict(targets=("age",), protocols=("paper",), lgbm=FAST, linear_probe=False, out_dir=tmp_path)
    first = evaluate(home, "movielens-100k", EvaluateConfig(features=("agg", "coles"), **base),
                     source=PlantedSource(users))
    second = evaluate(home, "movielens-100k", EvaluateConfig(features=("llm4es", "coles"), **base),
                      source=PlantedSource(users))
    latest = json.loads((tmp_path / "evaluation.json").read_text())
    assert latest["feature_sets"] == ["no features", "agg", "coles", "llm4es"]
    # agg comes from the first call, coles was replaced by the second's (same folds: same numbers here)
    assert latest["results"]["age"]["agg"] == json.loads(json.dumps(first.report["results"]["age"]["agg"]))
    assert latest["sources"] == {"no features": second.report["run"], "agg": first.report["run"],
                                 "coles": second.report["run"], "llm4es": second.report["run"]}
    assert "kept agg" in second.merge_note
    md = (tmp_path / "evaluation.md").read_text()
    assert "| agg |" in md and "| llm4es |" in md
    # each call's own report stays as it was
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == sorted([first.report["run"], second.report["run"]]) and len(set(runs)) == 2
    own = json.loads(first.paths["run_json"].read_text())
    assert own["feature_sets"] == ["no features", "agg", "coles"]

    # other folds: rows are not comparable, so the latest report starts anew and says why
    third = evaluate(home, "movielens-100k", EvaluateConfig(features=("coles",), seed=7, **base),
                     source=PlantedSource(users))
    latest = json.loads((tmp_path / "evaluation.json").read_text())
    assert latest["feature_sets"] == ["no features", "coles"]
    assert "seed" in third.merge_note and "starts anew" in third.merge_note
    assert len(list((tmp_path / "runs").iterdir())) == 3
