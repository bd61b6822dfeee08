"""`llm4es evaluate`: LightGBM on features fetched from Feast, as a downstream team would do it.

Feature sets are named by kind (`agg`, `coles`, `llm4es`, and the session rollups `sessions`: last and
recent-mean session embedding, `intents`: intent shares over recent sessions) or by a published view's name; `+`
concatenates (the paper's ensembles, e.g. `coles+llm4es`). An ensemble is also reported late-fused
(`<set> (stacked)`, training/evaluate/fusion.py): each member read by both readers, the predictions
combined with weights fitted on inner out-of-fold predictions of the training rows, on the same splits.
`llm4es` is the dataset's default LLM4ES view (see `llm4es publish`); when that view comes from a
fine-tuning run whose other epochs were embedded and published too, the epoch is chosen per target
by the mean validation score on the training folds of the paper protocol (never the test set), and
the chosen epoch's views are used by both protocols.

Labels come from the warehouse's users table; features are fetched with Feast's
`get_historical_features` for every labelled user at the label time (default: the dataset's last
event, when MovieLens' static labels are known), so a feature computed from later data is never used.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from producers.errors import Llm4esError
from producers.stores.provenance import code_version
from producers.stores.warehouse import Home, stored_definition
from training.evaluate import report as report_files
from training.evaluate.fusion import FusionConfig, column_names, fused_name, run_fusion
from training.evaluate.probe import LinearProbe, linear_name
from training.evaluate.protocol import (METRICS, LgbmParams, ProtocolResult, Task, best_candidate,
                                        constant_baseline, cv_splits, default_workers, encode_labels, paper_splits,
                                        primary_metric, run_protocol)

Log = Callable[[str], None]
KINDS = ("agg", "coles", "llm4es", "sessions", "intents")
_PRODUCER = {"agg": "llm4es aggregate", "coles": "llm4es coles", "llm4es": "llm4es embed",
             "sessions": "llm4es sessions embed", "intents": "llm4es intents distill"}
PROTOCOLS = ("paper", "cv")
# What `evaluate` compares when no feature set is named; only the published ones are evaluated (the
# rest are named as missing), so a user with agg and CoLES but no LLM4ES yet gets those two.
DEFAULT_FEATURES = ("agg", "coles", "llm4es", "coles+llm4es", "coles+agg")
BASELINE = "no features"  # the constant predictor every report starts with


class EvaluateError(Llm4esError, ValueError):
    """The evaluation cannot run as asked (unknown target or feature set, nothing published, no labels)."""


@dataclass(frozen=True)
class EvaluateConfig:
    targets: tuple[str, ...] = ()  # label names; default: every label of the dataset
    features: tuple[str, ...] = ()  # feature sets to compare; default: those of DEFAULT_FEATURES that are published
    protocols: tuple[str, ...] = PROTOCOLS
    test_share: float = 0.1  # paper protocol: held-out test users
    folds: int = 5
    cv_repeats: int = 3  # cv protocol: repeats of the k-fold split
    seed: int = 0
    label_time: datetime | None = None  # when labels are known; default: the dataset's last event
    select_epoch: bool = True  # pick the LLM4ES epoch by validation score when several are published
    lgbm: LgbmParams = field(default_factory=LgbmParams)
    # the second reader: every feature set also read by a linear probe on the same views and splits,
    # reported as "<set> (linear)" (see training/evaluate/probe.py)
    linear_probe: bool = True
    linear: LinearProbe = field(default_factory=LinearProbe)
    # ensembles (`a+b`) also late-fused, one row per method: "<set> (stacked)" / "<set> (mean)"
    # (see training/evaluate/fusion.py); FusionConfig(methods=()) reports concatenation only
    fusion: FusionConfig = field(default_factory=FusionConfig)
    # splits fitted at once (threads, one core each); 0: the CPUs this process may use. Same scores
    # as 1 (each fit keeps its seed). On 2 cores evaluate is almost all single-threaded LightGBM fits
    # (profiled: 87% of the demo's evaluate; the linear probe 9%), so 2 nearly halves it when the
    # machine is otherwise idle, as in `llm4es demo`.
    workers: int = 0
    out_dir: Path | None = None  # default: <home>/reports/evaluate/<schema>


@dataclass(frozen=True)
class Missing:
    """A default feature set left out because a part of it is not published."""

    name: str
    reason: str


class View(Protocol):
    name: str
    kind: str
    is_default: bool
    run: str | None
    epoch: int | None
    text_kind: str | None


class FeatureSource(Protocol):
    """Where features come from: Feast in production (`FeastSource`)."""

    def views(self) -> list[View]: ...

    def matrices(self, views: list[str], entity_df: Any) -> dict[str, np.ndarray]:
        """One float matrix per view, rows aligned with `entity_df` (NaN where a user has no features)."""


@dataclass
class Part:
    token: str
    view: str
    candidates: list[str]  # the views epoch selection chooses among (just `view` when there is no choice)


@dataclass
class EvaluateResult:
    dataset: str
    report: dict  # this call's results
    paths: dict[str, Path]  # "json"/"markdown"/"png": the merged latest report; "run_*": this call's own files
    seconds: float
    merged: dict | None = None  # the latest report: this call's feature sets over compatible earlier calls'
    merge_note: str = ""  # how the latest report was formed (kept rows from earlier calls, or started anew)

    def table(self, protocol: str) -> list[tuple[str, dict[str, str]]]:
        """(feature set, {"target metric": "mean ± std"}) rows, for printing."""
        rows = []
        for name in self.report["feature_sets"]:
            cells = {}
            for target, metric in report_files.columns(self.report):
                entry = self.report["results"].get(target, {}).get(name)
                cells[f"{target} {metric}"] = report_files.cell(entry, protocol, metric)
            rows.append((name, cells))
        return rows


def evaluate(home: Home, dataset: str, config: EvaluateConfig = EvaluateConfig(), log: Log = lambda _: None,
             source: FeatureSource | None = None) -> EvaluateResult:
    started = time.perf_counter()
    _check(config)
    definition, labels, label_time = _labels(home, dataset, config)
    source = source or FeastSource(home, dataset)
    views = {v.name: v for v in source.views()}
    sets, missing = _feature_sets(config, list(views.values()))  # the missing ones are in the report
    needed = sorted({v for parts in sets.values() for p in parts for v in p.candidates})
    import pandas as pd

    users = sorted(set().union(*(set(u) for u, _ in labels.values())), key=str)
    entity_df = pd.DataFrame({"user_id": users, "event_timestamp": pd.Timestamp(label_time)})
    log(f"fetching {len(needed)} feature view(s) for {len(users):,} labelled users as of {label_time}")
    matrices = source.matrices(needed, entity_df)
    row_of = {u: i for i, u in enumerate(users)}
    coverage = {v: float(np.mean(~np.all(np.isnan(m), axis=1))) if m.shape[1] else 0.0 for v, m in matrices.items()}
    for v, share in coverage.items():
        if share < 1.0:
            log(f"{v}: features for {share:.1%} of the labelled users (the rest are NaN for LightGBM)")

    workers = config.workers or default_workers()
    results: dict[str, dict[str, dict]] = {}
    targets = []
    for target, (target_users, raw) in labels.items():
        spec = next(lbl for lbl in definition.users.labels if lbl.name == target)
        task: Task = spec.task
        y, classes = encode_labels(raw, task, spec.values)
        rows = np.asarray([row_of[u] for u in target_users])
        targets.append({"name": target, "task": task, "metrics": list(METRICS[task]), "n_users": len(rows),
                        "classes": [str(c) for c in classes]})
        splits = {"paper": paper_splits(y, task, config.seed, config.test_share, config.folds),
                  "cv": cv_splits(y, task, config.seed, config.folds, config.cv_repeats)}
        constant = {protocol: _summary(constant_baseline(protocol, y, task, splits[protocol]))
                    for protocol in config.protocols}
        results[target] = {BASELINE: {"views": [], "n_features": 0, "protocols": constant}}
        for name, parts in sets.items():
            log(f"{target}: {name}")
            chosen, candidates, tried = _choose(parts, matrices, rows, y, task, splits["paper"], config, workers)
            X = _concat([matrices[v] for v in chosen], rows)
            entry = {"views": chosen, "n_features": int(X.shape[1]), "reader": "lightgbm", "protocols": {}}
            if candidates:
                entry["candidates"] = candidates
                entry["chosen_view"] = next(v for v in chosen if v in candidates)
            for protocol in config.protocols:
                r = tried.get(tuple(chosen)) if protocol == "paper" else None
                r = r or run_protocol(protocol, X, y, task, splits[protocol], config.lgbm, config.seed, workers)
                entry["protocols"][protocol] = _summary(r)
            results[target][name] = entry
            if config.linear_probe:  # the same views (epoch chosen by LightGBM's validation score), same splits
                results[target][linear_name(name)] = {**{k: v for k, v in entry.items() if k != "protocols"},
                                                      "reader": "linear", "protocols": {
                    protocol: _summary(run_protocol(protocol, X, y, task, splits[protocol], config.linear, config.seed,
                                                    workers))
                    for protocol in config.protocols}}
            if len(parts) > 1 and config.fusion.methods:
                results[target].update(_fused_entries(name, chosen, entry, matrices, rows, y, task, splits, config,
                                                      workers))

    report = {
        "dataset": dataset, "schema": definition.schema, "label_time": str(label_time),
        "n_users": len(users), "targets": targets, "feature_sets": [BASELINE, *_report_rows(config, sets)],
        "missing": {m.name: m.reason for m in missing}, "results": results,
        "views": {v: _view_info(views[v]) for v in needed}, "coverage": coverage,
        "config": _config_json(config), "code_version": code_version(),
        "produced_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out_dir = config.out_dir or home.root / "reports" / "evaluate" / definition.schema
    saved = report_files.save(report, Path(out_dir))
    return EvaluateResult(dataset, report, saved.paths, time.perf_counter() - started, saved.merged, saved.note)


def _feature_sets(config: EvaluateConfig, views: list[View]) -> tuple[dict[str, list[Part]], list[Missing]]:
    """The feature sets to evaluate, resolved to views, and the default ones left out as unpublished.

    Sets the user names must all resolve (an error says which part does not); the default sets are
    filtered to the published ones, and only when none is published is that an error."""
    if config.features:
        return {name: resolve_feature_set(name, views, config.select_epoch) for name in config.features}, []
    sets, missing = {}, []
    for name in DEFAULT_FEATURES:
        try:
            sets[name] = resolve_feature_set(name, views, config.select_epoch)
        except EvaluateError as e:
            missing.append(Missing(name, _missing_reason(name, views) or str(e)))
    if not sets:
        producers = ", ".join(f"`{_PRODUCER[k]}`" for k in ("agg", "coles", "llm4es"))
        published = sorted({v.kind for v in views} & set(KINDS))
        hint = (f"; the published {', '.join(published)} can be asked for by name: "
                f"`--features {','.join(published)}`" if published else "")
        raise EvaluateError(f"none of the default feature sets ({', '.join(DEFAULT_FEATURES)}) is published for "
                            f"this dataset: run {producers} and then `llm4es publish`{hint}")
    return sets, missing


def _missing_reason(name: str, views: list[View]) -> str:
    kinds = {v.kind for v in views}
    absent = [t.strip() for t in name.split("+") if t.strip() in KINDS and t.strip() not in kinds]
    return "; ".join(f"no {k} view: run `{_PRODUCER[k]}` and `llm4es publish`" for k in absent)


def _report_rows(config: EvaluateConfig, sets: dict[str, list[Part]]) -> list[str]:
    """Report rows: each feature set, its linear-probe row when the probe runs, and an ensemble's fused rows."""
    rows = []
    for name, parts in sets.items():
        rows += [name, linear_name(name)] if config.linear_probe else [name]
        if len(parts) > 1:
            rows += [fused_name(name, method) for method in config.fusion.methods]
    return rows


def _readers(config: EvaluateConfig) -> dict[str, Any]:
    return {"lightgbm": config.lgbm, **({"linear": config.linear} if config.linear_probe else {})}


def _fused_entries(name: str, chosen: list[str], entry: dict, matrices: dict[str, np.ndarray], rows: np.ndarray,
                   y: np.ndarray, task: Task, splits: dict, config: EvaluateConfig, workers: int) -> dict[str, dict]:
    """The ensemble's late-fused rows: its members (the concatenation's views, epoch included) read apart."""
    readers = _readers(config)
    members = [matrices[v][rows] for v in chosen]
    per_protocol = {protocol: run_fusion(protocol, members, y, task, splits[protocol], readers, config.fusion,
                                         config.seed, workers)
                    for protocol in config.protocols}
    columns = column_names(chosen, list(readers))
    out = {}
    for method in config.fusion.methods:
        out[fused_name(name, method)] = {
            **{k: v for k, v in entry.items() if k not in ("protocols", "reader")},
            "reader": f"fusion: {method}", "fusion_columns": columns,
            "fusion_weights": {p: dict(zip(columns, w[method])) for p, (_, w) in per_protocol.items()},
            "protocols": {p: _summary(r[method]) for p, (r, _) in per_protocol.items()}}
    return out


def resolve_feature_set(name: str, views: list[View], select_epoch: bool = True) -> list[Part]:
    """`coles+llm4es` -> the views it concatenates (with epoch candidates for LLM4ES)."""
    parts = []
    for token in (t.strip() for t in name.split("+")):
        if not token:
            raise EvaluateError(f"feature set {name!r} has an empty part")
        parts.append(_resolve_token(token, views, select_epoch))
    return parts


def _resolve_token(token: str, views: list[View], select_epoch: bool) -> Part:
    if token in KINDS:
        of_kind = [v for v in views if v.kind == token]
        default = [v for v in of_kind if v.is_default] or of_kind[:1]
        if not default:
            raise EvaluateError(f"no {token} features are published for this dataset: run `{_PRODUCER[token]}` "
                                "and `llm4es publish` first")
        view = default[0]
    else:
        by_name = {v.name: v for v in views}
        matches = [v for n, v in by_name.items() if n == token or n.endswith(f"__{token}")]
        if len(matches) != 1:
            raise EvaluateError(f"feature set part {token!r} is neither a kind ({', '.join(KINDS)}) nor one published "
                                f"view; published: {', '.join(sorted(by_name)) or 'none'}")
        view = matches[0]
        if getattr(view, "join_key", "user_id") != "user_id":
            raise EvaluateError(f"{view.name} is keyed by session, not user: evaluate its user rollup "
                                "(`sessions` or `intents`) instead")
    candidates = [view.name]
    if select_epoch and view.kind == "llm4es" and view.run:
        same_run = [v for v in views if v.kind == "llm4es" and v.run == view.run and v.text_kind == view.text_kind
                    and v.epoch is not None]
        if len(same_run) > 1:
            candidates = [v.name for v in sorted(same_run, key=lambda v: v.epoch)]
    return Part(token, view.name, candidates)


def _choose(parts: list[Part], matrices: dict[str, np.ndarray], rows: np.ndarray, y: np.ndarray, task: Task,
            splits, config: EvaluateConfig,
            workers: int = 1) -> tuple[list[str], dict[str, float], dict[tuple, ProtocolResult]]:
    """The views to use; for a part with epoch candidates, the one with the best validation score.

    Also returns the paper-protocol results computed on the way, keyed by their views, so the
    chosen combination is not fitted a second time."""
    chosen = [p.view for p in parts]
    scores: dict[str, float] = {}
    paper: dict[tuple, ProtocolResult] = {}
    for i, part in enumerate(parts):
        if len(part.candidates) < 2:
            continue
        trials: dict[str, ProtocolResult] = {}
        for candidate in part.candidates:
            views = tuple(chosen[:i] + [candidate] + chosen[i + 1:])
            trials[candidate] = paper[views] = run_protocol("paper", _concat([matrices[v] for v in views], rows), y,
                                                            task, splits, config.lgbm, config.seed, workers)
        chosen[i] = best_candidate(trials, task)
        scores = {c: r.valid_mean(primary_metric(task)) for c, r in trials.items()}
    return chosen, scores, paper


def _concat(mats: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    return np.concatenate([m[rows] for m in mats], axis=1).astype(np.float32, copy=False)


def _summary(r: ProtocolResult) -> dict:
    out = {m: {"mean": r.mean(m), "std": r.std(m), "scores": r.scores[m]} for m in r.scores}
    for m, values in r.valid_scores.items():
        out[m]["valid_mean"] = float(np.mean(values))
    return out


def _labels(home: Home, dataset: str, config: EvaluateConfig):
    """{target: (user ids, label values)} for users with a label, the definition and the label time."""
    con = home.connect(read_only=True)
    try:
        definition = stored_definition(con, dataset)
        schema = definition.schema
        declared = [lbl.name for lbl in definition.users.labels] if definition.users else []
        if not declared:
            raise EvaluateError(f"{dataset} declares no labels (users.labels in its definition): nothing to predict")
        targets = list(config.targets) or declared
        unknown = [t for t in targets if t not in declared]
        if unknown:
            raise EvaluateError(f"unknown target(s) {', '.join(unknown)}; {dataset} has {', '.join(declared)}")
        label_time = config.label_time or con.execute(f'SELECT max(event_time) FROM "{schema}".events').fetchall()[0][0]
        labels = {}
        for t in targets:
            # only users with events can have features; the join keeps the others out
            rows = con.execute(f'SELECT u.user_id, u."{t}" FROM "{schema}".users AS u WHERE u."{t}" IS NOT NULL '
                               f'AND u.user_id IN (SELECT DISTINCT user_id FROM "{schema}".events) '
                               "ORDER BY u.user_id").fetchall()
            if len(rows) < 2 * config.folds:
                raise EvaluateError(f"{dataset}: only {len(rows)} users have a {t!r} label; need at least "
                                    f"{2 * config.folds} for {config.folds}-fold evaluation")
            labels[t] = ([r[0] for r in rows], [r[1] for r in rows])
    finally:
        con.close()
    if isinstance(label_time, datetime) and label_time.tzinfo is None:
        label_time = label_time.replace(tzinfo=timezone.utc)
    return definition, labels, label_time


def _check(config: EvaluateConfig) -> None:
    bad = [p for p in config.protocols if p not in PROTOCOLS]
    if bad or not config.protocols:
        raise EvaluateError(f"protocols must be among {', '.join(PROTOCOLS)}, not {', '.join(bad) or 'none'}")
    if not 0 < config.test_share < 1:
        raise EvaluateError(f"test_share must be between 0 and 1, not {config.test_share}")
    if config.workers < 0:
        raise EvaluateError(f"workers must be 0 (the usable CPUs) or more, not {config.workers}")
    if config.folds < 2 or config.cv_repeats < 1:
        raise EvaluateError("folds must be at least 2 and cv_repeats at least 1")


def _view_info(view: View) -> dict:
    keys = ("kind", "is_default", "model", "checkpoint", "epoch", "text_kind", "run", "dim", "source_hash")
    return {k: getattr(view, k, None) for k in keys}


def _config_json(config: EvaluateConfig) -> dict:
    out = asdict(config)
    out["out_dir"] = str(config.out_dir) if config.out_dir else None
    out["label_time"] = str(config.label_time) if config.label_time else None
    return out


class FeastSource:
    """Features through the Feast repo `llm4es publish` wrote: `get_historical_features`."""

    def __init__(self, home: Home, dataset: str):
        self.home, self.dataset = home, dataset
        self._views: list[View] | None = None

    def views(self) -> list[View]:
        from producers.stores.serving import published_views

        if self._views is None:  # the manifest, read once per evaluation
            self._views = published_views(self.home, self.dataset)
        return self._views

    def matrices(self, views: list[str], entity_df: Any) -> dict[str, np.ndarray]:
        from producers.stores.serving import historical_features

        infos = {v.name: v for v in self.views()}
        df = historical_features(self.home, self.dataset, views, entity_df)  # rows in entity_df's order
        out = {}
        for view in views:
            cols = [f"{view}__{f}" for f in infos[view].features]
            out[view] = np.concatenate([_as_matrix(df[c]) for c in cols], axis=1) if cols else np.zeros((len(df), 0))
        return out


def _as_matrix(column) -> np.ndarray:
    """A Feast column as a float matrix: a vector column (lists) becomes one column per dimension."""
    values = column.tolist()
    first = next((v for v in values if not _missing(v)), None)
    if first is None or np.isscalar(first):
        return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)[:, None]
    mat = np.full((len(values), len(first)), np.nan, dtype=np.float32)
    for i, v in enumerate(values):
        if not _missing(v):
            mat[i] = np.asarray(v, dtype=np.float32)
    return mat


def _missing(value) -> bool:
    """Feast's "no feature" for a user: None, or NaN where pandas filled the column."""
    return value is None or (isinstance(value, float) and np.isnan(value))
