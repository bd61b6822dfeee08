"""The downstream protocols: LightGBM on a feature matrix, scored per target type (pure functions).

Two protocols over the same labelled users, with splits fixed by the seed so every feature set
sees the same folds (differences between feature sets are paired, not split noise):

- `paper`: the LLM4ES paper's. 10% of the users are held out as a test set (stratified for
  classification); the other 90% are cut into 5 folds; for each fold a model is trained on the
  other four and scored on the test set. Result: mean ± std over the 5 models' test scores. The
  held-out fold's score (the "validation" score) is what epoch selection reads, so the test set
  never chooses anything.
- `cv`: repeated (stratified) k-fold cross-validation over all labelled users: every user is
  scored once per repeat. With MovieLens-100k's 943 users the paper's test set is 95 users, too
  few to rank methods; this one scores every user and averages over repeats.

Metrics: ROC-AUC and accuracy for binary targets, accuracy for multiclass, MAE for regression.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Task = Literal["binary", "multiclass", "regression"]

METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("roc_auc", "accuracy"),
    "multiclass": ("accuracy",),
    "regression": ("mae",),
}
LOWER_IS_BETTER = {"mae"}


def primary_metric(task: Task) -> str:
    """The metric that ranks feature sets and picks epochs."""
    return METRICS[task][0]


@dataclass(frozen=True)
class LgbmParams:
    """LightGBM settings shared by every fit (deterministic given `seed`)."""

    n_estimators: int = 300
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_child_samples: int = 10
    subsample: float = 0.8
    colsample_bytree: float = 0.5
    reg_lambda: float = 1.0
    max_bin: int = 63  # 3x faster than 255 on dense embedding columns
    # One thread: on a small shared machine LightGBM's OpenMP threads spin against other processes
    # (measured here: one 850 x 1152 fit in 7 s single-threaded, 110-160 s with 2 threads under load).
    n_jobs: int = 1

    def model(self, task: Task, seed: int):
        import lightgbm as lgb

        common = dict(n_estimators=self.n_estimators, learning_rate=self.learning_rate, num_leaves=self.num_leaves,
                      min_child_samples=self.min_child_samples, subsample=self.subsample, subsample_freq=1,
                      colsample_bytree=self.colsample_bytree, reg_lambda=self.reg_lambda, n_jobs=self.n_jobs,
                      max_bin=self.max_bin, random_state=seed, deterministic=True, force_col_wise=True,
                      verbose=-1)
        if task == "regression":
            return lgb.LGBMRegressor(objective="regression_l1", **common)  # MAE is the metric: fit the median
        return lgb.LGBMClassifier(**common)


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # row indices
    score: np.ndarray  # rows the model is scored on (the test set, or the held-out fold)
    valid: np.ndarray | None = None  # paper protocol: the held-out fold (for epoch selection)


@dataclass
class ProtocolResult:
    """Per metric, one score per split (test scores) and, for the paper protocol, validation scores."""

    protocol: str
    scores: dict[str, list[float]] = field(default_factory=dict)
    valid_scores: dict[str, list[float]] = field(default_factory=dict)

    def mean(self, metric: str) -> float:
        return float(np.mean(self.scores[metric]))

    def std(self, metric: str) -> float:
        return float(np.std(self.scores[metric], ddof=1)) if len(self.scores[metric]) > 1 else 0.0

    def valid_mean(self, metric: str) -> float:
        return float(np.mean(self.valid_scores[metric]))


def score(task: Task, y_true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """`pred` is the predicted value (regression) or the class-probability matrix (classification)."""
    from sklearn.metrics import accuracy_score, mean_absolute_error, roc_auc_score

    if task == "regression":
        return {"mae": float(mean_absolute_error(y_true, pred))}
    out = {"accuracy": float(accuracy_score(y_true, pred.argmax(axis=1)))}
    if task == "binary":
        # one class only in a tiny fold: AUC is undefined, reported as NaN rather than failing the run
        out["roc_auc"] = float(roc_auc_score(y_true, pred[:, 1])) if len(np.unique(y_true)) == 2 else float("nan")
    return out


def paper_splits(y: np.ndarray, task: Task, seed: int, test_share: float = 0.1, folds: int = 5) -> list[Split]:
    """Hold out `test_share` as test, then `folds` train/valid splits of the rest."""
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

    rows = np.arange(len(y))
    stratify = y if task != "regression" else None
    dev, test = train_test_split(rows, test_size=test_share, random_state=seed, stratify=stratify)
    kf = (KFold(folds, shuffle=True, random_state=seed) if task == "regression"
          else StratifiedKFold(folds, shuffle=True, random_state=seed))
    return [Split(train=dev[tr], score=test, valid=dev[va]) for tr, va in kf.split(dev, y[dev])]


def cv_splits(y: np.ndarray, task: Task, seed: int, folds: int = 5, repeats: int = 3) -> list[Split]:
    """Repeated k-fold over every labelled user (stratified for classification)."""
    from sklearn.model_selection import RepeatedKFold, RepeatedStratifiedKFold

    kind = RepeatedKFold if task == "regression" else RepeatedStratifiedKFold
    rkf = kind(n_splits=folds, n_repeats=repeats, random_state=seed)
    return [Split(train=tr, score=te) for tr, te in rkf.split(np.zeros(len(y)), y)]


def run_protocol(name: str, X: np.ndarray, y: np.ndarray, task: Task, splits: list[Split],
                 params: LgbmParams, seed: int, workers: int = 1) -> ProtocolResult:
    """Fit one model per split; score it on the split's scored rows (and validation rows, if any).

    `workers` > 1 fits that many splits at once in threads, each fit single-threaded (LightGBM and
    the BLAS under the linear probe release the GIL). The splits' models and scores are the same
    as one by one: each fit keeps its own seed, and the scores are gathered in split order."""
    def fit_and_score(i: int) -> list[tuple[dict, dict]]:
        split = splits[i]
        model = params.model(task, seed + i)
        model.fit(X[split.train], y[split.train])
        out = []
        for rows, into in ((split.score, "scores"), (split.valid, "valid_scores")):
            if rows is not None:
                pred = model.predict(X[rows]) if task == "regression" else model.predict_proba(X[rows])
                out.append((into, score(task, y[rows], pred)))
        return out

    if workers > 1 and len(splits) > 1:
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        # one BLAS/OpenMP thread per fit: `workers` fits already fill the cores
        with threadpool_limits(1), ThreadPoolExecutor(min(workers, len(splits))) as pool:
            per_split = list(pool.map(fit_and_score, range(len(splits))))
    else:
        per_split = [fit_and_score(i) for i in range(len(splits))]
    result = ProtocolResult(protocol=name)
    for outcome in per_split:
        for into, metrics in outcome:
            for metric, value in metrics.items():
                getattr(result, into).setdefault(metric, []).append(value)
    return result


def default_workers() -> int:
    """The CPUs this process may use (its affinity, not the machine's count)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def constant_baseline(name: str, y: np.ndarray, task: Task, splits: list[Split]) -> ProtocolResult:
    """The score of knowing no features: the training folds' class shares (AUC 0.5, accuracy = the
    majority share) or their median (regression). Any feature set worth serving must beat it."""
    result = ProtocolResult(protocol=name)
    for split in splits:
        train = y[split.train]
        for rows, out in ((split.score, result.scores), (split.valid, result.valid_scores)):
            if rows is None:
                continue
            if task == "regression":
                pred = np.full(len(rows), np.median(train))
            else:
                shares = np.bincount(train, minlength=int(y.max()) + 1) / len(train)
                pred = np.tile(shares, (len(rows), 1))
            for metric, value in score(task, y[rows], pred).items():
                out.setdefault(metric, []).append(value)
    return result


def best_candidate(results: dict[str, ProtocolResult], task: Task) -> str:
    """The candidate (e.g. an epoch's embeddings) with the best mean validation score of the primary metric."""
    metric = primary_metric(task)
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    return min(results, key=lambda name: (sign * results[name].valid_mean(metric), name))


def encode_labels(values: list, task: Task, classes: list | None = None) -> tuple[np.ndarray, list]:
    """Targets as numbers: class indices (in `classes` order, else sorted) or floats for regression."""
    if task == "regression":
        return np.asarray(values, dtype=np.float64), []
    order = list(classes) if classes else sorted(set(values), key=str)
    index = {str(c): i for i, c in enumerate(order)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise ValueError(f"label values {unknown[:5]} are not among the declared classes {order}")
    return np.asarray([index[str(v)] for v in values], dtype=np.int64), order
