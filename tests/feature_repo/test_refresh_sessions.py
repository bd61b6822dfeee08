"""`llm4es refresh` of sessions, session embeddings and intents: only the changed visitors' new or changed
sessions are cut, embedded (served encoder) and labelled (served classifier) again, gated, and served."""
from __future__ import annotations

import os
import re
import shutil
from datetime import timedelta

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pyarrow.parquet as pq
import pytest

from producers.aggregate import AggregateConfig, aggregate
from producers.datasets.definition import parse_definition
from producers.enrich.options import LLMOptions
from producers.ingest import IngestConfig, ingest
from producers.ingest.append import append
from producers.intents import DistillConfig, LabelConfig, distill_intents, import_taxonomy, label_sessions
from producers.publish import PublishConfig, historical_features, online_features, publish
from producers.refresh import RefreshConfig, RefreshError, refresh
from producers.sessions import SessionEncoderConfig, build_sessions, embed_sessions, train_encoder
from producers.stores.warehouse import Home
from tests.feature_repo.conftest import same_bits
from tests.fixtures.clicks_files import CLICKS_YAML, write_clicks
from tests.fixtures.spies import record_connects, record_materializations
from validation.run import ValidateConfig, validate
from validation.snapshot_gate import SnapshotGateError

os.environ.setdefault("FEAST_USAGE", "False")

CLICKS = parse_definition(CLICKS_YAML, "clicks.yaml")
DATASET, SCHEMA = "clicks", "clicks"
TINY = SessionEncoderConfig(d_model=16, n_layers=1, n_heads=2, max_events=8, max_categories=50, text_buckets=64,
                            max_tokens=4, epochs=1, batch_size=16, lr=3e-3, seed=3, device="cpu", progress=False)
LEXICAL = LLMOptions(backend="lexical")
TAXONOMY = ("garden: garden pages, rose, shovel and seeds\nkitchen: kitchen pages, knife, pan and spoon\n"
            "books: books pages, novel, poetry and atlas\n")
OPEN, NEW, LATE = 2, 5, 9  # a visitor whose last visit gains clicks, one with a new visit, one with a late click
CHANGED = [OPEN, NEW, LATE]
EMB, INTENT = f"{SCHEMA}__session_embedding__embedding", f"{SCHEMA}__session_intent__intent"
LAST = f"{SCHEMA}__session_embedding_rollup__last_session_embedding"
SO_FAR = f"{SCHEMA}__session_embedding_rollup__sessions_so_far"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Clicks ingested; sessions built, a tiny encoder trained, sessions embedded, labelled by word overlap with
    a written taxonomy, a classifier distilled; aggregates; all published and materialized."""
    root = tmp_path_factory.mktemp("refresh-sessions")
    folder = write_clicks(root / "clicks", visitors=20, visits=4)
    home = Home.resolve(root / "home")
    ingest(home, CLICKS, IngestConfig(source=folder))
    assert validate(home, DATASET, ValidateConfig(data_docs=False)).success
    build_sessions(home, DATASET)
    train_encoder(home, DATASET, TINY)
    embed_sessions(home, DATASET, TINY)
    (root / "taxonomy.txt").write_text(TAXONOMY)
    import_taxonomy(home, DATASET, root / "taxonomy.txt")
    label_sessions(home, DATASET, LabelConfig(sample_size=0, llm=LEXICAL, progress=False))
    distill_intents(home, DATASET, DistillConfig(llm=LEXICAL, llm_latency_sessions=0, progress=False))
    aggregate(home, DATASET, AggregateConfig())
    publish(home, DATASET, PublishConfig(materialize=True))
    return root, home


def sql(home: Home, query: str) -> list:
    con = home.connect(read_only=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def new_clicks(home: Home) -> list[str]:
    """Clicks for CHANGED: OPEN's last visit goes on after the last stored click (a session still open at the
    as-of), NEW starts a new visit, LATE gets a click in the middle of its first visit (a late event)."""
    (as_of,) = sql(home, f"SELECT max(event_time) FROM {SCHEMA}.events")[0]
    (last_visit,) = sql(home, f"SELECT visit FROM {SCHEMA}.events WHERE user_id = {OPEN} "
                              "ORDER BY event_time DESC LIMIT 1")[0]
    start, end = sql(home, f"SELECT min(event_time), max(event_time) FROM {SCHEMA}.events WHERE visit = 'v{LATE}-1'")[0]
    rows = [f"{OPEN},{last_visit},{as_of + timedelta(minutes=k + 1):%Y-%m-%d %H:%M:%S},garden/rose,20.5,garden rose"
            for k in range(3)]
    rows += [f"{NEW},v{NEW}-9,{as_of + timedelta(hours=2, minutes=k):%Y-%m-%d %H:%M:%S},books/novel,8.0,books novel"
             for k in range(4)]
    rows.append(f"{LATE},v{LATE}-1,{start + (end - start) / 2:%Y-%m-%d %H:%M:%S},kitchen/pan,55.0,kitchen pan")
    return rows


@pytest.fixture
def home(served, tmp_path):
    """A copy of the served home with the new clicks appended and validated."""
    _, built = served
    h = Home.resolve(shutil.copytree(built.root, tmp_path / "home"))
    delta = tmp_path / "delta"
    delta.mkdir()
    (delta / "clicks.csv").write_text("visitor,visit,ts,page,price,query\n" + "\n".join(new_clicks(h)) + "\n")
    append(h, CLICKS, IngestConfig(source=delta))
    assert validate(h, DATASET, ValidateConfig(data_docs=False)).success
    return h


def sessions_by_user(home: Home) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for s, u in sql(home, f"SELECT session_id, user_id FROM {SCHEMA}.sessions ORDER BY user_id, end_time"):
        out.setdefault(u, []).append(s)
    return out


def test_refresh_serves_new_session_vectors_and_intents_for_exactly_the_changed_visitors(home):
    before_sessions = sessions_by_user(home)
    users = sorted(before_sessions)
    ids = sorted(s for ss in before_sessions.values() for s in ss) + [f"v{NEW}-9"]
    before = online_features(home, DATASET, ["session_embedding", "session_intent"], ids)
    old = dict(zip(before["session_id"], before[EMB]))
    old_intent = dict(zip(before["session_id"], before[INTENT]))
    before_users = online_features(home, DATASET, ["session_embedding_rollup"], users)
    open_visit = before_sessions[OPEN][-1]
    (n_open,) = sql(home, f"SELECT n_events FROM {SCHEMA}.sessions WHERE session_id = '{open_visit}'")[0]

    r = refresh(home, DATASET, log=print)
    assert r.published and r.users == CHANGED and r.gate_passed
    assert {"agg", "sessions", "intents"} <= set(r.refreshed) and r.not_refreshed == []
    assert "mean cosine" in r.gate["sessions"] and "all checks passed" in r.gate["sessions"]
    assert {"sessions", "session_embed", "intents"} <= set(r.seconds)

    # the stage tables: the open visit gained its 3 clicks, the late click joined LATE's first visit
    assert sql(home, f"SELECT n_events FROM {SCHEMA}.sessions WHERE session_id = '{open_visit}'")[0][0] == n_open + 3
    assert sql(home, f"SELECT n_events FROM {SCHEMA}.sessions WHERE session_id = 'v{NEW}-9'")[0][0] == 4
    after = online_features(home, DATASET, ["session_embedding", "session_intent"], ids)
    new = dict(zip(after["session_id"], after[EMB]))
    new_intent = dict(zip(after["session_id"], after[INTENT]))
    assert old[f"v{NEW}-9"] is None and new[f"v{NEW}-9"] is not None and new_intent[f"v{NEW}-9"] is not None
    for s in (open_visit, f"v{LATE}-1"):  # sessions that gained clicks: new vectors
        assert not same_bits(old[s], new[s]), s
    later = [s for s in before_sessions[LATE] if s != f"v{LATE}-1"]  # after LATE's late click: embedded again
    unchanged = [s for u, ss in before_sessions.items() if u not in CHANGED for s in ss] + before_sessions[OPEN][:-1]
    for s in unchanged:  # never recomputed: the same bits and label
        assert same_bits(old[s], new[s]) and old_intent[s] == new_intent[s], s
    for s in later:  # recomputed from the same events with the same encoder
        assert np.allclose(old[s], new[s], atol=1e-5), s

    # the user rollups: the changed visitors' last sessions moved, everyone else's did not
    after_users = online_features(home, DATASET, ["session_embedding_rollup"], users)
    for u, a, b, n_a, n_b in zip(users, before_users[LAST], after_users[LAST], before_users[SO_FAR],
                                 after_users[SO_FAR]):
        if u in (OPEN, NEW):
            assert not same_bits(a, b), u
        elif u != LATE:
            assert same_bits(a, b) and n_a == n_b, u
    assert after_users[SO_FAR][users.index(NEW)] == before_users[SO_FAR][users.index(NEW)] + 1
    assert same_bits(after_users[LAST][users.index(NEW)], new[f"v{NEW}-9"])
    shares = online_features(home, DATASET, ["intent_shares"], [NEW, 1])
    recent = f"{SCHEMA}__intent_shares__recent_sessions"
    assert shares[recent].tolist() == [len(before_sessions[NEW]) + 1, len(before_sessions[1])]

    # point in time: at the old as-of NEW's rollup is its old last session; after the new as-of, the new one
    frame = pd.DataFrame({"user_id": [NEW, NEW, 1, 1],
                          "event_timestamp": [pd.Timestamp(r.since), pd.Timestamp(r.as_of) + timedelta(seconds=1)] * 2})
    hist = historical_features(home, DATASET, ["session_embedding_rollup"], frame)
    assert same_bits(hist[LAST][0], old[before_sessions[NEW][-1]])
    assert same_bits(hist[LAST][1], new[f"v{NEW}-9"])
    assert same_bits(hist[LAST][2], hist[LAST][3]) and same_bits(hist[LAST][3], old[before_sessions[1][-1]])

    again = refresh(home, DATASET)
    assert again.nothing_new and not again.published


def test_another_session_encoder_is_refused_without_full(home):
    from dataclasses import replace

    other = replace(TINY, seed=11)
    train_encoder(home, DATASET, other)
    embed_sessions(home, DATASET, other)  # the table now holds another encoder's vectors, not published
    with pytest.raises(RefreshError, match="two session encoders"):
        refresh(home, DATASET)
    r = refresh(home, DATASET, RefreshConfig(full=True))  # every session cut, embedded and labelled again
    assert r.published and "sessions" in r.refreshed and "intents" in r.refreshed
    assert "mean cosine" not in r.gate["sessions"]  # another encoder's space: no old-vs-new comparison
    n = sql(home, f"SELECT count(*) FROM {SCHEMA}.sessions")[0][0]
    assert sql(home, f"SELECT count(*) FROM {SCHEMA}.session_intents")[0][0] == n


def test_another_intent_classifier_is_refused_without_full(home):
    distill_intents(home, DATASET, DistillConfig(llm=LEXICAL, llm_latency_sessions=0, C=0.05, progress=False))
    with pytest.raises(RefreshError, match="two intent classifiers"):
        refresh(home, DATASET)


def test_a_nan_session_vector_is_stopped_by_the_gate_and_not_published(home, monkeypatch):
    import producers.sessions.embed as embed_mod

    ids = [s for ss in sessions_by_user(home).values() for s in ss]
    before = online_features(home, DATASET, ["session_embedding"], ids)
    real = embed_mod.infer

    def plant_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        out[0, 0] = np.nan
        return out

    monkeypatch.setattr(embed_mod, "infer", plant_nan)
    with pytest.raises(SnapshotGateError) as e:
        refresh(home, DATASET)
    assert "sessions: " in str(e.value) and "FAIL no NaN or infinite values" in str(e.value)
    after = online_features(home, DATASET, ["session_embedding"], ids)
    assert all(same_bits(a, b) for a, b in zip(before[EMB], after[EMB]))


def test_a_refresh_killed_after_computing_leaves_serving_unchanged_and_the_next_run_completes(home, monkeypatch):
    ids = [s for ss in sessions_by_user(home).values() for s in ss]
    before = online_features(home, DATASET, ["session_embedding"], ids)
    refresh_computed(home, monkeypatch)  # killed once computed
    after = online_features(home, DATASET, ["session_embedding"], ids)
    assert all(same_bits(a, b) for a, b in zip(before[EMB], after[EMB]))
    r = refresh(home, DATASET)
    assert r.published and r.users == CHANGED and "sessions" in r.refreshed
    done = online_features(home, DATASET, ["session_embedding", "session_intent"], ids + [f"v{NEW}-9"])
    assert done[EMB][len(ids)] is not None and done[INTENT][len(ids)] is not None


@pytest.mark.parametrize("cut", ["column", "gap"])
def test_cutting_only_the_changed_users_again_gives_the_tables_a_full_build_gives(tmp_path, cut):
    from producers.sessions import SessionsConfig
    from producers.sessions.build import changed_sessions

    yaml = CLICKS_YAML if cut == "column" else CLICKS_YAML.replace("sessions: {column: visit}",
                                                                   "sessions: {gap_minutes: 30}")
    definition = parse_definition(yaml, "clicks.yaml")
    h = Home.resolve(tmp_path / "home")
    ingest(h, definition, IngestConfig(source=write_clicks(tmp_path / "clicks", visitors=12, visits=3)))
    assert validate(h, DATASET, ValidateConfig(data_docs=False)).success
    build_sessions(h, DATASET)
    before = {s: n for s, n in sql(h, f"SELECT session_id, n_events FROM {SCHEMA}.sessions")}
    delta = tmp_path / "delta"
    delta.mkdir()
    (delta / "clicks.csv").write_text("visitor,visit,ts,page,price,query\n" + "\n".join(new_clicks(h)) + "\n")
    append(h, definition, IngestConfig(source=delta))
    assert validate(h, DATASET, ValidateConfig(data_docs=False)).success

    def tables() -> list:
        return [sql(h, f"SELECT * EXCLUDE (session_index) FROM {SCHEMA}.sessions ORDER BY session_id"),
                sql(h, f"SELECT * FROM {SCHEMA}.session_events ORDER BY session_id, position"),
                sql(h, f"SELECT session_id, session_index FROM {SCHEMA}.sessions ORDER BY session_id")]

    build_sessions(h, DATASET, SessionsConfig(users=tuple(CHANGED)))
    incremental = tables()
    firsts = {u: t for u, t in sql(h, f"SELECT user_id, min(min_event_time) FROM {SCHEMA}.ingest_delta_users "
                                      "GROUP BY 1")}
    todo = changed_sessions(h, DATASET, firsts)
    build_sessions(h, DATASET)
    assert incremental == tables()
    after = {s: n for s, n in sql(h, f"SELECT session_id, n_events FROM {SCHEMA}.sessions")}
    # every session that is new or gained events is among those to embed again, and no other user's
    moved = sorted(s for s, n in after.items() if before.get(s) != n)
    assert moved and set(moved) <= set(todo)
    owners = dict(sql(h, f"SELECT session_id, user_id FROM {SCHEMA}.sessions"))
    assert {owners[s] for s in todo} == set(CHANGED)


def test_the_session_gate_of_a_refresh_judges_the_changed_sessions_the_canaries_and_a_fixed_sample(home, monkeypatch):
    import producers.sessions.embed as embed_mod
    from producers.refresh import _gate_sample

    import duckdb

    con = duckdb.connect()
    ids = [f"s{i}" for i in range(50)]
    con.execute("CREATE TABLE a AS SELECT unnest($ids) AS session_id", {"ids": ids})
    con.execute("CREATE TABLE b AS SELECT * FROM a ORDER BY session_id DESC")
    sample = _gate_sample(con, "a", ["s7"], ["s9"], 5)
    assert sample[:2] == ["s7", "s9"] and len(sample) == 7 and len(set(sample)) == 7
    assert _gate_sample(con, "b", ["s7"], ["s9"], 5) == sample  # by hash, not by row order
    con.close()

    lines: list[str] = []
    real = embed_mod.infer

    def plant_nan(*args, **kwargs):  # a changed session's vector broken: the sample must still hold it
        out = real(*args, **kwargs)
        out[0, 0] = np.nan
        return out

    monkeypatch.setattr(embed_mod, "infer", plant_nan)
    with pytest.raises(SnapshotGateError) as e:
        refresh(home, DATASET, RefreshConfig(gate_sample_sessions=2), log=lines.append)
    assert "FAIL no NaN or infinite values" in str(e.value)
    judged = [x for x in lines if "sessions judged" in x]
    assert len(judged) == 1 and "a hash sample of the rest" in judged[0]
    monkeypatch.setattr(embed_mod, "infer", real)
    r = refresh(home, DATASET, RefreshConfig(gate_sample_sessions=2), log=lines.append)
    assert r.published and r.gate_passed and "mean cosine" in r.gate["sessions"]


SESSION_VIEWS = ("session_embedding", "sessions", "session_intent", "intents")


def view_rows(home: Home, kind: str) -> list[tuple]:
    """Every row of a published session view file, produced_at excluded, in one order."""
    con = duckdb.connect()
    try:
        return con.execute(f"SELECT * EXCLUDE (produced_at) FROM read_parquet('{view_file(home, kind)}') "
                           "ORDER BY ALL").fetchall()
    finally:
        con.close()


def view_file(home: Home, kind: str):
    return home.data_dir / "feast" / SCHEMA / "sessions" / f"{kind}.parquet"


def test_a_refresh_writes_the_session_views_a_full_publish_of_the_same_state_writes(home, tmp_path):
    lines: list[str] = []
    r = refresh(home, DATASET, log=lines.append)
    assert r.published and r.users == CHANGED
    # the session views kept the other users' rows, for embeddings and intents (no whole-file fallback)
    assert len([x for x in lines if f"{len(CHANGED)} users' rows written again" in x]) == 4, lines
    assert not [x for x in lines if "cannot be kept" in x]
    full = Home.resolve(shutil.copytree(home.root, tmp_path / "full"))
    publish(full, DATASET, PublishConfig(materialize=True))
    for kind in SESSION_VIEWS:
        assert view_rows(home, kind) == view_rows(full, kind), kind
        con = duckdb.connect()
        a, b = (con.execute(f"DESCRIBE SELECT * FROM read_parquet('{view_file(h, kind)}')").fetchall()
                for h in (home, full))
        con.close()
        assert a == b, kind

    users = sorted(sessions_by_user(home))
    views = ["session_embedding_rollup", "intent_shares"]
    served, wanted = (online_features(h, DATASET, views, users) for h in (home, full))
    for column in served.columns:
        assert all(same_bits(x, y) if isinstance(x, (list, np.ndarray)) else x == y
                   for x, y in zip(served[column], wanted[column])), column
    frame = pd.DataFrame({"user_id": [NEW, NEW, LATE, 1],
                          "event_timestamp": [pd.Timestamp(r.since), pd.Timestamp(r.as_of) + timedelta(seconds=1),
                                              pd.Timestamp(r.as_of) + timedelta(seconds=1),
                                              pd.Timestamp(r.as_of) + timedelta(seconds=1)]})
    at, want = (historical_features(h, DATASET, views, frame) for h in (home, full))
    for column in at.columns:
        assert all(same_bits(x, y) if isinstance(x, (list, np.ndarray)) else x == y
                   for x, y in zip(at[column], want[column])), column


def test_a_refresh_computes_the_user_rollups_of_the_refreshed_users_only(home):
    """A planted previous rollup row of an unchanged user survives the refresh as it was: it was not
    recomputed (a full publish writes it from the sessions again)."""
    from producers.publish.snapshots import _arrow

    con = duckdb.connect()
    planted = {}
    for kind, column in (("sessions", "sessions_so_far"), ("intents", "recent_sessions")):
        path = view_file(home, kind)
        table = _arrow(con.sql(f"SELECT * REPLACE (CASE WHEN user_id = 1 THEN {column} + 1000 ELSE {column} END "
                               f"AS {column}) FROM read_parquet('{path}')"))
        pq.write_table(table.replace_schema_metadata(pq.read_schema(path).metadata), path)
        planted[kind] = con.execute(f"SELECT * FROM read_parquet('{path}') WHERE user_id = 1 ORDER BY ALL").fetchall()
        assert min(r[-1] for r in planted[kind]) > 1000
    r = refresh(home, DATASET)
    assert r.published and 1 not in r.users
    for kind, rows in planted.items():
        path = view_file(home, kind)
        assert con.execute(f"SELECT * FROM read_parquet('{path}') WHERE user_id = 1 ORDER BY ALL").fetchall() == rows
    # the refreshed users' rows are written again: NEW's count is that of its sessions, the new one included
    (n_new,) = con.execute(f"SELECT max(sessions_so_far) FROM read_parquet('{view_file(home, 'sessions')}') "
                           f"WHERE user_id = {NEW}").fetchall()[0]
    assert n_new == len(sessions_by_user(home)[NEW])
    con.close()


def test_a_session_of_a_refreshed_user_that_vanished_is_noted_as_removed(served, tmp_path):
    """A late event can bridge two sessions of a user: the later one's id vanishes. Publishing that user's
    sessions notes it as removed (its online row is cleared) and keeps everyone else's."""
    from producers.publish.snapshots import removed_keys_path
    from producers.stores.outputs import SESSION_EMBEDDINGS

    _, built = served
    h = Home.resolve(shutil.copytree(built.root, tmp_path / "home"))
    (source,) = SESSION_EMBEDDINGS.files(h, SCHEMA)
    before = {kind: view_rows(h, kind) for kind in ("session_embedding", "sessions")}
    gone = sessions_by_user(h)[LATE][-1]
    table = pq.read_table(source)
    keep = pa.compute.not_equal(table.column("session_id"), pa.scalar(gone, table.column("session_id").type))
    pq.write_table(table.filter(keep), source)
    kept = sessions_by_user(h)[LATE][0]
    assert online_features(h, DATASET, ["session_embedding"], [gone, kept])[EMB].notna().all()
    publish(h, DATASET, PublishConfig(), inputs={"sessions": [source]}, users=[LATE])
    # noted as removed, then cleared from the online store (and the note with it)
    assert online_features(h, DATASET, ["session_embedding"], [gone, kept])[EMB].notna().tolist() == [False, True]
    assert not removed_keys_path(view_file(h, "session_embedding")).exists()
    after = view_rows(h, "session_embedding")
    assert [x for x in before["session_embedding"] if x[0] != gone] == after
    # LATE's rollup rows: one fewer; everyone else's as they were
    rollup = view_rows(h, "sessions")
    assert [x for x in rollup if x[0] != LATE] == [x for x in before["sessions"] if x[0] != LATE]
    assert len([x for x in rollup if x[0] == LATE]) == len([x for x in before["sessions"] if x[0] == LATE]) - 1


def test_a_publish_of_some_users_with_another_rollup_window_writes_every_users_rollups(served, tmp_path):
    """Kept rows must be what a full publish writes: with another `recent_sessions` than the published
    rollups' they are not, so every user's are written again (from the whole file)."""
    from producers.stores.outputs import SESSION_EMBEDDINGS

    _, built = served
    some, every = (Home.resolve(shutil.copytree(built.root, tmp_path / name)) for name in ("some", "every"))
    lines: list[str] = []
    publish(some, DATASET, PublishConfig(recent_sessions=2), log=lines.append,
            inputs={"sessions": SESSION_EMBEDDINGS.files(some, SCHEMA)}, users=[LATE])
    assert [x for x in lines if "cannot be kept" in x]
    publish(every, DATASET, PublishConfig(recent_sessions=2))
    assert view_rows(some, "sessions") == view_rows(every, "sessions")


def test_a_refresh_keeps_the_served_rollup_window(home, tmp_path):
    """Served with `--recent-sessions 2`, a refresh's rollups are over 2 sessions too, equal to a full publish
    with 2 (a refresh publishing with the default window would meet published rollups it cannot keep)."""
    publish(home, DATASET, PublishConfig(materialize=True, recent_sessions=2))
    lines: list[str] = []
    r = refresh(home, DATASET, log=lines.append)
    assert r.published and r.users
    assert not [x for x in lines if "cannot be kept" in x]
    full = Home.resolve(shutil.copytree(home.root, tmp_path / "full"))
    publish(full, DATASET, PublishConfig(materialize=True, recent_sessions=2))
    for kind in SESSION_VIEWS:
        assert view_rows(home, kind) == view_rows(full, kind), kind


def test_publish_refuses_a_refresh_file_it_cannot_merge(home, tmp_path):
    """A refresh's session file holds its users' sessions only: publishing it where the published views cannot
    take them (another rollup window) is refused, never written as if it held every session."""
    from producers.publish import PublishError

    r = refresh(home, DATASET)
    own = r.snapshot_dir / "session_embeddings.parquet"
    assert pq.read_table(own).num_rows < pq.read_table(home.data_dir / SCHEMA / "session_embeddings.parquet").num_rows
    before = view_rows(home, "sessions")
    with pytest.raises(PublishError, match="refreshed users only"):
        publish(home, DATASET, PublishConfig(recent_sessions=3), inputs={"sessions": [own]}, users=r.users)
    assert view_rows(home, "sessions") == before


def stage_files(home: Home) -> dict:
    """The stage Parquet copies of the session outputs: (bytes, mtime) by name."""
    folder = home.data_dir / SCHEMA
    return {name: ((folder / name).read_bytes(), (folder / name).stat().st_mtime_ns)
            for name in ("session_embeddings.parquet", "session_intents.parquet")}


def refresh_computed(home: Home, monkeypatch) -> None:
    """A refresh stopped once computed: the tables and files as the refresh leaves them, nothing published."""
    import producers.refresh as refresh_mod

    class Stop(BaseException):
        pass

    def stop(at):
        if at == "computed":
            raise Stop(at)

    monkeypatch.setattr(refresh_mod, "_reached", stop)
    with pytest.raises(Stop):
        refresh(home, DATASET)
    monkeypatch.undo()


def test_a_refresh_changes_the_session_tables_in_place_and_a_full_publish_then_serves_them(home, monkeypatch):
    import pyarrow.parquet as pq

    from producers.stores.outputs import read_provenance

    files = stage_files(home)
    ids = [s for ss in sessions_by_user(home).values() for s in ss] + [f"v{NEW}-9"]
    # a planted row of an unchanged visitor, of no session: a table rebuilt from its kept rows would lose it,
    # a refresh that looks at the refreshed visitors' rows only leaves it
    con = home.connect()
    try:
        for t in ("session_embeddings", "session_intents"):
            con.execute(f"INSERT INTO {SCHEMA}.{t} SELECT * REPLACE ('planted' AS session_id) FROM {SCHEMA}.{t} "
                        "WHERE user_id = 7 ORDER BY session_id LIMIT 1")
    finally:
        con.close()

    refresh_computed(home, monkeypatch)
    assert stage_files(home) == files  # neither stage copy rewritten
    for t in ("session_embeddings", "session_intents"):
        assert sql(home, f"SELECT user_id FROM {SCHEMA}.{t} WHERE session_id = 'planted'") == [(7,)], t
    # the refresh's own files: every session of exactly the changed visitors, as the tables now hold them
    (snap,) = (home.data_dir / SCHEMA / "refresh").iterdir()
    mine = sorted(s for u, ss in sessions_by_user(home).items() if u in CHANGED for s in ss)
    for name, table, column in (("session_embeddings.parquet", "session_embeddings", "embedding"),
                                ("session_intents.parquet", "session_intents", "label")):
        got = pq.read_table(snap / name).to_pydict()
        assert got["session_id"] == mine and sorted(set(got["user_id"])) == CHANGED, name
        stored = dict(sql(home, f"SELECT session_id, {column} FROM {SCHEMA}.{table} WHERE user_id IN (2, 5, 9)"))
        assert got[column] == [stored[s] for s in mine], name
        prov = read_provenance(snap / name)
        assert prov["snapshot_of"]["n_users"] == len(CHANGED) and prov["snapshot_of"]["n_sessions"] == len(mine)
        assert prov.get("checkpoint") or prov.get("classifier_sha256")

    # a full publish brings the stage copies up to date from the tables first, and serves the refreshed rows
    publish(home, DATASET, PublishConfig(materialize=True))
    assert stage_files(home) != files
    served = online_features(home, DATASET, ["session_embedding", "session_intent"], ids)
    table = dict(sql(home, f"SELECT session_id, embedding FROM {SCHEMA}.session_embeddings"))
    labels = dict(sql(home, f"SELECT session_id, label FROM {SCHEMA}.session_intents"))
    assert served[EMB][len(ids) - 1] is not None  # the new session
    for s, vector, label in zip(ids, served[EMB], served[INTENT]):
        assert np.allclose(vector, table[s]) and label == labels[s], s
    for name, n in (("session_embeddings.parquet", len(table)), ("session_intents.parquet", len(labels))):
        copy = home.data_dir / SCHEMA / name
        assert pq.read_metadata(copy).num_rows == n and read_provenance(copy).get("table_version"), name
    again = stage_files(home)
    publish(home, DATASET, PublishConfig())
    assert stage_files(home) == again  # up to date: not written again


@pytest.mark.parametrize("table", ["session_embeddings", "session_intents"])
def test_a_kill_inside_the_in_place_write_leaves_the_session_table_as_it_was(home, monkeypatch, table):
    import producers.stores.outputs as mod

    files = stage_files(home)
    before = sql(home, f"SELECT * FROM {SCHEMA}.{table} ORDER BY session_id")
    meta = sql(home, f"SELECT * FROM {SCHEMA}.session_intents_meta")
    real = mod.change_in_place

    class Killed(BaseException):
        pass

    def dying(con, h, output, schema, change, provenance):
        def change_then_die(c):
            change(c)  # the rows deleted and inserted, then killed before the commit
            raise Killed()
        return real(con, h, output, schema, change_then_die if output.table == table else change, provenance)

    monkeypatch.setattr(mod, "change_in_place", dying)
    with pytest.raises(Killed):
        refresh(home, DATASET)
    assert sql(home, f"SELECT * FROM {SCHEMA}.{table} ORDER BY session_id") == before
    assert sql(home, f"SELECT * FROM {SCHEMA}.session_intents_meta") == meta
    assert stage_files(home) == files
    snap = home.data_dir / SCHEMA / "refresh"
    assert not [p for p in snap.rglob(f"*{table}*")]  # no snapshot file (nor its temp file) of the killed write
    monkeypatch.undo()
    r = refresh(home, DATASET)
    assert r.published and {"sessions", "intents"} <= set(r.refreshed)


def test_a_full_session_embed_after_a_refresh_is_not_overwritten_by_the_refreshed_table(home, monkeypatch):
    from producers.stores.outputs import SESSION_EMBEDDINGS, export_if_behind, read_provenance

    refresh_computed(home, monkeypatch)
    train_encoder(home, DATASET, TINY)  # (the sessions changed: another run of the same config)
    embed_sessions(home, DATASET, TINY)  # every session again: the copy is the table's
    copy = SESSION_EMBEDDINGS.parquet_path(home, SCHEMA)
    written = copy.read_bytes()
    assert not export_if_behind(home, SESSION_EMBEDDINGS, SCHEMA)
    assert copy.read_bytes() == written and "table_version" not in read_provenance(copy)


def test_without_a_served_session_history_the_gate_reads_the_others_from_the_table(home, monkeypatch):
    import producers.refresh as refresh_mod

    lines: list[str] = []
    monkeypatch.setattr(refresh_mod, "_served_sessions", lambda *_: None)
    r = refresh(home, DATASET, RefreshConfig(gate_sample_sessions=10), log=lines.append)
    assert r.published and r.gate_passed and "mean cosine" not in r.gate["sessions"]  # nothing to compare with
    import re

    (judged,) = [x for x in lines if "sessions judged" in x]
    found = re.search(r"(\d+) sessions judged \((\d+) changed, (\d+) canaries", judged)
    n, changed, canaries = map(int, found.groups())
    assert changed and n == changed + canaries + 10  # the hash sample drawn from the stored sessions


def test_a_refresh_opens_the_warehouse_once(home, monkeypatch):
    """Every stage of a refresh uses a cursor of one held connection (`Home.hold`): the file is opened once
    (each stage opening its own cost ~10-20 ms and a checkpoint apiece), and closed when it ends."""
    opened = record_connects(monkeypatch)
    r = refresh(home, DATASET)
    monkeypatch.undo()
    assert r.published and {"sessions", "intents", "agg"} <= set(r.refreshed)
    assert opened.count(str(home.warehouse_path)) == 1, opened
    con = duckdb.connect(str(home.warehouse_path), read_only=True)  # closed: openable with another configuration
    con.close()


def _online_is_the_latest_history_row(home: Home, view: dict) -> None:
    """Every key of the view's history is served its latest row (by feature_timestamp, then produced_at), as a
    materialization of the whole history serves it."""
    key = "session_id" if view.get("entity") == "session" else "user_id"
    history = pq.read_table(home.data_dir / "feast" / view["source"]).to_pandas()
    latest = history.sort_values(["feature_timestamp", "produced_at"]).groupby(key).tail(1).sort_values(key)
    short = view["name"].removeprefix(f"{SCHEMA}__")
    served = online_features(home, DATASET, [short], latest[key].tolist())
    for f in view["features"]:
        for k, want, got in zip(latest[key], latest[f["name"]], served[f"{view['name']}__{f['name']}"]):
            if f["dtype"].startswith("Array"):
                assert same_bits(want, got), (view["name"], f["name"], k)
            else:
                assert want == got or (pd.isna(want) and pd.isna(got)), (view["name"], f["name"], k, want, got)


def test_a_refresh_writes_the_changed_session_rows_online_without_materializing(home, monkeypatch):
    """With the session views served up to date, a refresh writes the changed sessions' and users' rows straight
    into the online store (materialize-incremental would read every view's whole history); every key of every
    view is then served its latest history row, and a later materialize-incremental changes nothing."""
    import json


    from producers.publish import materialize

    publish(home, DATASET, PublishConfig(materialize=True))  # the copied home's registry names the served files
    calls = record_materializations(monkeypatch)
    r = refresh(home, DATASET)
    assert r.published and r.users and calls == []
    views = json.loads((home.data_dir / "feast" / "manifest.json").read_text())["datasets"][DATASET]["views"]
    assert {v["name"] for v in views} >= {f"{SCHEMA}__{v}" for v in ("session_embedding", "session_intent",
                                                                     "session_embedding_rollup", "intent_shares")}
    for view in views:
        _online_is_the_latest_history_row(home, view)
    materialize(home)
    assert calls
    for view in views:
        _online_is_the_latest_history_row(home, view)


def test_the_cli_summary_of_a_home_without_an_llm4es_set_names_no_model_and_counts_sessions(home):
    """Sessions and aggregates served, no LLM4ES set: the summary said `model None at None`, and the session gate's
    line counted its sessions as users."""
    from click.testing import CliRunner

    from producers.cli import cli

    r = CliRunner().invoke(cli, ["--home", str(home.root), "refresh", DATASET])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # the console wraps long lines
    assert "refreshed 3 users" in text and "None" not in text
    nouns = re.findall(r"gate \(sessions\): feature snapshot of [\d,]+ (\w+)", text)
    assert nouns and set(nouns) == {"sessions"}, nouns
