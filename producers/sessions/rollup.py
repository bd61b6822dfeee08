"""What publish serves from `session_embeddings`: the session-keyed view and the users' rollup of it.

Named by `SESSION_EMBEDDINGS.rollup` (producers.stores.outputs); publish calls `session_columns` for the
value columns of its `sess` table, then `session_views` for the views. The rollup row at a session's end
holds the user's last session embedding and the element-wise mean over their last `recent` sessions.
"""
from __future__ import annotations

from typing import Any

from producers.stores.outputs import DerivedView

# Two sessions of a user ending at the same instant: the rollup row is the later one's.
LATEST = "QUALIFY row_number() OVER (PARTITION BY user_id, feature_timestamp ORDER BY n DESC) = 1"


def session_columns(types: dict[str, str]) -> tuple[str, str]:
    """The value columns of `sess` (SQL over the output file's columns) and the one a session needs."""
    return "CAST(embedding AS FLOAT[]) AS embedding", "embedding"


def session_views(con: Any, prov: dict, recent: int, user_dtype: str) -> tuple[dict, list[DerivedView]]:
    """The tags every view gets, and the views: `session_embedding` (per session) and `sessions` (per user)."""
    dims = [d for (d,) in con.execute("SELECT DISTINCT len(embedding) FROM sess").fetchall()]
    if len(dims) != 1:
        raise ValueError(f"session embeddings of {len(dims)} different lengths ({sorted(dims)[:5]})")
    dim = int(dims[0])
    # Element-wise mean over the last K vectors, in SQL: one row per (session, dimension), a window per dimension.
    rollup = f"""
        WITH long AS (SELECT user_id, n, generate_subscripts(embedding, 1) AS i, unnest(embedding) AS x FROM sess),
        means AS (SELECT user_id, n, i, avg(x) OVER (PARTITION BY user_id, i ORDER BY n
                  ROWS BETWEEN {recent - 1} PRECEDING AND CURRENT ROW) AS m FROM long),
        mean AS (SELECT user_id, n, CAST(list(m ORDER BY i) AS FLOAT[]) AS recent_mean_embedding FROM means
                 GROUP BY user_id, n)
        SELECT s.user_id, s.feature_timestamp, s.produced_at, s.embedding AS last_session_embedding,
               mean.recent_mean_embedding, CAST(s.n AS BIGINT) AS sessions_so_far
        FROM sess AS s JOIN mean USING (user_id, n) {LATEST}"""
    meta = {"model": prov.get("model") or "session-encoder", "checkpoint": prov.get("checkpoint"),
            "epoch": prov.get("epoch"), "run": prov.get("run_dir") or prov.get("run"), "dim": dim}
    vector = {"dtype": "Array(Float32)", "vector_length": dim}
    return meta, [
        DerivedView(
            kind="session_embedding", view="session_embedding",
            query="SELECT session_id, user_id, feature_timestamp, produced_at, embedding FROM sess",
            features=({"name": "user_id", "dtype": user_dtype}, {"name": "embedding", **vector}),
            what=f"session embeddings of {{dataset}} ({dim} dimensions, self-supervised session encoder), "
                 "one row per session",
            session_keyed=True),
        DerivedView(
            kind="sessions", view="session_embedding_rollup", query=rollup,
            features=({"name": "last_session_embedding", **vector}, {"name": "recent_mean_embedding", **vector},
                      {"name": "sessions_so_far", "dtype": "Int64"}),
            what=f"per user of {{dataset}}: the last session's embedding and the mean over the last {recent} "
                 "sessions, one row per session end",
            session_keyed=False),
    ]
