"""`ingest --append`: new events only, deduplicated by the event key, atomic, logged as a delta."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from producers.datasets.definition import load_builtin, parse_definition
from producers.ingest import IngestConfig, IngestError, ingest
from producers.ingest.append import append
from producers.ingest.delta import changed_users
from tests.fixtures.movielens_files import T0, read_ratings
from tests.producers.test_ingest import snapshot

ML = load_builtin("movielens-100k")
AFTER = T0 + 300 * 86400  # after every rating write_grouplens draws (T0 + up to 200 days)


def new_ratings(grouplens: Path, users: list[int], per_user: int = 3, t0: int = AFTER) -> list[str]:
    """Ratings of movies the user has not rated yet, all after the stored ones."""
    rated: dict[int, set[int]] = {}
    for u, m, *_ in read_ratings(grouplens):
        rated.setdefault(u, set()).add(m)
    rows = []
    for u in users:
        for k, m in enumerate(sorted(set(range(1, 41)) - rated[u])[:per_user]):
            rows.append(f"{u}\t{m}\t{1 + k % 5}\t{t0 + 3600 * (u * 10 + k)}")
    return rows


def write_delta(folder: Path, rows: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(r + "\n" for r in rows))
    return folder


def count(home, sql: str):
    con = home.connect(read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_append_adds_new_events_for_a_few_users_and_logs_the_delta(home, grouplens, tmp_path):
    from validation.gate import ValidationGateError, require_valid
    from validation.run import ValidateConfig, validate

    base = ingest(home, ML, IngestConfig(grouplens))
    assert validate(home, ML.name, ValidateConfig(data_docs=False)).success
    rows = new_ratings(grouplens, [2, 5, 7])
    r = append(home, ML, IngestConfig(write_delta(tmp_path / "d1", rows)))
    assert r.changed and r.rows_added == 9 and r.duplicates_skipped == 0 and r.rejects == 0
    assert (r.users_touched, r.users_new) == (3, 0)
    assert r.n_events == base.n_events + 9 and r.fallback_files.keys() == {"movies", "people"}
    assert r.min_event_time < r.max_event_time
    per_user = dict(count(home, f"SELECT user_id, count(*) FROM movielens_100k.events "
                                f"WHERE event_time >= to_timestamp({AFTER})::TIMESTAMP GROUP BY 1"))
    assert per_user == {2: 3, 5: 3, 7: 3}
    # The lookup came from the first ingest's u.item: new events have their titles.
    assert count(home, "SELECT count(*) FROM movielens_100k.events WHERE title IS NULL") == [(0,)]
    (delta,) = count(home, "SELECT ingest_id, rows_added, duplicates_skipped, users_touched, dedupe_key "
                           "FROM movielens_100k.ingest_delta")
    assert delta == (r.ingest_id, 9, 0, 3, '["user_id", "movie_id"]')
    log = count(home, "SELECT ingest_id, source_hash, events FROM movielens_100k.ingest_log ORDER BY finished_at")
    assert [x[0] for x in log] == [base.ingest_id, r.ingest_id] and log[1][2] == r.n_events
    assert log[1][1] != base.source_hash  # a new data version for every later stage
    assert changed_users(home, ML.schema, since=_ts(AFTER - 1)) == [2, 5, 7]

    # Later stages refuse the appended data until the data gate has run on the whole table again ...
    con = home.connect(read_only=True)
    try:
        with pytest.raises(ValidationGateError, match="re-ingested after its last validation"):
            require_valid(con, ML.name)
    finally:
        con.close()
    # ... and it passes.
    report = validate(home, ML.name, ValidateConfig(data_docs=False))
    assert report.success, [(c.check, c.failed, c.examples) for c in report.failed]
    con = home.connect(read_only=True)
    try:
        require_valid(con, ML.name)
    finally:
        con.close()


def test_reappending_the_same_file_adds_nothing(home, grouplens, tmp_path):
    ingest(home, ML, IngestConfig(grouplens))
    delta = write_delta(tmp_path / "d1", new_ratings(grouplens, [1, 3]))
    first = append(home, ML, IngestConfig(delta))
    before = snapshot(home)
    again = append(home, ML, IngestConfig(delta))
    assert not again.changed and again.rows_added == 0 and again.duplicates_skipped == first.rows_added
    assert snapshot(home) == before
    # A file repeating stored events plus one new row (and a row twice) adds only that one.
    extra = new_ratings(grouplens, [4], per_user=1)
    mixed = write_delta(tmp_path / "d2", new_ratings(grouplens, [1, 3]) + extra + extra)
    r = append(home, ML, IngestConfig(mixed))
    assert (r.rows_added, r.duplicates_skipped, r.users_touched) == (1, first.rows_added + 1, 1)
    dupes = count(home, "SELECT count(*) FROM (SELECT user_id, movie_id FROM movielens_100k.events "
                        "GROUP BY ALL HAVING count(*) > 1)")
    assert dupes == [(0,)]
    # Re-sending a stored event with another rating is a duplicate too: stored events are never rewritten.
    u, m, rating, ts, _ = read_ratings(grouplens)[0]
    r = append(home, ML, IngestConfig(write_delta(tmp_path / "d3", [f"{u}\t{m}\t{rating % 5 + 1}\t{ts}"])))
    assert not r.changed and r.duplicates_skipped == 1


def test_malformed_rows_go_to_rejects_and_too_many_leave_the_table_unchanged(home, grouplens, tmp_path):
    ingest(home, ML, IngestConfig(grouplens))
    rows = new_ratings(grouplens, [1, 2, 3, 4, 5, 6], per_user=5)
    rows[3] = rows[3].replace("\t", "\tnot-a-number", 1)
    before = snapshot(home)
    with pytest.raises(IngestError, match=r"u.data: 1 of 30 rows rejected .*threshold 1.00%.*\n\s+row 4"):
        append(home, ML, IngestConfig(write_delta(tmp_path / "bad", rows)))
    assert snapshot(home) == before
    r = append(home, ML, IngestConfig(write_delta(tmp_path / "bad", rows), max_reject_share=0.05))
    assert (r.rows_added, r.rejects) == (29, 1)
    (reject,) = count(home, "SELECT source, row_number, reason FROM movielens_100k.rejects")
    assert reject[:2] == ("u.data", 4) and "movie_id" in reject[2]
    # Sent again, the file adds neither events nor a second copy of its reject.
    again = append(home, ML, IngestConfig(write_delta(tmp_path / "bad", rows), max_reject_share=0.05))
    assert not again.changed and (again.duplicates_skipped, again.rejects) == (29, 1)
    assert count(home, "SELECT count(*) FROM movielens_100k.rejects") == [(1,)]


def test_an_appended_file_with_an_empty_user_names_its_line_to_validation(home, grouplens, tmp_path):
    from validation.run import ValidateConfig, validate

    ingest(home, ML, IngestConfig(grouplens))
    rows = new_ratings(grouplens, [1, 2], per_user=3)
    rows[2] = "\t" + rows[2].split("\t", 1)[1]
    r = append(home, ML, IngestConfig(write_delta(tmp_path / "d", rows)))
    assert r.files[0].null_keys == {"user_id": {"rows": 1, "lines": [3]}}
    report = validate(home, "movielens-100k", ValidateConfig(data_docs=False))
    (res,) = [c for c in report.failed if c.check == "every event has a user"]
    assert res.lines == ["u.data line 3"]  # the appended file's line (the first ingest's u.data had none)


def test_a_changed_definition_or_no_events_file_is_refused(home, grouplens, tmp_path):
    with pytest.raises(IngestError, match="no stored events to append to"):
        append(home, ML, IngestConfig(grouplens))
    ingest(home, ML, IngestConfig(grouplens))
    changed = ML.model_copy(update={"description": "edited"})
    with pytest.raises(IngestError, match="definition changed"):
        append(home, changed, IngestConfig(write_delta(tmp_path / "d", new_ratings(grouplens, [1]))))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no events file"):
        append(home, ML, IngestConfig(tmp_path / "empty"))


NO_KEY = """
name: nokey
tables:
  ev: {file: ev.csv, delimiter: ","}
events:
  table: ev
  user: uid
  time: {column: t, format: "%Y-%m-%d"}
  fields:
    - {name: amount, label: Amount, kind: numeric, column: amount, dtype: DOUBLE}
"""


def test_without_an_event_key_duplicates_are_equal_rows(home, tmp_path):
    d = parse_definition(NO_KEY, "nokey.yaml")
    assert d.events.key is None
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ev.csv").write_text("uid,t,amount\nu1,2024-01-01,5\nu2,2024-01-02,7\n")
    ingest(home, d, IngestConfig(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    # The same amount on the same day is the same event; another amount that day is a new one.
    (tmp_path / "b" / "ev.csv").write_text("uid,t,amount\nu1,2024-01-01,5\nu1,2024-01-01,6\nu3,2024-01-03,1\n")
    logged = []
    r = append(home, d, IngestConfig(tmp_path / "b"), logged.append)
    assert r.dedupe_on_all_columns and (r.rows_added, r.duplicates_skipped, r.users_new) == (2, 1, 1)
    assert any("declares no events.key" in line for line in logged)
    assert count(home, "SELECT user_id FROM nokey.users ORDER BY 1") == [("u1",), ("u2",), ("u3",)]


def test_a_killed_append_leaves_the_previous_tables(home, grouplens, tmp_path):
    ingest(home, ML, IngestConfig(grouplens))
    before = snapshot(home)
    delta = write_delta(tmp_path / "d1", new_ratings(grouplens, [2, 5]))
    # The child dies (SIGKILL-like, no cleanup) inside the transaction, after the events were inserted.
    script = textwrap.dedent(f"""
        import os
        from producers.datasets.definition import load_builtin
        from producers.ingest import IngestConfig
        from producers.ingest import append as mod
        from producers.stores.warehouse import Home

        real = mod._insert_row
        def die(con, table, row):
            if table.endswith('"{'ingest_delta'}"'):
                n = con.execute('SELECT count(*) FROM movielens_100k.events').fetchall()[0][0]
                print('events inside the transaction', n, flush=True)
                os._exit(9)
            real(con, table, row)
        mod._insert_row = die
        mod.append(Home.resolve({str(home.root)!r}), load_builtin("movielens-100k"), IngestConfig({str(delta)!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert out.returncode == 9, out.stderr
    n_inside = int(out.stdout.split()[-1])
    assert n_inside == len(before["events"]) + 6  # it died with the rows inserted, uncommitted
    # Its staging tables stay behind (as a killed ingest's do) beside the unchanged stored tables ...
    after = snapshot(home)
    assert {t: v for t, v in after.items() if not t.endswith("__staging")} == before
    r = append(home, ML, IngestConfig(delta))  # ... and the next run drops them and does the work
    assert r.rows_added == 6 and not [t for t in snapshot(home) if t.endswith("__staging")]


def _ts(epoch: int):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch, timezone.utc).replace(tzinfo=None)


def test_changed_users_by_event_time_and_by_append(home, grouplens, tmp_path):
    from producers.ingest.delta import appended_users
    from producers.stores.warehouse import WarehouseError

    with pytest.raises(WarehouseError):
        changed_users(home, ML.schema, since=_ts(AFTER))
    ingest(home, ML, IngestConfig(grouplens))
    last = max(t for *_, t, _ in read_ratings(grouplens))
    assert changed_users(home, ML.schema, since=_ts(AFTER)) == []
    assert changed_users(home, ML.schema, since=_ts(last - 1)) == sorted({u for u, _, _, t, _ in read_ratings(grouplens)
                                                                         if t == last})
    from producers.shared.as_of import utc_now

    mark = utc_now()  # wall clock, as appends record finished_at (naive UTC)
    assert appended_users(home, ML.schema, mark) == []
    # A late event (stamped before the as-of) is found by append, not by event time.
    late = new_ratings(grouplens, [9], per_user=1, t0=T0 + 10)
    append(home, ML, IngestConfig(write_delta(tmp_path / "late", late + new_ratings(grouplens, [4]))))
    assert changed_users(home, ML.schema, since=_ts(AFTER - 1)) == [4]
    assert appended_users(home, ML.schema, mark) == [4, 9]
    assert appended_users(home, ML.schema, utc_now()) == []


def test_a_new_user_comes_with_the_users_file(home, grouplens, tmp_path):
    ingest(home, ML, IngestConfig(grouplens))
    delta = write_delta(tmp_path / "d", [f"13\t{m}\t4\t{AFTER + m}" for m in range(1, 21)])
    (delta / "u.user").write_text((grouplens / "u.user").read_text() + "13|33|F|writer|12345\n")
    r = append(home, ML, IngestConfig(delta))
    assert (r.rows_added, r.users_touched, r.users_new, r.n_users) == (20, 1, 1, 13)
    assert r.fallback_files.keys() == {"movies"}
    assert count(home, "SELECT age, gender FROM movielens_100k.users WHERE user_id = 13") == [(33, "F")]
    # Stored users' rows are not rewritten by a users file that differs.
    (delta / "u.user").write_text("1|99|M|writer|00000\n" + "13|33|F|writer|12345\n")
    before = count(home, "SELECT * FROM movielens_100k.users ORDER BY user_id")
    append(home, ML, IngestConfig(delta))
    assert count(home, "SELECT * FROM movielens_100k.users ORDER BY user_id") == before


def test_a_full_ingest_of_the_old_source_does_not_drop_appended_events(home, grouplens, tmp_path):
    ingest(home, ML, IngestConfig(grouplens))
    append(home, ML, IngestConfig(write_delta(tmp_path / "d", new_ratings(grouplens, [1]))))
    before = snapshot(home)
    with pytest.raises(IngestError, match=r"appended by ingest .* would drop appended events"):
        ingest(home, ML, IngestConfig(grouplens))
    assert snapshot(home) == before
    assert ingest(home, ML, IngestConfig(grouplens, allow_shrink=True)).n_events == len(before["events"]) - 3
