"""`intents distill`: a light classifier learns the LLM's intent labels from session embeddings.

Inputs per session: its embedding (`session_embeddings.embedding`) plus cheap features from SQL
(events, log duration, log-gap mean/max, and per categorical events field the shares of its
`top_values` most frequent values). The classifier (scikit-learn LogisticRegression on
standardised inputs, or LightGBM) is fit on a stratified split of the LLM-labelled sessions and
scored on the held-out rest: micro/macro F1, accuracy, per-label F1 and the confusion matrix
against the LLM's labels. Latency is measured in the same call: the classifier one session at a
time, the LLM on `llm_latency_sessions` held-out sessions through the same back end and prompt.

The fitted classifier then predicts every embedded session: `"<schema>".session_intents`
(label + probabilities in the taxonomy's label order; staging + swap, with a one-row
`session_intents_meta`) and `data/<schema>/session_intents.parquet` (provenance under the
Parquet metadata key `llm4es`). Reports: `reports/intents/<schema>/distill.{json,md}`.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb

from producers.datasets.definition import DatasetDefinition
from producers.enrich.backends import Backend, GenerationError, stable_seed
from producers.intents.common import Log, backend_for, md_cell, model_name
from producers.intents.config import DistillConfig, DistillResult, IntentsError
from producers.intents.prompts import label_prompt
from producers.intents.session_text import read_session_texts, require_session_tables
from producers.intents.store import LABELS, load_taxonomy
from producers.stores.provenance import code_version
from producers.stores.outputs import (
    SESSION_EMBEDDINGS,
    SESSION_INTENTS,
    current_provenance,
    read_provenance,
    write_output,
)
from producers.stores.warehouse import Home, float32_lists, one, stored_definition, table_exists

TABLE = SESSION_INTENTS.table
META = SESSION_INTENTS.companions[0]
EMBEDDINGS = SESSION_EMBEDDINGS.table
__all__ = ["TABLE", "distill_intents", "read_provenance"]


def distill_intents(home: Home, dataset: str, config: DistillConfig = DistillConfig(), log: Log = lambda _: None,
                    backend: Backend | None = None) -> DistillResult:
    started = time.perf_counter()
    config.check()
    import numpy as np

    # Labels of one labeller only (the one config.llm names): two models' labels are not one target.
    backend = backend_for(config.llm, backend, log)
    labeller = model_name(config.llm, backend)
    con = home.connect(read_only=True)
    try:
        d = stored_definition(con, dataset)
        require_session_tables(con, d)
        if not table_exists(con, d.schema, EMBEDDINGS):
            raise IntentsError(
                f"{d.name} has no {d.schema}.{EMBEDDINGS} table: run `llm4es sessions embed {d.name}` first")
        if not table_exists(con, d.schema, LABELS):
            raise IntentsError(f"{d.name} has no LLM intent labels: run `llm4es intents label {d.name}` first")
        version = config.taxonomy_version or _newest_labelled_version(con, d, labeller)
        taxonomy = load_taxonomy(con, d, version)
        llm_rows = con.execute(
            f'SELECT session_id, label, model, mode, latency_s FROM "{d.schema}".{LABELS} '
            "WHERE taxonomy_version = ? AND model = ? QUALIFY row_number() OVER (PARTITION BY session_id "
            "ORDER BY created_at DESC, mode) = 1", [taxonomy.version, labeller]).fetchall()
        if not llm_rows:
            models = [m for (m,) in con.execute(f'SELECT DISTINCT model FROM "{d.schema}".{LABELS} WHERE '
                                                "taxonomy_version = ? ORDER BY 1", [taxonomy.version]).fetchall()]
            raise IntentsError(f"{d.name}, taxonomy v{taxonomy.version}: no labels by {labeller}; labels there are "
                               f"by {', '.join(models) or 'nobody'}: pass the same --llm-backend/--llm-model as to "
                               "`llm4es intents label`")
        features = session_features(con, d, config.top_values)
        emb_provenance = _embedding_provenance(home, con, d)
    finally:
        con.close()
    names = taxonomy.names
    index = {s: i for i, s in enumerate(features["session_id"])}
    llm = {s: lb for s, lb, *_ in llm_rows if lb is not None and lb in names and s in index}
    counts = Counter(llm.values())
    trained = [n for n in names if counts.get(n, 0) >= 2]  # a stratified split needs 2 of each
    dropped = {n: counts[n] for n in names if 0 < counts.get(n, 0) < 2}
    if len(trained) < 2:
        raise IntentsError(f"{d.name}, taxonomy v{taxonomy.version}: {len(llm)} embedded session(s) carry an LLM "
                           f"label, and {len(trained)} label(s) have at least 2 examples ({dict(counts) or 'none'}); "
                           "a classifier needs 2 labels or more: label more sessions (`llm4es intents label`)")
    sessions = sorted(s for s, lb in llm.items() if lb in trained)
    X_all = features["X"]
    X = X_all[[index[s] for s in sessions]]
    y = np.array([trained.index(llm[s]) for s in sessions])
    from sklearn.model_selection import train_test_split

    n_test = max(math.ceil(config.test_share * len(sessions)), len(trained))
    if len(sessions) - n_test < len(trained):
        raise IntentsError(f"{d.name}: {len(sessions)} labelled sessions are too few to hold out {n_test} and still "
                           f"train on every one of {len(trained)} labels: label more sessions")
    train_idx, test_idx = train_test_split(np.arange(len(sessions)), test_size=n_test, random_state=config.seed,
                                           stratify=y)
    model = _classifier(config)
    t0 = time.perf_counter()
    model.fit(X[train_idx], y[train_idx])
    fit_seconds = time.perf_counter() - t0
    log(f"{config.classifier} on {X.shape[1]} inputs ({features['n_embedding']} embedding + "
        f"{X.shape[1] - features['n_embedding']} session features), {len(train_idx)} train / {len(test_idx)} held-out "
        f"sessions, {len(trained)} labels ({fit_seconds:.1f}s)")
    metrics = _metrics(model, X[test_idx], y[test_idx], trained)
    clf_latency = _classifier_latency(model, X[test_idx])
    held_out = [sessions[i] for i in test_idx]
    llm_latency, llm_n, mode = _llm_latency(home, d, taxonomy, held_out, llm_rows, config, backend, log)
    cached_lat = [lat for s, lb, m, md, lat in llm_rows if lat is not None and s in llm]
    cached_latency = float(sum(cached_lat) / len(cached_lat)) if cached_lat else None

    proba = np.zeros((X_all.shape[0], len(names)), dtype=np.float32)
    proba[:, [names.index(n) for n in trained]] = model.predict_proba(X_all)
    proba /= proba.sum(axis=1, keepdims=True)
    predicted = [names[k] for k in proba.argmax(axis=1)]
    llm_models = sorted({f"{m} ({md})" for s, lb, m, md, _ in llm_rows if s in llm})
    produced_at = datetime.now(timezone.utc).replace(tzinfo=None)
    provenance = {
        "output": TABLE, "dataset": d.name, "table": f"{d.schema}.{TABLE}", "taxonomy_version": taxonomy.version,
        "labels": names, "trained_labels": trained, "dropped_labels": dropped, "llm_models": llm_models,
        "llm_model": labeller, "taxonomy_backend": taxonomy.backend, "taxonomy_model": taxonomy.model,
        "classifier": classifier_name(config),
        "config": config.as_dict(), "inputs": features["columns"], "n_embedding": features["n_embedding"],
        "embeddings": emb_provenance, "n_labelled": len(sessions), "n_train": len(train_idx),
        "n_test": len(test_idx), "metrics": metrics, "produced_at": produced_at.isoformat(),
        "definition_fingerprint": d.fingerprint(), "code_version": code_version(),
    }
    from producers.intents.classify import save_classifier

    # saved, so a refresh labels new sessions with this very classifier (no re-training)
    saved, sha = save_classifier(home, d.schema, model)
    provenance.update(classifier_file=home.relative(saved), classifier_sha256=sha)
    parquet = _write(home, d.schema, features, predicted, proba, taxonomy.version, provenance, produced_at, log)
    latency = {"classifier_seconds_per_session": clf_latency, "llm_seconds_per_session": llm_latency,
               "llm_sessions": llm_n, "llm_mode": mode, "llm_model": labeller,
               "llm_cached_seconds_per_session": cached_latency}
    provenance["latency"] = latency
    report_json, report_md = _reports(home, d, provenance, metrics, latency)
    seconds = time.perf_counter() - started
    log(f"held-out agreement with the LLM: micro F1 {metrics['micro_f1']:.3f}, macro F1 {metrics['macro_f1']:.3f}; "
        f"{len(predicted):,} sessions -> {d.schema}.{TABLE}, {home.relative(parquet)} ({seconds:.1f}s)")
    return DistillResult(
        dataset=d.name, taxonomy_version=taxonomy.version, classifier=classifier_name(config), labels=names,
        trained_labels=trained, n_labelled=len(sessions), n_train=len(train_idx), n_test=len(test_idx),
        micro_f1=metrics["micro_f1"], macro_f1=metrics["macro_f1"], accuracy=metrics["accuracy"],
        per_label_f1=metrics["per_label_f1"], confusion=metrics["confusion"],
        classifier_seconds_per_session=clf_latency, llm_seconds_per_session=llm_latency, llm_sessions=llm_n,
        llm_cached_seconds_per_session=cached_latency, n_predicted=len(predicted), table=f"{d.schema}.{TABLE}",
        parquet_path=parquet, report_json=report_json, report_md=report_md, seconds=seconds, provenance=provenance)


def classifier_name(config: DistillConfig) -> str:
    if config.classifier == "lightgbm":
        return "lightgbm"
    return f"logreg(C={config.C:g}{', balanced' if config.class_weight_balanced else ''})"


def _newest_labelled_version(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, labeller: str) -> int:
    row = one(con, f'SELECT max(taxonomy_version) FROM "{d.schema}".{LABELS} WHERE label IS NOT NULL AND model = ?',
              [labeller])
    if not row or row[0] is None:
        raise IntentsError(f"{d.name} has no parsed intent label by {labeller} yet: run `llm4es intents label "
                           f"{d.name}` with the same --llm-backend/--llm-model")
    return int(row[0])


def session_features(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, top_values: int,
                     inputs: list[str] | None = None, sessions: list[str] | None = None) -> dict[str, Any]:
    """Per embedded session (or only these `sessions`): embedding + cheap features, as one float32 matrix (rows
    by session_id). `inputs`: the columns a fitted classifier was given (its provenance's `inputs`), so the
    shares are of the values it was fitted on, not of the values most frequent now."""
    import numpy as np

    s = f'"{d.schema}"'
    shares, columns = [], ["n_events", "log_duration", "log_gap_mean", "log_gap_max"]
    if inputs is not None:
        tops = [tuple(c[len("share:"):].split("=", 1)) for c in inputs if c.startswith("share:")]
    else:
        tops = []
        for f in d.events.fields:
            if f.kind != "categorical" or top_values <= 0:
                continue
            tops += [(f.name, v) for (v,) in con.execute(
                f'SELECT CAST("{f.name}" AS VARCHAR) AS v FROM {s}.session_events WHERE "{f.name}" IS NOT NULL '
                f"GROUP BY v ORDER BY count(*) DESC, v LIMIT {int(top_values)}").fetchall()]
    for name, v in tops:
        shares.append(f"avg(CASE WHEN CAST(e.\"{name}\" AS VARCHAR) = {_lit(v)} THEN 1.0 ELSE 0.0 END)")
        columns.append(f"share:{name}={v}")
    cheap = ", ".join(["count(*)", "ln(1 + any_value(s.duration_s))",
                       "coalesce(avg(ln(1 + e.gap_s)) FILTER (WHERE e.position > 1), 0)",
                       "coalesce(max(ln(1 + e.gap_s)), 0)", *shares])
    only = "" if sessions is None else "WHERE m.session_id IN (SELECT unnest($sessions)) "
    rows = con.execute(
        f"SELECT m.session_id, any_value(m.user_id), any_value(m.session_end), any_value(m.embedding), {cheap} "
        f"FROM {s}.{EMBEDDINGS} AS m JOIN {s}.sessions AS s USING (session_id) "
        f"JOIN {s}.session_events AS e USING (session_id) {only}GROUP BY m.session_id ORDER BY m.session_id",
        {} if sessions is None else {"sessions": list(sessions)}).fetchall()
    if inputs is not None and columns != [c for c in inputs if not c.startswith("embedding[")]:
        raise IntentsError(f"{d.name}: the classifier's inputs {inputs} cannot be rebuilt (got {columns})")
    if sessions is not None and len(rows) != len(set(sessions)):
        got = {r[0] for r in rows}
        raise IntentsError(f"{d.name}: {len(set(sessions)) - len(rows):,} sessions to label have no embedding "
                           f"(e.g. {sorted(set(sessions) - got)[:5]}): embed them first")
    if not rows:
        raise IntentsError(f"{d.name}: {d.schema}.{EMBEDDINGS} holds no session that is in {d.schema}.sessions: "
                           f"run `llm4es sessions embed {d.name}` again")
    emb = np.asarray([r[3] for r in rows], dtype=np.float32)
    cheap_x = np.asarray([r[4:] for r in rows], dtype=np.float32)
    return {"session_id": [r[0] for r in rows], "user_id": [r[1] for r in rows], "session_end": [r[2] for r in rows],
            "X": np.hstack([emb, cheap_x]), "n_embedding": emb.shape[1],
            "columns": [f"embedding[{emb.shape[1]}]", *columns]}


def _lit(v: str) -> str:
    return "'" + str(v).replace("'", "''") + "'"


def _classifier(config: DistillConfig):
    weight = "balanced" if config.class_weight_balanced else None
    if config.classifier == "lightgbm":
        from lightgbm import LGBMClassifier

        return LGBMClassifier(n_estimators=200, learning_rate=0.05, num_leaves=15, class_weight=weight,
                              random_state=config.seed, verbose=-1, n_jobs=1)
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # lbfgs fits the multinomial (softmax) model for more than two classes.
    return make_pipeline(StandardScaler(), LogisticRegression(C=config.C, max_iter=config.max_iter,
                                                              class_weight=weight, random_state=config.seed))


def _metrics(model, X, y, labels: list[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    pred = model.predict(X)
    ks = list(range(len(labels)))
    per = f1_score(y, pred, labels=ks, average=None, zero_division=0)
    return {"micro_f1": float(f1_score(y, pred, labels=ks, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(y, pred, labels=ks, average="macro", zero_division=0)),
            "accuracy": float(accuracy_score(y, pred)),
            "per_label_f1": {n: float(v) for n, v in zip(labels, per)},
            "support": {n: int((y == k).sum()) for k, n in enumerate(labels)},
            "confusion": confusion_matrix(y, pred, labels=ks).tolist(), "confusion_labels": labels,
            "chance_macro_f1": 1.0 / len(labels)}


def _classifier_latency(model, X) -> float:
    """Seconds per session for predict_proba called on one session at a time (the features ready)."""
    model.predict_proba(X[:1])  # warm-up
    t0 = time.perf_counter()
    for i in range(X.shape[0]):
        model.predict_proba(X[i:i + 1])
    return (time.perf_counter() - t0) / max(1, X.shape[0])


def _llm_latency(home: Home, d: DatasetDefinition, taxonomy, held_out: list[str], llm_rows: list, config: DistillConfig,
                 backend: Backend, log: Log) -> tuple[float | None, int, str | None]:
    """Seconds per session of the LLM on the first `llm_latency_sessions` held-out sessions (same prompt)."""
    if config.llm_latency_sessions <= 0 or not held_out:
        return None, 0, None
    modes = Counter(md for _, lb, _, md, _ in llm_rows if md)
    mode = config.mode or (modes.most_common(1)[0][0] if modes else "generate")
    chosen = held_out[: config.llm_latency_sessions]
    con = home.connect(read_only=True)
    try:
        texts = read_session_texts(con, d, chosen, config.text)
    finally:
        con.close()
    if mode == "score" and not callable(getattr(backend, "score_choices", None)):
        log(f"the {backend.name} backend cannot score choices: timing the LLM in generate mode")
        mode = "generate"
    prompts = [label_prompt(d.event_noun, taxonomy.labels, texts[s]) for s in chosen]
    # Warm-up (model load, first-call overheads) is not the per-session cost.
    if mode == "score":
        backend.score_choices(prompts[0], taxonomy.names)
    else:
        backend.generate([prompts[0]], [stable_seed(config.seed, "warmup")])
    t0 = time.perf_counter()
    for s, p in zip(chosen, prompts):
        if mode == "score":
            backend.score_choices(p, taxonomy.names)
        else:
            out = backend.generate([p], [stable_seed(config.seed, "label", s)])
            if out and isinstance(out[0], GenerationError):
                log(f"latency probe, session {s}: {out[0]}")
    seconds = (time.perf_counter() - t0) / len(chosen)
    log(f"LLM ({backend.name}, {mode}): {seconds:.3f} s per session over {len(chosen)} held-out sessions")
    return seconds, len(chosen), mode


def _embedding_provenance(home: Home, con: duckdb.DuckDBPyConnection, d: DatasetDefinition) -> dict[str, Any]:
    path = SESSION_EMBEDDINGS.parquet_path(home, d.schema)
    meta = current_provenance(con, home, SESSION_EMBEDDINGS, d.schema)  # the table's, even when its copy is behind
    if meta:
        return {"parquet": home.relative(path), **meta}
    n = one(con, f'SELECT count(*) FROM "{d.schema}".{EMBEDDINGS}')[0]
    return {"table": f"{d.schema}.{EMBEDDINGS}", "rows": int(n), "note": "no Parquet copy with provenance found"}


def _write(home: Home, schema: str, features: dict, predicted: list[str], proba, version: int, provenance: dict,
           produced_at: datetime, log: Log) -> Path:
    """The labels (and their meta row) through the one write path (`producers.stores.outputs.write_output`)."""
    import pyarrow as pa

    arrow = pa.table({"session_id": pa.array(features["session_id"], pa.string()),
                      "label": pa.array(predicted, pa.string()), "probabilities": float32_lists(proba)})

    def meta(con) -> None:
        con.execute(f"CREATE TABLE {SESSION_INTENTS.staging_name(schema, META)} AS SELECT "
                    "CAST($v AS INTEGER) AS taxonomy_version, CAST($labels AS JSON) AS labels, "
                    "CAST($p AS JSON) AS provenance, CAST($t AS TIMESTAMP) AS produced_at",
                    {"v": version, "labels": json.dumps(provenance["labels"]),
                     "p": json.dumps(provenance, default=str), "t": produced_at})

    return write_output(home, SESSION_INTENTS, schema, arrow, f"""
            SELECT r.session_id, m.user_id, m.session_end, CAST($version AS INTEGER) AS taxonomy_version,
                   r.label, CAST(r.probabilities AS FLOAT[]) AS probabilities,
                   CAST($classifier AS VARCHAR) AS classifier, CAST($produced_at AS TIMESTAMP) AS produced_at,
                   CAST($code_version AS VARCHAR) AS code_version
            FROM new_rows AS r JOIN "{schema}".{EMBEDDINGS} AS m USING (session_id)
            ORDER BY r.session_id""", provenance, log=log, also=meta,
                        params={"version": version, "classifier": provenance["classifier"],
                                "produced_at": produced_at, "code_version": provenance["code_version"]})


def _reports(home: Home, d: DatasetDefinition, provenance: dict, metrics: dict, latency: dict) -> tuple[Path, Path]:
    folder = home.reports_dir("intents", d.schema)
    js, md = folder / "distill.json", folder / "distill.md"
    js.write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    labels = metrics["confusion_labels"]
    speed = "n/a"
    if latency["llm_seconds_per_session"] and latency["classifier_seconds_per_session"]:
        ratio = latency["llm_seconds_per_session"] / latency["classifier_seconds_per_session"]
        speed = f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.2g}x"  # a word-overlap labeller can be faster

    def secs(v):
        return "n/a" if v is None else f"{v * 1000:.2f} ms"

    lines = [f"# Intent classifier distilled from the LLM: {d.name}, taxonomy v{provenance['taxonomy_version']}", "",
             f"Classifier `{provenance['classifier']}` on {provenance['inputs'][0]} + "
             f"{len(provenance['inputs']) - 1} session features; "
             f"LLM labels from {', '.join(provenance['llm_models'])}. "
             f"{provenance['n_train']} train / {provenance['n_test']} held-out sessions (stratified, seed "
             f"{provenance['config']['seed']}).", "",
             "| Agreement with the LLM (held-out) | Value |", "|---|---|",
             f"| micro F1 | {metrics['micro_f1']:.3f} |", f"| macro F1 | {metrics['macro_f1']:.3f} |",
             f"| accuracy | {metrics['accuracy']:.3f} |",
             f"| macro F1 of a uniform guess | {metrics['chance_macro_f1']:.3f} |",
             "", "| Latency per session | Value |", "|---|---|",
             f"| classifier (predict_proba, one session) | {secs(latency['classifier_seconds_per_session'])} |",
             f"| LLM, measured now ({latency['llm_mode']}, {latency['llm_sessions']} sessions, "
             f"{latency['llm_model']}) | "
             f"{secs(latency['llm_seconds_per_session'])} |",
             f"| LLM, mean recorded in the label cache | {secs(latency['llm_cached_seconds_per_session'])} |",
             f"| speed-up | {speed} |", "", "| Label | F1 | held-out support |", "|---|---|---|"]
    lines += [f"| `{n}` | {metrics['per_label_f1'][n]:.3f} | {metrics['support'][n]} |" for n in labels]
    lines += ["", "Confusion matrix (rows: the LLM's label, columns: the classifier's):", "",
              "| | " + " | ".join(f"`{n}`" for n in labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| `{n}` | " + " | ".join(str(c) for c in row) + " |" for n, row in zip(labels, metrics["confusion"])]
    if provenance["dropped_labels"]:
        lines += ["", f"Not learnt (fewer than 2 labelled sessions): {md_cell(provenance['dropped_labels'])}"]
    md.write_text("\n".join(lines) + "\n")
    return js, md
