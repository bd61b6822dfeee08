"""Labelling sessions with the classifier `intents distill` saved: no LLM, no re-fitting (a refresh).

`distill_intents` saves its fitted classifier (joblib) under `runs/<schema>/intents/classifier-<sha>.joblib`,
named by the sha256 of its bytes, and records the file and the hash in the provenance of
`session_intents`. `classify_sessions` loads it back (refusing a file whose hash is not the recorded one),
builds the same inputs for the given sessions (their embedding plus the cheap session features, with the
shares of the values the classifier was fitted on) and replaces or adds their rows in `session_intents`,
keeping every other row whose session is still embedded. Some sessions (a refresh) are changed in place
(`producers.stores.outputs.change_in_place`: their rows, the refreshed users' rows of sessions no longer
embedded and the provenance of `session_intents_meta`, in one transaction; no other row is rewritten); the
Parquet copy is left behind the table (written again from it before a full publish reads it) and every
current row of the refreshed users goes to the refresh's own file (`snapshot`).
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
from producers.stores.outputs import (
    SESSION_EMBEDDINGS,
    SESSION_INTENTS,
    current_provenance,
    replace_sessions_in_place,
    write_output,
)
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
                      log: Log = lambda _: None, users: list | None = None,
                      snapshot: Path | None = None) -> Path | None:
    """Label `sessions` (None: every embedded session) with the saved classifier of the stored
    `session_intents` (which must be the one `classifier_sha256` names, when given) and store them beside
    every other stored label. The Parquet path: the stage file (every session), else `snapshot`.

    Some sessions: changed in place. `users` (a refresh's users; None: every user) bounds the rows whose
    session is looked up (a row of a session no longer embedded is dropped); `snapshot`: where every current
    row of `users` goes (None: no file)."""
    if snapshot is not None and (sessions is None or users is None):
        raise ValueError("a snapshot file is written for some users' sessions: pass `users` and `sessions`")
    started = time.perf_counter()
    import numpy as np
    import pyarrow as pa

    from producers.intents.distill import session_features

    con = home.connect(read_only=True)
    try:
        d = stored_definition(con, dataset)
        prov = current_provenance(con, home, SESSION_INTENTS, d.schema)
        if not prov:
            raise IntentsError(f"{d.name} has no session intents: run `llm4es intents distill {d.name}` first")
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
    kept = {k: v for k, v in prov.items() if k != "table_version"}  # the note's version is not this write's
    provenance = {**kept, "produced_at": produced_at.isoformat(), "code_version": code_version(),
                  "refresh": {"sessions_labelled": n, "at": produced_at.isoformat()}}
    arrow = pa.table({"session_id": pa.array(features["session_id"] if n else [], pa.string()),
                      "label": pa.array(predicted, pa.string()), "probabilities": float32_lists(proba)})
    s = f'"{d.schema}"'
    params = {"version": prov["taxonomy_version"], "classifier": prov["classifier"], "produced_at": produced_at,
              "code_version": provenance["code_version"]}
    labelled = f"""SELECT r.session_id, m.user_id, m.session_end, CAST($version AS INTEGER) AS taxonomy_version,
                   r.label, CAST(r.probabilities AS FLOAT[]) AS probabilities,
                   CAST($classifier AS VARCHAR) AS classifier, CAST($produced_at AS TIMESTAMP) AS produced_at,
                   CAST($code_version AS VARCHAR) AS code_version
            FROM new_rows AS r JOIN {s}.{SESSION_EMBEDDINGS.table} AS m USING (session_id)"""
    if sessions is None:
        def meta(con) -> None:
            con.execute(f"CREATE TABLE {SESSION_INTENTS.staging_name(d.schema, META)} AS SELECT taxonomy_version, "
                        f"labels, CAST($p AS JSON) AS provenance, CAST($t AS TIMESTAMP) AS produced_at FROM {s}.{META}",
                        {"p": json.dumps(provenance, default=str), "t": produced_at})

        path = write_output(home, SESSION_INTENTS, d.schema, arrow, labelled + " ORDER BY session_id", provenance,
                            log=log, also=meta, params=params)
    else:
        path = _store_some(home, d.schema, arrow, labelled, params, provenance, users, snapshot)
    log(f"{n:,} sessions labelled with the saved classifier {prov['classifier_file']} (no re-fitting) -> "
        f"{d.schema}.{TABLE}{f' (in place; every session of the users to {snapshot})' if snapshot else ''} "
        f"({time.perf_counter() - started:.1f}s)")
    return path


def _store_some(home: Home, schema: str, arrow: Any, labelled: str, params: dict, provenance: dict,
                users: list | None, snapshot: Path | None) -> Path | None:
    """The labelled sessions' rows replaced or added in place, the users' rows of sessions no longer embedded
    dropped, the meta's provenance updated (`replace_sessions_in_place`); every current row of `users` to
    `snapshot`."""
    s = f'"{schema}"'
    con = home.connect()
    try:
        con.register("new_rows", arrow)
        try:
            con.execute(f"CREATE OR REPLACE TEMP TABLE labelled AS {labelled}", params)
        finally:
            con.unregister("new_rows")

        def meta(c) -> None:
            c.execute(f"UPDATE {s}.{META} SET provenance = CAST($p AS JSON), produced_at = CAST($t AS TIMESTAMP)",
                      {"p": json.dumps(provenance, default=str), "t": params["produced_at"]})

        replace_sessions_in_place(con, home, SESSION_INTENTS, schema, "labelled", f"{s}.{SESSION_EMBEDDINGS.table}",
                                  users, snapshot, provenance, also=meta)
        con.execute("DROP TABLE labelled")
    finally:
        con.close()
    return snapshot
