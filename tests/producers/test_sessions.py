"""Sessions: cuts checked by hand against Python, explicit session ids, checks that refuse bad sessions."""
from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime, timezone

import pytest

from producers.datasets.definition import load_builtin, parse_definition
from producers.ingest import IngestConfig, ingest
from producers.sessions import SessionsConfig, SessionsError, build_sessions
from producers.stores.warehouse import Home
from tests.fixtures.clicks_files import CLICKS_YAML, write_clicks
from tests.fixtures.movielens_files import read_ratings
from validation.gate import ValidationGateError

SCHEMA = "movielens_100k"
WEEK = 7 * 24 * 60


def utc(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc).replace(tzinfo=None)


@pytest.fixture(scope="module")
def ml(validated_grouplens):
    home, source = validated_grouplens
    return home, read_ratings(source)


def rows(home: Home, sql: str) -> list[tuple]:
    con = home.connect(read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def python_sessions(ratings, gap_minutes: float) -> dict[int, list[list[tuple]]]:
    """Per user, the sessions as lists of (movie, unix time), cut where the gap exceeds the threshold."""
    by_user = defaultdict(list)
    for u, m, _, t, _ in ratings:
        by_user[u].append((t, m))
    out = {}
    for u, events in by_user.items():
        events.sort()  # time, then the key (movie_id)
        sessions = [[events[0]]]
        for prev, cur in zip(events, events[1:]):
            if cur[0] - prev[0] > gap_minutes * 60:
                sessions.append([])
            sessions[-1].append(cur)
        out[u] = sessions
    return out


def test_a_gap_cuts_each_users_events_as_python_does(ml):
    home, ratings = ml
    result = build_sessions(home, "movielens-100k", SessionsConfig(gap_minutes=WEEK))
    want = python_sessions(ratings, WEEK)
    assert (result.mode, result.spec) == ("gap", {"column": None, "gap_minutes": WEEK})
    assert result.n_sessions == sum(len(s) for s in want.values()) and result.n_events == len(ratings)
    user = ratings[0][0]
    got = rows(home, f"SELECT session_id, position, movie_id, event_time, gap_s, rating, title, genres "
                     f"FROM {SCHEMA}.session_events WHERE user_id = {user} ORDER BY event_time, movie_id")
    expected = []
    for k, session in enumerate(want[user], 1):
        for pos, (t, m) in enumerate(session, 1):
            gap = 0.0 if pos == 1 else float(t - session[pos - 2][0])
            expected.append((f"{user}#{k}", pos, m, utc(t), gap))
    assert [r[:5] for r in got] == expected and len(want[user]) > 1
    assert all(r[5] is not None and r[6] and r[7] for r in got)  # every events field is carried
    sessions = rows(home, f"SELECT session_id, session_index, start_time, end_time, n_events, duration_s "
                          f"FROM {SCHEMA}.sessions WHERE user_id = {user} ORDER BY session_index")
    assert [(s[0], s[1], s[4]) for s in sessions] == [(f"{user}#{k}", k, len(x)) for k, x in enumerate(want[user], 1)]
    assert all(s[5] == (s[3] - s[2]).total_seconds() for s in sessions)
    types = dict((r[0], r[1]) for r in rows(home, f"DESCRIBE {SCHEMA}.sessions"))
    assert types == {"session_id": "VARCHAR", "user_id": "BIGINT", "session_index": "INTEGER",
                     "start_time": "TIMESTAMP", "end_time": "TIMESTAMP", "n_events": "INTEGER", "duration_s": "DOUBLE"}
    (meta,) = rows(home, f"SELECT spec, n_sessions, n_events, validation, code_version FROM {SCHEMA}.sessions_meta")
    assert json.loads(meta[0]) == {"column": None, "gap_minutes": WEEK}
    assert meta[1:3] == (result.n_sessions, len(ratings))
    report = json.loads(open(meta[3]).read())
    assert report["success"] and len(report["results"]) == 6
    assert set(result.events_per_session) == {"median", "p90", "max"}


def test_rebuilding_with_another_gap_replaces_the_tables(ml):
    home, ratings = ml
    week = build_sessions(home, "movielens-100k", SessionsConfig(gap_minutes=WEEK))
    hour = build_sessions(home, "movielens-100k", SessionsConfig(gap_minutes=60))
    assert hour.n_sessions == sum(len(s) for s in python_sessions(ratings, 60).values()) > week.n_sessions
    assert rows(home, f"SELECT count(*), sum(n_events) FROM {SCHEMA}.sessions") == [(hour.n_sessions, len(ratings))]
    assert rows(home, f"SELECT count(*) FROM {SCHEMA}.session_events") == [(len(ratings),)]
    assert json.loads(rows(home, f"SELECT spec FROM {SCHEMA}.sessions_meta")[0][0])["gap_minutes"] == 60
    assert rows(home, "SELECT count(*) FROM information_schema.tables WHERE table_name LIKE '%staging'") == [(0,)]
    # without an override, the definition's gap (a day for MovieLens)
    day = build_sessions(home, "movielens-100k")
    assert day.spec["gap_minutes"] == 1440
    assert day.n_sessions == sum(len(s) for s in python_sessions(ratings, 1440).values())


def test_the_validation_gate(home, grouplens):
    ingest(home, load_builtin("movielens-100k"), IngestConfig(source=grouplens))
    with pytest.raises(ValidationGateError, match="has not been validated"):
        build_sessions(home, "movielens-100k")
    assert build_sessions(home, "movielens-100k", SessionsConfig(force=True)).n_sessions > 0


def test_an_explicit_session_column(tmp_path):
    folder = write_clicks(tmp_path / "clicks")
    home = Home.resolve(tmp_path / "home")
    ingest(home, parse_definition(CLICKS_YAML, "clicks.yaml"), IngestConfig(source=folder))
    result = build_sessions(home, "clicks", SessionsConfig(gap_minutes=5, force=True))  # the gap is not used
    csv_rows = [line.split(",") for line in (folder / "clicks.csv").read_text().splitlines()[1:]]
    visits = defaultdict(list)
    for visitor, visit, ts, *_ in csv_rows:
        visits[visit].append((ts, int(visitor)))
    assert (result.mode, result.spec) == ("column", {"column": "visit", "gap_minutes": None})
    assert result.n_sessions == len(visits) and result.n_events == len(csv_rows)
    got = rows(home, "SELECT session_id, user_id, session_index, n_events, start_time FROM clicks.sessions")
    assert {r[0]: (r[1], r[3]) for r in got} == {v: (e[0][1], len(e)) for v, e in visits.items()}
    for r in got:  # visits are numbered in time order per visitor in the fixture
        assert r[2] == int(r[0].split("-")[1]) and str(r[4]) == min(e[0] for e in visits[r[0]])
    positions = rows(home, "SELECT session_id, list(position ORDER BY event_time), list(gap_s ORDER BY position) "
                           "FROM clicks.session_events GROUP BY 1")
    assert all(p == list(range(1, len(p) + 1)) and g[0] == 0 and all(x > 0 for x in g[1:]) for _, p, g in positions)


def test_a_session_spanning_two_users_is_refused_and_nothing_is_replaced(tmp_path):
    folder = write_clicks(tmp_path / "clicks")
    home = Home.resolve(tmp_path / "home")
    definition = parse_definition(CLICKS_YAML, "clicks.yaml")
    ingest(home, definition, IngestConfig(source=folder))
    build_sessions(home, "clicks", SessionsConfig(force=True))
    before = rows(home, "SELECT * FROM clicks.sessions ORDER BY session_id")
    meta = rows(home, "SELECT * FROM clicks.sessions_meta")
    # visitor 2's first visit is logged under visitor 1's id v1-2: one visit id, two visitors
    lines = (folder / "clicks.csv").read_text().splitlines()
    lines = [line.replace(",v2-1,", ",v1-2,") for line in lines]
    (folder / "clicks.csv").write_text("\n".join(lines) + "\n")
    ingest(home, definition, IngestConfig(source=folder))
    with pytest.raises(SessionsError) as caught:
        build_sessions(home, "clicks", SessionsConfig(force=True))
    message = str(caught.value)
    assert "a session never spans two users" in message and "'v1-2'" in message and "nothing was replaced" in message
    assert rows(home, "SELECT * FROM clicks.sessions ORDER BY session_id") == before
    assert rows(home, "SELECT * FROM clicks.sessions_meta") == meta
    assert rows(home, "SELECT count(*) FROM information_schema.tables WHERE table_name LIKE '%staging'") == [(0,)]


def test_an_empty_session_id_is_refused(tmp_path):
    folder = write_clicks(tmp_path / "clicks", visitors=3)
    lines = (folder / "clicks.csv").read_text().splitlines()
    lines[1] = lines[1].replace(",v1-1,", ",,")
    (folder / "clicks.csv").write_text("\n".join(lines) + "\n")
    home = Home.resolve(tmp_path / "home")
    ingest(home, parse_definition(CLICKS_YAML, "clicks.yaml"), IngestConfig(source=folder))
    with pytest.raises(SessionsError, match="every session has an id"):
        build_sessions(home, "clicks", SessionsConfig(force=True))
    assert rows(home, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'clicks' "
                      "AND table_name LIKE 'session%'") == [(0,)]


def test_a_bad_gap_is_refused(tmp_path):
    with pytest.raises(SessionsError, match="gap_minutes must be positive"):
        build_sessions(Home.resolve(tmp_path / "nowhere"), "movielens-100k", SessionsConfig(gap_minutes=0))


def test_a_refresh_cuts_its_users_sessions_in_temp_tables_and_still_names_a_bad_session(tmp_path, monkeypatch):
    """`SessionsConfig(users=...)` stages the users' new sessions in TEMP tables (never in the warehouse file:
    cheaper, and nothing is left there by a killed run); the checks still run on them and name the bad row."""
    import validation.run

    folder = write_clicks(tmp_path / "clicks")
    home = Home.resolve(tmp_path / "home")
    definition = parse_definition(CLICKS_YAML, "clicks.yaml")
    ingest(home, definition, IngestConfig(source=folder))
    build_sessions(home, "clicks", SessionsConfig(force=True))
    stored = []
    real = validation.run.check_sessions

    def spy(con, d, sessions, session_events, *args, **kwargs):
        stored.extend(con.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'clicks' "
                                  "AND table_type <> 'LOCAL TEMPORARY' ORDER BY 1").fetchall())
        return real(con, d, sessions, session_events, *args, **kwargs)

    monkeypatch.setattr(validation.run, "check_sessions", spy)
    build_sessions(home, "clicks", SessionsConfig(users=(1, 2), force=True))
    assert stored and not [t for (t,) in stored if "staging" in t or "rebuild" in t]
    before = rows(home, "SELECT * FROM clicks.sessions ORDER BY session_id")
    # visitor 2's first visit logged under visitor 1's id v1-2: both refreshed, one visit id for two visitors
    lines = [line.replace(",v2-1,", ",v1-2,") for line in (folder / "clicks.csv").read_text().splitlines()]
    (folder / "clicks.csv").write_text("\n".join(lines) + "\n")
    ingest(home, definition, IngestConfig(source=folder))
    with pytest.raises(SessionsError) as caught:
        build_sessions(home, "clicks", SessionsConfig(users=(1, 2), force=True))
    message = str(caught.value)
    assert "a session never spans two users" in message and "'v1-2'" in message and "nothing was replaced" in message
    assert rows(home, "SELECT * FROM clicks.sessions ORDER BY session_id") == before
