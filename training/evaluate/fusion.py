"""Late fusion of an ensemble's member feature sets: each member read on its own, the predictions combined.

Concatenating a 175-column aggregate set with a 576-dimension embedding gives LightGBM and the
linear probe one wide matrix at a few hundred users, and on MovieLens-100k that reads worse than the
aggregates alone (benchmarks/RESULTS.md). Late fusion keeps each member's best reading and lets the
combination decide how much each one is worth. Every choice is made inside the training rows of a
split, so it obeys the no-peeking rule of the other rows:

1. inner out-of-fold predictions: the training rows are cut into `inner_folds` folds; every member
   is read by every reader (LightGBM, the linear probe) on the other folds and predicts the held-out
   one, so each training row has one honest prediction per (member, reader) column;
2. the fusion is fitted on those out-of-fold predictions only;
3. each (member, reader) model is refitted on all training rows and predicts the scored rows, which
   the fitted fusion combines.

Two fusions, both computed from the same predictions:

- `stack` (the default): a non-negative weight per (member, reader) column. Classification: the
  columns are the readers' log-odds (log-probabilities centred per row), each scaled to unit spread
  on the out-of-fold rows, combined by a multinomial logistic regression whose weights are bounded
  below by 0 with a small L2 penalty. Regression: the columns are the predictions themselves,
  combined by least absolute deviations (MAE is the metric) with weights >= 0. Non-negative weights
  let a useless member get weight 0 but never a negative one fitted to noise, and with 2-6 columns
  against hundreds of rows there is little left to overfit.
- `mean`: per member, the reader with the better out-of-fold primary metric; the chosen columns
  averaged with equal weights (classification: the unit-spread log-odds, then a slope and intercept
  fitted on the out-of-fold rows so probabilities and accuracy are calibrated; regression: the
  predictions). No weight is fitted, so it cannot down-weight a weak member.

The default is `stack`: it is the one that can tell a weak member from a strong one, which is the
ensemble's whole problem here (measured on MovieLens-100k in benchmarks/RESULTS.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from training.evaluate.protocol import LOWER_IS_BETTER, ProtocolResult, Split, Task, primary_metric, score

FUSIONS = ("stack", "mean")
FUSED_SUFFIX = {"stack": " (stacked)", "mean": " (mean)"}


@dataclass(frozen=True)
class FusionConfig:
    methods: tuple[str, ...] = ("stack",)  # fused rows reported per multi-set feature set; () turns fusion off
    inner_folds: int = 3
    l2: float = 1e-2  # stack, classification: penalty on the weights of unit-spread log-odds columns


def fused_name(feature_set: str, method: str) -> str:
    return f"{feature_set}{FUSED_SUFFIX[method]}"


def fit_and_predict(task: Task, members: list[np.ndarray], y: np.ndarray, train: np.ndarray,
                    predict_rows: list[np.ndarray], readers: dict[str, Any], config: FusionConfig,
                    seed: int) -> tuple[dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    """Fused predictions for each of `predict_rows`, per method, using only `y[train]`.

    `members` are full-height matrices (rows are users); `readers` maps a reader name to an object
    with `model(task, seed)` (LgbmParams, LinearProbe)."""
    n_classes = int(y.max()) + 1 if task != "regression" else 0
    oof, outs = _member_columns(task, members, y, train, predict_rows, readers, config.inner_folds, seed, n_classes)
    y_train = y[train]
    fused: dict[str, list[np.ndarray]] = {}
    weights: dict[str, np.ndarray] = {}
    for method in config.methods:
        if method == "stack":
            combine, w = _stack(task, oof, y_train, n_classes, config.l2)
        elif method == "mean":
            combine, w = _mean(task, oof, y_train, n_classes, len(members), len(readers))
        else:
            raise ValueError(f"unknown fusion {method!r}; known: {', '.join(FUSIONS)}")
        fused[method] = [combine(cols) for cols in outs]
        weights[method] = w
    return fused, weights


def column_names(members: list[str], readers: list[str]) -> list[str]:
    """The (member, reader) columns in the order of the weights."""
    return [f"{m} / {r}" for m in members for r in readers]


def run_fusion(name: str, members: list[np.ndarray], y: np.ndarray, task: Task, splits: list[Split],
               readers: dict[str, Any], config: FusionConfig, seed: int,
               workers: int = 1) -> tuple[dict[str, ProtocolResult], dict[str, list[float]]]:
    """Per method, the scores of the fused predictions on every split's scored (and validation) rows, and
    the mean weight per column over the splits."""
    def one(i: int):
        split = splits[i]
        rows = [r for r in (split.score, split.valid) if r is not None]
        return fit_and_predict(task, members, y, split.train, rows, readers, config, seed + i)

    if workers > 1 and len(splits) > 1:
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        with threadpool_limits(1), ThreadPoolExecutor(min(workers, len(splits))) as pool:
            per_split = list(pool.map(one, range(len(splits))))
    else:
        per_split = [one(i) for i in range(len(splits))]
    results = {m: ProtocolResult(protocol=name) for m in config.methods}
    for split, (fused, _) in zip(splits, per_split):
        for method, preds in fused.items():
            targets = [("scores", split.score)] + ([("valid_scores", split.valid)] if split.valid is not None else [])
            for (into, rows), pred in zip(targets, preds):
                for metric, value in score(task, y[rows], pred).items():
                    getattr(results[method], into).setdefault(metric, []).append(value)
    mean_weights = {m: np.mean([w[m] for _, w in per_split], axis=0).tolist() for m in config.methods}
    return results, mean_weights


def _member_columns(task: Task, members: list[np.ndarray], y: np.ndarray, train: np.ndarray,
                    predict_rows: list[np.ndarray], readers: dict[str, Any], inner_folds: int, seed: int,
                    n_classes: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Out-of-fold predictions on the training rows, and full-fit predictions on each row set, per column.

    Shapes: (rows, columns) for regression, (rows, columns, classes) of log-probabilities otherwise."""
    from sklearn.model_selection import KFold, StratifiedKFold

    y_train = y[train]
    kind = KFold if task == "regression" else StratifiedKFold
    inner = list(kind(inner_folds, shuffle=True, random_state=seed).split(np.zeros(len(train)), y_train))
    n_cols = len(members) * len(readers)
    shape = (n_cols,) if task == "regression" else (n_cols, n_classes)
    oof = np.zeros((len(train), *shape))
    outs = [np.zeros((len(rows), *shape)) for rows in predict_rows]
    col = 0
    for X in members:
        X_train = X[train].astype(np.float32, copy=False)
        for reader in readers.values():
            for k, (fit_rows, held) in enumerate(inner):
                model = reader.model(task, seed + 1000 * (k + 1)).fit(X_train[fit_rows], y_train[fit_rows])
                oof[held, col] = _predict(task, model, X_train[held], n_classes)
            model = reader.model(task, seed).fit(X_train, y_train)
            for out, rows in zip(outs, predict_rows):
                out[:, col] = _predict(task, model, X[rows].astype(np.float32, copy=False), n_classes)
            col += 1
    return oof, outs


def _predict(task: Task, model, X: np.ndarray, n_classes: int) -> np.ndarray:
    if task == "regression":
        return model.predict(X)
    proba = np.zeros((len(X), n_classes))
    proba[:, model.classes_] = model.predict_proba(X)  # a class absent from an inner fold keeps probability 0
    return np.log(np.clip(proba, 1e-6, 1.0))


def _log_odds(cols: np.ndarray) -> np.ndarray:
    """Log-probabilities centred per row and column: the softmax-invariant part, the readers' log-odds."""
    return cols - cols.mean(axis=2, keepdims=True)


def _spread(z: np.ndarray) -> np.ndarray:
    """Per column, the spread of its log-odds on the out-of-fold rows (1 where a column is constant)."""
    s = z.std(axis=(0, 2))
    return np.where(s > 1e-12, s, 1.0)


def _stack(task: Task, oof: np.ndarray, y: np.ndarray, n_classes: int, l2: float):
    if task == "regression":
        w, b = _lad_nonnegative(oof, y)
        return (lambda cols: b + cols @ w), w
    scale = _spread(_log_odds(oof))
    z = _log_odds(oof) / scale[None, :, None]
    w, b = _softmax_nonnegative(z, y, n_classes, l2)
    return (lambda cols: _softmax(b + np.einsum("rcK,c->rK", _log_odds(cols) / scale[None, :, None], w))), w


def _mean(task: Task, oof: np.ndarray, y: np.ndarray, n_classes: int, n_members: int, n_readers: int):
    metric = primary_metric(task)
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    chosen = []
    for m in range(n_members):
        cols = range(m * n_readers, (m + 1) * n_readers)
        fused_cols = [oof[:, c] if task == "regression" else np.exp(oof[:, c]) for c in cols]
        chosen.append(min(cols, key=lambda c: (sign * score(task, y, fused_cols[c - cols.start])[metric], c)))
    w = np.zeros(oof.shape[1])
    w[chosen] = 1.0 / len(chosen)
    if task == "regression":
        return (lambda cols: cols @ w), w
    scale = _spread(_log_odds(oof))

    def average(cols: np.ndarray) -> np.ndarray:
        return np.einsum("rcK,c->rK", _log_odds(cols) / scale[None, :, None], w)[:, None, :]

    # one slope (>= 0) and per-class intercepts: calibration only, the equal weights stay equal
    slope, b = _softmax_nonnegative(average(oof), y, n_classes, l2=0.0)
    return (lambda cols: _softmax(b + slope[0] * average(cols)[:, 0, :])), w


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _softmax_nonnegative(z: np.ndarray, y: np.ndarray, n_classes: int, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights w >= 0 per column and an intercept per class minimizing the mean cross-entropy of
    softmax(b + sum_c w_c z[:, c, :]) plus l2 * |w|^2. `z`: (rows, columns, classes)."""
    from scipy.optimize import minimize

    n_cols = z.shape[1]
    onehot = np.eye(n_classes)[y]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:n_cols], theta[n_cols:]
        logits = b + np.einsum("rcK,c->rK", z, w)
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
        value = -np.mean(np.sum(onehot * log_p, axis=1)) + l2 * w @ w
        g_logits = (p - onehot) / len(y)
        grad = np.concatenate([np.einsum("rK,rcK->c", g_logits, z) + 2 * l2 * w, g_logits.sum(axis=0)])
        return value, grad

    start = np.concatenate([np.full(n_cols, 1.0 / n_cols), np.zeros(n_classes)])
    bounds = [(0.0, None)] * n_cols + [(None, None)] * n_classes
    fit = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds)
    return fit.x[:n_cols], fit.x[n_cols:]


def _lad_nonnegative(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """min sum |y - b - X w| over w >= 0 and a free b: a linear program (u, v are the residual parts)."""
    from scipy import sparse
    from scipy.optimize import linprog

    n, k = X.shape
    # variables: w (k, >= 0), b (free), u (n, >= 0), v (n, >= 0); b + X w + u - v = y
    c = np.concatenate([np.zeros(k + 1), np.ones(2 * n)])
    eye = sparse.identity(n, format="csr")
    A = sparse.hstack([sparse.csr_matrix(np.column_stack([X, np.ones(n)])), eye, -eye], format="csr")
    bounds = [(0, None)] * k + [(None, None)] + [(0, None)] * (2 * n)
    fit = linprog(c, A_eq=A, b_eq=y, bounds=bounds, method="highs")
    if not fit.success:
        raise RuntimeError(f"the least-absolute-deviation stacker failed: {fit.message}")
    return fit.x[:k], float(fit.x[k])
