"""Snapshots: each produced output's rows added to its history, the Parquet files Feast reads offline.

Every file is written beside its target (`writes`: temp -> target pairs) and renamed by the publish flow
only when all are written.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from producers.stores.warehouse import Home, sql_ident
from producers.publish.manifest import (_INT_TYPES, _choose_set, _every_set, _home_relative, _name_sets, _run_of,
                                        _set_id, _timestamp, _view_entry, view_kinds)
from producers.stores.outputs import OUTPUTS, PARQUET_KEY, FeatureOutput, read_provenance
from producers.stores.provenance import code_version
from producers.stores.serving import PublishError, feast_dir

if TYPE_CHECKING:
    import pyarrow as pa

    from producers.publish.flow import PublishConfig

Log = Callable[[str], None]


_FLOAT_TYPES = {"FLOAT", "DOUBLE", "REAL"}


def _connect():
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")  # TIMESTAMPTZ inputs become naive UTC, as the warehouse's
    return con


def _arrow(rel) -> "pa.Table":
    return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.fetch_arrow_table()


def _sql_path(p: Path) -> str:
    return "'" + str(p).replace("'", "''") + "'"


def _kv_provenance(path: Path) -> dict:
    return read_provenance(path, missing_ok=True)


def _user_type(con, path: Path) -> str:
    types = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({_sql_path(path)})").fetchall()}
    if "user_id" not in types:
        raise PublishError(f"{path} has no user_id column")
    return "INT64" if types["user_id"].upper() in _INT_TYPES else "STRING"


def _require(con, path: Path, columns: Sequence[str]) -> dict[str, str]:
    types = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({_sql_path(path)})").fetchall()}
    missing = [c for c in columns if c not in types]
    if missing:
        raise PublishError(f"{path} lacks the column(s) {', '.join(missing)}")
    return types


def _stage(home: Home, dataset: str, schema: str, inputs: dict[str, list[Path]], previous: dict | None,
           config: PublishConfig, log: Log, users: Sequence | None = None
           ) -> tuple[dict, list[tuple[Path, Path]], dict[str, int], dict[str, "pa.Table"]]:
    """The dataset's new manifest entry, the history files to rename into place (written as temps, removed
    again when anything fails), the new rows per view and, for a refresh (`users`, see `_stage_sessions`),
    per view the rows the online store must serve for the keys this publish changed (`online_rows`)."""
    writes: list[tuple[Path, Path]] = []
    try:
        entry, new_rows, online = _stage_into(writes, home, dataset, schema, inputs, previous, config, log, users)
    except BaseException:
        for tmp, _ in writes:
            tmp.unlink(missing_ok=True)
        raise
    return entry, writes, new_rows, online


def _stage_into(writes: list[tuple[Path, Path]], home: Home, dataset: str, schema: str,
                inputs: dict[str, list[Path]], previous: dict | None, config: PublishConfig,
                log: Log, users: Sequence | None = None) -> tuple[dict, dict[str, int], dict[str, "pa.Table"]]:
    feast = feast_dir(home)
    out = feast / schema
    con = _connect()
    try:
        user_types = {_user_type(con, p) for paths in inputs.values() for p in paths}
        if previous:
            user_types.add(previous["user_id_type"])
        if len(user_types) > 1:
            raise PublishError(f"{dataset}: the feature files disagree on the type of user_id (integer in some, "
                               f"text in others{', or the published history' if previous else ''}); produce them "
                               f"again from one ingest{f' or delete {out}' if previous else ''}")
        user_type = user_types.pop()
        id_sql = "CAST(user_id AS BIGINT)" if user_type == "INT64" else "CAST(user_id AS VARCHAR)"
        sets: dict[str, dict] = {k: dict(v) for k, v in (previous or {}).get("sets", {}).items()}
        new_rows: dict[str, int] = {}
        current: dict[str, list[str]] = {}
        # to the microsecond: a refresh finds what was appended after it (an append in the same second counts)
        now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        for kind, output in OUTPUTS.items():
            # only the session views are rewritten from their files: the others' files hold the users already
            only = ({"users": users, "previous": (previous or {}).get("sets", {})}
                    if output.publish_as == "sessions" else {})
            for path in inputs.get(kind, []):
                for info in _STAGERS[output.publish_as](con, output, path, id_sql, user_type, out, writes, config, log,
                                                        online=users is not None, **only):
                    info["published_at"] = now
                    # a session view holds the current production only: written afresh
                    fresh = output.publish_as == "sessions"
                    sets[info["set_id"]] = info if fresh else {**sets.get(info["set_id"], {}), **info}
                    current.setdefault(info["kind"], []).append(info["set_id"])
    finally:
        con.close()
    online: dict[str, "pa.Table"] = {}
    for set_id in {s for ids in current.values() for s in ids}:
        new_rows[set_id] = sets[set_id].pop("new_rows", 0)
        rows = sets[set_id].pop("online_rows", None)
        staged_once = sum(ids.count(set_id) for ids in current.values()) == 1  # else the rows of one file only
        if rows is not None and staged_once:
            online[set_id] = rows
        # the earliest row not yet known to be in the online store: materialization restarts there
        pending = [*sets[set_id].pop("new_timestamps", []), sets[set_id].get("pending_from")]
        sets[set_id]["pending_from"] = min(t for t in pending if t)
    defaults = dict((previous or {}).get("defaults", {}))
    choosing = [k for k, o in OUTPUTS.items() if o.view_every_set]  # the kinds whose default set can be chosen
    for kind, ids in current.items():
        if kind not in choosing:
            defaults[kind] = max(ids, key=lambda s: sets[s]["produced_at"] or "")
    for kind in choosing:
        if current.get(kind):
            defaults[kind] = _choose_set(current[kind], sets, _home_relative(home, config.llm4es_set), log)
        elif config.llm4es_set:
            raise PublishError(f"LLM4ES set {config.llm4es_set!r} asked for, but {dataset} has no "
                               f"{OUTPUTS[kind].description}")
    _name_sets(schema, sets)
    is_default = {s: s == defaults.get(sets[s]["kind"]) for s in sets}
    order = view_kinds()

    def rank(s: str) -> tuple:
        kind = sets[s]["kind"]
        return order.index(kind) if kind in order else len(order), not is_default[s], sets[s]["name"]

    views = [_view_entry(dataset, schema, sets[s], is_default[s])
             for s in sorted(sets, key=rank) if is_default[s] or _every_set(sets[s]["kind"])]
    entry = {"dataset": dataset, "schema": schema, "entity": f"{schema}__user", "user_id_type": user_type,
             "session_entity": f"{schema}__session",
             "published_at": now, "published_by": code_version(), "defaults": defaults, "sets": sets, "views": views}
    by_view = {v["set_id"]: v["name"] for v in views}
    return (entry, {by_view.get(s, s): n for s, n in new_rows.items()},
            {by_view[s]: rows for s, rows in online.items() if s in by_view})


def _stage_snapshots(con, output: FeatureOutput, path: Path, id_sql: str, user_type: str, out: Path, writes: list,
                     config: "PublishConfig", log: Log, online: bool = False) -> list[dict]:
    """One user-keyed set: its numeric columns (every one for an output with open columns, else the declared
    scalars) and declared vectors, added as a snapshot to its history."""
    types = _require(con, path, ["user_id", "feature_timestamp", *output.columns])
    prov = _kv_provenance(path)
    candidates = ([n for n in types if n not in ("user_id", "feature_timestamp", "produced_at")] if output.open_columns
                  else [n for n, _ in output.scalars])
    features, dtypes, dropped, dims = [], {}, [], {}
    for name in candidates:
        t = types[name]
        base = t.upper().split("(")[0]
        if base in _INT_TYPES:
            features.append(f'CAST("{name}" AS BIGINT) AS "{name}"')
            dtypes[name] = "Int64"
        elif base in _FLOAT_TYPES or base == "DECIMAL":
            features.append(f'CAST("{name}" AS DOUBLE) AS "{name}"')
            dtypes[name] = "Float64"
        else:
            dropped.append(f"{name} ({t})")
    for name in output.vectors:
        lengths = [n for (n,) in con.execute(f'SELECT DISTINCT len("{name}") FROM read_parquet({_sql_path(path)}) '
                                             f'WHERE "{name}" IS NOT NULL').fetchall()]
        if len(lengths) != 1:
            raise PublishError(f"{path}: {name} holds vectors of {len(lengths)} different lengths "
                               f"({sorted(lengths)[:5]})")
        features.append(f'CAST("{name}" AS FLOAT[]) AS "{name}"')
        dtypes[name], dims[name] = "Array(Float32)", int(lengths[0])
    if dropped:
        log(f"{path.name}: not numeric, not published: {', '.join(dropped)}")
    if not features:
        raise PublishError(f"{path} has no numeric feature columns")
    produced = _timestamp(prov.get("produced_at")) or datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    produced_sql = ('CAST("produced_at" AS TIMESTAMP)' if "produced_at" in types
                    else f"CAST('{produced.replace(tzinfo=None).isoformat()}' AS TIMESTAMP)")
    snapshot = (f"SELECT {id_sql} AS user_id, CAST(feature_timestamp AS TIMESTAMP) AS feature_timestamp, "
                f"{produced_sql} AS produced_at, {', '.join(features)} FROM read_parquet({_sql_path(path)})")
    target = out / f"{output.table}.parquet"
    stats, history_types = _merge(con, snapshot, target, writes, path, online=online)
    # typed as the history holds them: a column that was DOUBLE in an older snapshot stays DOUBLE
    dtypes = {n: (t if t.startswith("Array") else "Int64" if history_types[n].upper() == "BIGINT" else "Float64")
              for n, t in dtypes.items()}
    info = {"kind": output.kind, "set_id": output.kind, "source": str(target.relative_to(out.parent)),
            "file": str(path), "dtypes": dtypes, "source_hash": prov.get("source_hash"),
            "code_version": prov.get("code_version"), "ingest_id": prov.get("ingest_id"),
            "definition_fingerprint": prov.get("definition_fingerprint"), "as_of": prov.get("as_of"), **stats}
    if dims:
        info["vector_lengths"] = dims
    log(f"{path.name}: {stats['new_rows']:,} rows at {', '.join(stats['new_timestamps'])} "
        f"({len(dtypes)} features) -> {target}")
    return [info]


def _stage_sets(con, output: FeatureOutput, path: Path, id_sql: str, user_type: str, out: Path, writes: list,
                config: "PublishConfig", log: Log, online: bool = False) -> list[dict]:
    """User-keyed vectors, one set per distinct value of the output's set columns, each added to its history."""
    kind, key_cols = output.kind, output.sets
    (vector,) = output.vectors  # a set's one vector column
    types = _require(con, path, ["user_id", vector, *key_cols, "produced_at"])
    prov = _kv_provenance(path)
    src = f"read_parquet({_sql_path(path)})"
    cols = {c: (f'"{c}"' if c in types else "NULL") for c in ("epoch", "layers", "text_kind", "source_hash",
                                                               "code_version", "feature_timestamp")}
    keys = con.execute(f"SELECT DISTINCT {', '.join(key_cols)} FROM {src} ORDER BY ALL").fetchall()
    infos = []
    for values in keys:
        key = dict(zip(key_cols, values))
        where = " AND ".join(f'"{c}" IS NOT DISTINCT FROM ${c}' for c in key_cols)
        n_null_ts, n_null_vec, dims, epochs, hashes, codes, produced = con.execute(
            f"SELECT count(*) FILTER (WHERE {cols['feature_timestamp']} IS NULL), "
            f'count(*) FILTER (WHERE "{vector}" IS NULL), list(DISTINCT len("{vector}")) '
            f'FILTER (WHERE "{vector}" IS NOT NULL), '
            f"list(DISTINCT {cols['epoch']}), list(DISTINCT {cols['source_hash']}), "
            f"list(DISTINCT {cols['code_version']}), max(produced_at) FROM {src} WHERE {where}", key).fetchall()[0]
        label = f"{path.name}" + (f" ({', '.join(f'{k}={v}' for k, v in key.items())})" if len(keys) > 1 else "")
        if len(dims) != 1:
            raise PublishError(f"{label}: vectors of {len(dims)} different lengths ({sorted(dims)[:5]})" if dims
                               else f"{label}: no vectors")
        if n_null_vec:
            log(f"{label}: {n_null_vec:,} users without a vector, not published")
        if n_null_ts:
            log(f"{label}: {n_null_ts:,} rows have no feature_timestamp (made before it existed); using their "
                "produced_at, a later time, so no point-in-time join sees them too early")
        snapshot = (f"SELECT {id_sql} AS user_id, "
                    f"CAST(coalesce({cols['feature_timestamp']}, produced_at) AS TIMESTAMP) AS feature_timestamp, "
                    "CAST(produced_at AS TIMESTAMP) AS produced_at, "
                    f'CAST("{vector}" AS FLOAT[]) AS "{vector}", '
                    f"CAST({cols['source_hash']} AS VARCHAR) AS source_hash, "
                    f"CAST({cols['code_version']} AS VARCHAR) AS code_version FROM {src} "
                    f'WHERE {where} AND "{vector}" IS NOT NULL')
        set_id = _set_id(kind, key)
        target = out / kind / f"{set_id}.parquet"
        stats, _ = _merge(con, snapshot, target, writes, path, params=key, online=online)
        epochs = [e for e in epochs if e is not None]
        hashes = sorted(h for h in hashes if h is not None)
        codes = sorted(c for c in codes if c is not None)
        info = {"kind": kind, "set_id": set_id, "source": str(target.relative_to(out.parent)), "file": str(path),
                **key, "epoch": int(epochs[0]) if len(epochs) == 1 else None, "dim": int(dims[0]),
                "run": _run_of(key["checkpoint"]),
                "source_hash": _one_or_joined(hashes, prov.get("source_hash")),
                "code_version": _one_or_joined(codes, prov.get("code_version")),
                "texts_digest": prov.get("texts_digest"), "pooling": prov.get("pooling"), **stats}
        info["produced_at"] = max(stats["produced_at"] or "", produced.isoformat() if produced else "") or None
        log(f"{label}: {stats['new_rows']:,} vectors of {info['dim']} at {', '.join(stats['new_timestamps'])} "
            f"-> {target}")
        infos.append(info)
    return infos


def _stage_sessions(con, output: FeatureOutput, path: Path, id_sql: str, user_type: str, out: Path, writes: list,
                    config: "PublishConfig", log: Log, users: Sequence | None = None,
                    previous: dict | None = None, online: bool = False) -> list[dict]:
    """The views of a session-keyed output (`session_embeddings.parquet`, `session_intents.parquet`): the
    sessions themselves and the user rollups its producer defines (`output.rollup`).

    Rows are timestamped with the session's end: a session's vector or intent is known once it ended, so a
    point-in-time join at time t sees exactly the sessions that ended by t, and the rollup row at a session's
    end summarises the user's last `recent` sessions up to it. Unlike user snapshots, these files are
    written afresh on every publish (a re-built session table may have other session ids).

    `users` (a refresh): only these users' sessions changed, and `path` need hold no other user's. Their
    rows are computed from `path` and replace theirs in the published files; every other user's rows are
    kept as published (a user's rollup depends on their own sessions only, so this is what a full publish
    writes). Falls back to the whole of `path` (then every user's sessions) when the published views cannot
    be kept (none yet, none of these users' sessions, other columns, tags or `recent_sessions`) and says so.
    """
    recent = config.recent_sessions
    if recent < 1:
        raise PublishError(f"recent_sessions must be at least 1, not {recent}")
    producer = importlib.import_module(output.rollup)  # named by the output: publish imports no producer
    prov = _kv_provenance(path)
    types = _require(con, path, ["session_id", "user_id", output.timestamp])
    values, value = producer.session_columns(types)
    _require(con, path, [value])
    produced = _timestamp(prov.get("produced_at")) or datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    user_dtype = "Int64" if user_type == "INT64" else "String"
    common = {"source_hash": prov.get("source_hash") or (prov.get("data") or {}).get("source_hash"),
              "code_version": prov.get("code_version"), "file": str(path), "recent_sessions": recent,
              "produced_at": produced.isoformat()}
    parts = None
    if users is not None:
        _choose_users(con, users, id_sql)
        _build_sess(con, path, id_sql, values, value, output.timestamp, produced, only_chosen=True)
        parts = _partial_views(con, producer, prov, recent, user_dtype, out, previous or {})
        if parts is None and prov.get("snapshot_of"):  # a refresh's file: it holds these users' sessions only
            raise PublishError(f"{path} holds the sessions of {len(users):,} refreshed users only, and the published "
                               "session views cannot take them as they are (none published yet, or published with "
                               "another model, labels or recent_sessions): run a full `llm4es publish`")
        if parts is None:
            log(f"{path.name}: the published session views cannot be kept as they are; writing them from the "
                "whole file")
    if parts is None:
        _build_sess(con, path, id_sql, values, value, output.timestamp, produced, only_chosen=False)
        try:
            meta, views = producer.session_views(con, prov, recent, user_dtype)
        except ValueError as e:
            raise PublishError(f"{path}: {e}") from e
    else:
        meta, views = parts
    infos = []
    for i, view in enumerate(views):
        target = out / "sessions" / f"{view.kind}.parquet"
        if parts is None:
            stats, types_out = _write_fresh(con, view.query, target, writes, path)
        else:
            stats, types_out = _write_partial(con, f"part_{i}", target, view.session_keyed, writes, path, online)
        info = {"kind": view.kind, "set_id": view.kind, "source": str(target.relative_to(out.parent)), **common,
                **meta, "columns": types_out, "view": view.view, "features": list(view.features), "what": view.what,
                "session_keyed": view.session_keyed, **stats}
        log(f"{path.name}: {stats['new_rows']:,} {'sessions' if view.session_keyed else 'user rollup rows'}"
            f" -> {target}" + ("" if parts is None else f" ({len(users):,} users' rows written again)"))
        infos.append(info)
    con.execute("DROP TABLE sess")
    if parts is not None:
        for i in range(len(views)):
            con.execute(f"DROP TABLE part_{i}")
    return infos


def _choose_users(con, users: Sequence, id_sql: str) -> None:
    """The temp table `chosen` (user_id): the users, typed as the published user ids."""
    import pyarrow as pa

    con.register("chosen_in", pa.table({"user_id": pa.array(list(users))}))
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE chosen AS SELECT DISTINCT {id_sql} AS user_id FROM chosen_in")
    finally:
        con.unregister("chosen_in")


def _build_sess(con, path: Path, id_sql: str, values: str, value: str, end: str, produced: datetime,
                only_chosen: bool) -> None:
    """The temp table `sess` the producer's views read: the file's sessions (of the `chosen` users only)."""
    produced_sql = f"CAST('{produced.replace(tzinfo=None).isoformat()}' AS TIMESTAMP)"
    only = f" AND {id_sql} IN (SELECT user_id FROM chosen)" if only_chosen else ""
    con.execute(f"CREATE OR REPLACE TEMP TABLE sess AS SELECT CAST(session_id AS VARCHAR) AS session_id, "
                f"{id_sql} AS user_id, CAST({end} AS TIMESTAMP) AS feature_timestamp, {produced_sql} AS produced_at, "
                f"{values}, row_number() OVER (PARTITION BY {id_sql} ORDER BY {end}, session_id) AS n "
                f"FROM read_parquet({_sql_path(path)}) WHERE {value} IS NOT NULL AND {end} IS NOT NULL{only}")
    n_sessions, n_ids = con.execute("SELECT count(*), count(DISTINCT session_id) FROM sess").fetchall()[0]
    if not n_sessions and not only_chosen:
        raise PublishError(f"{path}: no sessions to publish")
    if n_ids != n_sessions:
        raise PublishError(f"{path}: {n_sessions - n_ids:,} session ids appear more than once")


def _partial_views(con, producer, prov: dict, recent: int, user_dtype: str, out: Path,
                   previous: dict) -> tuple[dict, list] | None:
    """The producer's views over `sess` (the chosen users' sessions), each view's rows in the temp table
    `part_<i>`; None when the published files cannot take them: a view not published from this output yet,
    its file gone, other tags (model, labels, dimension...) or other columns, so every row must be written.

    Equal tags over these users' sessions and the published ones mean equal tags over all of them (a tag
    derived from the sessions, like the labels present, is the same over any part that has it)."""
    if not con.execute("SELECT count(*) FROM sess").fetchall()[0][0]:
        return None  # no tags to compare: the views are derived from every session
    try:
        meta, views = producer.session_views(con, prov, recent, user_dtype)
    except ValueError:
        return None  # said again, with the file, by the whole-file path
    targets = [out / "sessions" / f"{view.kind}.parquet" for view in views]
    tags = {**meta, "recent_sessions": recent}
    if not all(t.is_file() and all((previous.get(v.kind) or {}).get(k) == tag for k, tag in tags.items())
               for v, t in zip(views, targets)):
        return None
    for i, (view, target) in enumerate(zip(views, targets)):
        con.execute(f"CREATE OR REPLACE TEMP TABLE part_{i} AS SELECT * FROM ({view.query})")
        published = f"SELECT * FROM read_parquet({_sql_path(target)})"
        if _columns(con, f"SELECT * FROM part_{i}") != _columns(con, published):
            for j in range(i + 1):
                con.execute(f"DROP TABLE part_{j}")
            return None
    return meta, views


def _columns(con, query: str) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in con.execute(f"DESCRIBE {query}").fetchall()]


_STAGERS = {"snapshots": _stage_snapshots, "sets": _stage_sets, "sessions": _stage_sessions}


def _write_fresh(con, query: str, target: Path, writes: list, source: Path) -> tuple[dict, dict[str, str]]:
    """Write the query's rows to a temp file beside `target` (appended to `writes`): no history kept."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE fresh AS SELECT * FROM ({query}) ORDER BY feature_timestamp, user_id")
    n_rows, first, last = con.execute("SELECT count(*), min(feature_timestamp), max(feature_timestamp) FROM fresh"
                                      ).fetchall()[0]
    types = {r[0]: r[1] for r in con.execute("DESCRIBE fresh").fetchall()}
    lo, hi = _changed_span(con, types, target) or (first, last)
    stats = {"new_rows": int(n_rows), "n_rows": int(n_rows), "new_timestamps": [lo.isoformat(), hi.isoformat()],
             "feature_timestamps": [last.isoformat()], "first_timestamp": first.isoformat()}
    stats["data_version"] = _write_beside(_arrow(con.sql("SELECT * FROM fresh")), target, writes,
                                          {"written_from": str(source), **stats})
    _note_removed_keys(con, target, "session_id" if "session_id" in types else "user_id", writes)
    con.execute("DROP TABLE fresh")
    return stats, types


def _write_partial(con, part: str, target: Path, session_keyed: bool, writes: list,
                   source: Path, online: bool = False) -> tuple[dict, dict[str, str]]:
    """`target` written again (a temp beside it, appended to `writes`) with the `chosen` users' rows replaced
    by the temp table `part` (same columns): what `_write_fresh` writes from every user's sessions, read and
    compared only for these users (the changed span, the removed keys)."""
    prev = f"read_parquet({_sql_path(target)})"
    theirs = "user_id IN (SELECT user_id FROM chosen)"
    cols = [c for c, _ in _columns(con, f"SELECT * FROM {part}")]
    listed = ", ".join(sql_ident(c) for c in cols)
    if session_keyed:
        (n_twice,) = con.execute(f"SELECT count(*) FROM (SELECT session_id FROM {prev} WHERE NOT {theirs}) "
                                 f"JOIN {part} USING (session_id)").fetchall()[0]
        if n_twice:
            raise PublishError(f"{source}: {n_twice:,} session ids appear more than once (also another user's)")
    con.execute(f"CREATE OR REPLACE TEMP TABLE fresh AS SELECT * FROM (SELECT {listed} FROM {prev} WHERE NOT "
                f"{theirs} UNION ALL SELECT {listed} FROM {part}) ORDER BY feature_timestamp, user_id")
    n_rows, first, last = con.execute("SELECT count(*), min(feature_timestamp), max(feature_timestamp) FROM fresh"
                                      ).fetchall()[0]
    if not n_rows:
        raise PublishError(f"{source}: no sessions to publish")
    types = {r[0]: r[1] for r in con.execute("DESCRIBE fresh").fetchall()}
    # every other user's rows are the published ones: only these users' can differ (read once, compared twice)
    con.execute(f"CREATE OR REPLACE TEMP TABLE theirs_before AS SELECT {listed} FROM {prev} WHERE {theirs}")
    compared = ", ".join(sql_ident(c) for c in cols if c != "produced_at")
    lo, hi = con.execute(f"SELECT min(feature_timestamp), max(feature_timestamp) FROM (SELECT {compared} FROM "
                         f"{part} EXCEPT SELECT {compared} FROM theirs_before)").fetchall()[0]
    if lo is None:
        lo = hi = last
    stats = {"new_rows": int(n_rows), "n_rows": int(n_rows), "new_timestamps": [lo.isoformat(), hi.isoformat()],
             "feature_timestamps": [last.isoformat()], "first_timestamp": first.isoformat()}
    stats["data_version"] = _write_beside(_arrow(con.sql("SELECT * FROM fresh")), target, writes,
                                          {"written_from": str(source), **stats})
    # another user's keys are all still there, and a key already noted as removed is no other user's
    _note_removed_keys(con, target, "session_id" if session_keyed else "user_id", writes,
                       previous="theirs_before", current=part)
    if online:
        stats["online_rows"] = _latest(con, part, "session_id" if session_keyed else "user_id", "true",
                                       previous="theirs_before")
    con.execute("DROP TABLE fresh")
    con.execute("DROP TABLE theirs_before")
    return stats, types


def _changed_span(con, types: dict[str, str], target: Path) -> tuple | None:
    """The first and last timestamp of the rows of `fresh` that `target` (its previous version) lacks, all
    columns but produced_at compared: materialization need only restart at the first (a refresh changes a
    few users' latest sessions, not the year before). None when every row counts (no previous version,
    other columns); (last, last) when none changed."""
    if not target.is_file():
        return None
    old = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({_sql_path(target)})").fetchall()}
    if old != types:
        return None
    cols = ", ".join(sql_ident(c) for c in types if c != "produced_at")
    lo, hi, last = con.execute(
        f"SELECT min(feature_timestamp), max(feature_timestamp), (SELECT max(feature_timestamp) FROM fresh) FROM "
        f"(SELECT {cols} FROM fresh EXCEPT SELECT {cols} FROM read_parquet({_sql_path(target)}))").fetchall()[0]
    return (lo, hi) if lo is not None else (last, last)


def removed_keys_path(history: Path) -> Path:
    """Beside a history written afresh: the keys its previous version had and it lacks, until publish has
    cleared their online rows."""
    return history.with_name(f"{history.stem}.removed.parquet")


def _note_removed_keys(con, target: Path, key: str, writes: list, previous: str | None = None,
                       current: str = "fresh") -> None:
    """The keys of `target`'s previous version (and of a removal list not cleared yet) that `fresh` lacks.
    `previous` and `current`: the part of each to compare (FROM clauses), when the rest is known to be kept."""
    removed = removed_keys_path(target)
    known = [f"SELECT DISTINCT {key} FROM {src}" for src, there in
             ((previous or f"read_parquet({_sql_path(target)})", target.is_file()),
              (f"read_parquet({_sql_path(removed)})", removed.is_file())) if there]
    if not known:
        return
    gone = _arrow(con.sql(f"SELECT * FROM ({' UNION '.join(known)}) "
                          f"EXCEPT SELECT DISTINCT {key} FROM {current} ORDER BY 1"))
    if gone.num_rows:
        _write_beside(gone, removed, writes, {"removed_from": str(target)})


def _merge(con, snapshot: str, target: Path, writes: list, source: Path,
           params: dict | None = None, online: bool = False) -> tuple[dict, dict[str, str]]:
    """Write `target`'s history plus the snapshot to a temp file beside it (appended to `writes`).
    `online`: also the latest history row of each user of the snapshot (`stats["online_rows"]`)."""

    con.execute(f"CREATE OR REPLACE TEMP TABLE snap AS SELECT * FROM ({snapshot}) "
                "QUALIFY row_number() OVER (PARTITION BY user_id, feature_timestamp ORDER BY produced_at DESC) = 1",
                params or {})
    n_new, new_ts = con.execute("SELECT count(*), list(DISTINCT feature_timestamp ORDER BY feature_timestamp) "
                                "FROM snap").fetchall()[0]
    if not n_new:
        raise PublishError(f"{source}: no rows to publish")
    if target.is_file():
        old = (f"SELECT * FROM read_parquet({_sql_path(target)}) AS h WHERE NOT EXISTS (SELECT 1 FROM snap AS s "
               "WHERE s.user_id = h.user_id AND s.feature_timestamp = h.feature_timestamp)")
        query = f"SELECT * FROM ({old}) UNION ALL BY NAME SELECT * FROM snap"
    else:
        query = "SELECT * FROM snap"
    con.execute(f"CREATE OR REPLACE TEMP TABLE hist AS SELECT * FROM ({query}) ORDER BY feature_timestamp, user_id")
    n_rows, all_ts, produced = con.execute(
        "SELECT count(*), list(DISTINCT feature_timestamp ORDER BY feature_timestamp), max(produced_at) FROM hist"
    ).fetchall()[0]
    table = _arrow(con.sql("SELECT * FROM hist ORDER BY feature_timestamp, user_id"))
    stats = {"new_rows": int(n_new), "new_timestamps": [t.isoformat() for t in new_ts], "n_rows": int(n_rows),
             "feature_timestamps": [t.isoformat() for t in all_ts],
             "produced_at": produced.isoformat() if produced else None}
    history_types = {r[0]: r[1] for r in con.execute("DESCRIBE hist").fetchall()}
    stats["data_version"] = _write_beside(table, target, writes, {"history_of": str(source), **stats})
    if online:
        stats["online_rows"] = _latest(con, "hist", "user_id", "user_id IN (SELECT user_id FROM snap)")
    con.execute("DROP TABLE snap")
    con.execute("DROP TABLE hist")
    return stats, history_types


def _latest(con, table: str, key: str, where: str, previous: str | None = None) -> "pa.Table":
    """The latest row (by feature_timestamp, then produced_at) of each `key` among `table`'s rows matching
    `where`: what a materialization over the whole history leaves in the online store for these keys, as
    Feast's offline store picks it. `previous` (a FROM clause: these keys' rows as published before): only the
    keys whose latest row differs from the one published (produced_at aside), the online store serving it."""
    def latest(source: str) -> str:
        return (f"SELECT * FROM {source} QUALIFY row_number() OVER (PARTITION BY {key} "
                "ORDER BY feature_timestamp DESC, produced_at DESC) = 1")

    query = latest(f"{table} WHERE {where}")
    if previous is not None:
        cols = ", ".join(sql_ident(c) for c, _ in _columns(con, f"SELECT * FROM {table}")
                         if c != "produced_at")
        query = (f"SELECT * FROM ({query}) WHERE {key} NOT IN (SELECT {key} FROM (SELECT {cols} FROM ({query}) "
                 f"INTERSECT SELECT {cols} FROM ({latest(previous)})))")
    return _arrow(con.sql(f"{query} ORDER BY {key}"))


def _write_beside(table: "pa.Table", target: Path, writes: list, provenance: dict) -> str:
    """`table` with `provenance` in its metadata, to a temp file beside `target` (appended to `writes`, renamed
    into place only when every file of the publish is written); returns the file's hash (its data version)."""
    import pyarrow.parquet as pq

    meta = dict(table.schema.metadata or {})
    meta[PARQUET_KEY] = json.dumps({**provenance, "code_version": code_version()}).encode()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    pq.write_table(table.replace_schema_metadata(meta), tmp)
    writes.append((tmp, target))
    return _file_hash(tmp)


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _one_or_joined(values: list[str], fallback: str | None) -> str | None:
    """The one value the rows share, else all of them joined, else the provenance's."""
    if len(values) == 1:
        return values[0]
    return ",".join(values) if values else fallback
