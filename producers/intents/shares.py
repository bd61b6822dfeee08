"""What publish serves from `session_intents`: the session-keyed view and each user's intent shares.

Named by `SESSION_INTENTS.rollup` (producers.stores.outputs); publish calls `session_columns` for the
value columns of its `sess` table, then `session_views` for the views. The shares row at a session's end
holds the share of each intent among the user's last `recent` sessions.
"""
from __future__ import annotations

from typing import Any

from producers.sessions.rollup import LATEST
from producers.stores.outputs import DerivedView, feature_slug


def session_columns(types: dict[str, str]) -> tuple[str, str]:
    """The value columns of `sess` (SQL over the output file's columns) and the one a session needs."""
    version = "taxonomy_version" if "taxonomy_version" in types else "NULL"
    return ("CAST(label AS VARCHAR) AS intent, CAST(probabilities AS FLOAT[]) AS intent_probabilities, "
            f"CAST({version} AS BIGINT) AS taxonomy_version"), "label"


def intent_labels(con: Any, prov: dict) -> list[str]:
    """The taxonomy's labels in order (recorded by `llm4es intents distill`), else the labels present."""
    labels = [str(lbl) for lbl in prov.get("labels") or []]
    if not labels:
        labels = [v for (v,) in con.execute("SELECT DISTINCT intent FROM sess WHERE intent IS NOT NULL ORDER BY 1")
                  .fetchall()]
    slugs = [feature_slug(lbl) for lbl in labels]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"intent labels {labels} do not give distinct feature names")
    return labels


def session_views(con: Any, prov: dict, recent: int, user_dtype: str) -> tuple[dict, list[DerivedView]]:
    """The tags every view gets, and the views: `session_intent` (per session) and `intents` (per user)."""
    labels = intent_labels(con, prov)
    window = f"PARTITION BY user_id ORDER BY n ROWS BETWEEN {recent - 1} PRECEDING AND CURRENT ROW"
    shares = ", ".join(f"avg(CAST(intent = '{lbl.replace(chr(39), chr(39) * 2)}' AS DOUBLE)) OVER w AS "
                       f'"share__{feature_slug(lbl)}"' for lbl in labels)
    versions = [v for (v,) in con.execute("SELECT DISTINCT taxonomy_version FROM sess").fetchall()]
    version = versions[0] if len(versions) == 1 else None
    meta = {"model": prov.get("llm_model") or prov.get("model"), "labels": labels, "dim": len(labels),
            "taxonomy_version": version, "classifier": prov.get("classifier"),
            # which saved classifier labelled them: a refresh labels new sessions with this one only
            "classifier_sha256": prov.get("classifier_sha256")}
    return meta, [
        DerivedView(
            kind="session_intent", view="session_intent",
            query=("SELECT session_id, user_id, feature_timestamp, produced_at, intent, intent_probabilities, "
                   "taxonomy_version FROM sess"),
            features=({"name": "user_id", "dtype": user_dtype}, {"name": "intent", "dtype": "String"},
                      {"name": "intent_probabilities", "dtype": "Array(Float32)", "vector_length": len(labels)},
                      {"name": "taxonomy_version", "dtype": "Int64"}),
            what=(f"intent labels of {{dataset}} sessions (LLM taxonomy v{version} distilled into a classifier; "
                  f"probabilities in the order {', '.join(labels)}), one row per session"),
            session_keyed=True),
        DerivedView(
            kind="intents", view="intent_shares",
            query=(f"SELECT user_id, feature_timestamp, produced_at, {shares}, count(*) OVER w AS recent_sessions "
                   f"FROM sess WINDOW w AS ({window}) {LATEST}"),
            features=(*({"name": f"share__{feature_slug(lbl)}", "dtype": "Float64"} for lbl in labels),
                      {"name": "recent_sessions", "dtype": "Int64"}),
            what=(f"per user of {{dataset}}: the share of each intent among the last {recent} sessions "
                  f"({', '.join(labels)}), one row per session end"),
            session_keyed=False),
    ]

