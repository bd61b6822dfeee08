"""Labelling sessions with the classifier `intents distill` saved: no LLM, no re-fitting (a refresh).

`distill_intents` saves its fitted classifier (joblib) under `runs/<schema>/intents/classifier-<sha>.joblib`,
named by the sha256 of its bytes, and records the file and the hash in the provenance of
`session_intents`. `classify_sessions` loads it back (refusing a file whose hash is not the recorded one),
builds the same inputs for the given sessions (their embedding plus the cheap session features, with the
shares of the values the classifier was fitted on) and replaces or adds their rows in `session_intents`,
keeping every other row whose session is still embedded.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from producers.intents.common import Log
from producers.intents.config import IntentsError
from producers.stores.outputs import SESSION_EMBEDDINGS, SESSION_INTENTS, read_provenance, write_output
from producers.stores.provenance import code_version
from producers.stores.warehouse import Home, float32_lists, stored_definition

TABLE = SESSION_INTENTS.table
META = SESSION_INTENTS.companions[0]


def save_classifier(home: Home, schema: str, model: Any) -> tuple[Path, str]:
    """The fitted classifier to `runs/<schema>/intents/classifier-<sha16>.joblib` (temp then rename); (path, sha256)."""
    import joblib

    buf = io.BytesIO()
    joblib.dump(model, buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    path = home.root / "runs" / schema / "intents" / f"classifier-{sha[:16]}.joblib"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path, sha


def load_classifier(home: Home, provenance: dict) -> Any:
    """The classifier a `session_intents` provenance names, checked against its recorded sha256."""
    import joblib

    rel, sha = provenance.get("classifier_file"), provenance.get("classifier_sha256")
    if not rel or not sha:
        raise IntentsError("these session intents were distilled before `intents distill` saved its classifier: "
                           "run `llm4es intents distill` (and publish) once")
    path = home.root / rel
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IntentsError(f"the intent classifier {path} cannot be read ({e.strerror}): run `llm4es intents "
                           "distill` (and publish) again") from e
    if hashlib.sha256(data).hexdigest() != sha:
        raise IntentsError(f"{path} is not the classifier these intents were labelled with (sha256 differs)")
    return joblib.load(io.BytesIO(data))


def classify_sessions(home: Home, dataset: str, sessions: list[str] | None, classifier_sha256: str | None = None,
                      log: Log = lambda _: None) -> Path:
    """Label `sessions` (None: every embedded session) with the saved classifier of the stored
    `session_intents` (which must be the one `classifier_sha256` names, when given) and store them beside
    every other stored label. The Parquet path."""
    started = time.perf_counter()
    import numpy as np
    import pyarrow as pa

    from producers.intents.distill import session_features

    con = home.connect(read_only=True)
    try:
        d = stored_definition(con, dataset)
        parquet = SESSION_INTENTS.parquet_path(home, d.schema)
        if not parquet.is_file():
            raise IntentsError(f"{d.name} has no session intents: run `llm4es intents distill {d.name}` first")
        prov = read_provenance(parquet)
        if classifier_sha256 is not None and prov.get("classifier_sha256") != classifier_sha256:
            raise IntentsError(f"{d.name}: the stored session intents are of another classifier "
                               f"({prov.get('classifier_file')}) than the one asked for; labelling some sessions "
                               "with it would mix two classifiers' labels")
        model = load_classifier(home, prov)
        features = (session_features(con, d, 0, inputs=prov["inputs"], sessions=sessions)
                    if sessions is None or sessions else None)
    finally:
        con.close()
    names, trained = list(prov["labels"]), list(prov["trained_labels"])
    if features is not None and features["columns"][0] != prov["inputs"][0]:
        raise IntentsError(f"{d.name}: the session embeddings are {features['columns'][0]}, the classifier was "
                           f"fitted on {prov['inputs'][0]}")
    n = 0 if features is None else len(features["session_id"])
    proba = np.zeros((n, len(names)), dtype=np.float32)
    if n:
        proba[:, [names.index(x) for x in trained]] = model.predict_proba(features["X"])
        proba /= proba.sum(axis=1, keepdims=True)
    predicted = [names[k] for k in proba.argmax(axis=1)] if n else []
    produced_at = datetime.now(timezone.utc).replace(tzinfo=None)
    provenance = {**prov, "produced_at": produced_at.isoformat(), "code_version": code_version(),
                  "refresh": {"sessions_labelled": n, "at": produced_at.isoformat()}}
    arrow = pa.table({"session_id": pa.array(features["session_id"] if n else [], pa.string()),
                      "label": pa.array(predicted, pa.string()), "probabilities": float32_lists(proba)})
    s = f'"{d.schema}"'

    def meta(con) -> None:
        con.execute(f"CREATE TABLE {SESSION_INTENTS.staging_name(d.schema, META)} AS SELECT taxonomy_version, labels, "
                    f"CAST($p AS JSON) AS provenance, CAST($t AS TIMESTAMP) AS produced_at FROM {s}.{META}",
                    {"p": json.dumps(provenance, default=str), "t": produced_at})

    path = write_output(home, SESSION_INTENTS, d.schema, arrow, f"""
        SELECT * FROM (
            SELECT r.session_id, m.user_id, m.session_end, CAST($version AS INTEGER) AS taxonomy_version, r.label,
                   CAST(r.probabilities AS FLOAT[]) AS probabilities, CAST($classifier AS VARCHAR) AS classifier,
                   CAST($produced_at AS TIMESTAMP) AS produced_at, CAST($code_version AS VARCHAR) AS code_version
            FROM new_rows AS r JOIN {s}.{SESSION_EMBEDDINGS.table} AS m USING (session_id)
            UNION ALL BY NAME
            SELECT * FROM {s}.{TABLE} WHERE session_id NOT IN (SELECT session_id FROM new_rows)
                   AND session_id IN (SELECT session_id FROM {s}.{SESSION_EMBEDDINGS.table}))
        ORDER BY session_id""", provenance, log=log, also=meta,
        params={"version": prov["taxonomy_version"], "classifier": prov["classifier"], "produced_at": produced_at,
                "code_version": provenance["code_version"]})
    log(f"{n:,} sessions labelled with the saved classifier {prov['classifier_file']} (no re-fitting) -> "
        f"{d.schema}.{TABLE} ({time.perf_counter() - started:.1f}s)")
    return path
