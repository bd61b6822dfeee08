"""validation.frames: the gates share one GX context per process, and a bad value is still stopped and named.

The gates validate counts first and fetch the failing rows only when something failed; these tests run a
clean gate, then a bad one, in the same process, so a state kept between runs cannot hide the second.
"""
from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest

import great_expectations as gx
from tests.validation.test_aggregate_gate import COLUMNS, T1, agg_rows, set_value
from tests.validation.test_snapshot_gate import table, vectors
from validation.aggregate_gate import check_aggregate_snapshot, served_ranges
from validation.frames import validate_frame
from validation.run import check_sessions
from validation.snapshot_gate import SnapshotGateError, check_snapshot


@pytest.fixture(scope="module")
def served():
    con = duckdb.connect()
    con.register("hist", agg_rows(list(range(1000)), T1))
    try:
        return served_ranges(con, "SELECT * FROM hist")
    finally:
        con.close()


def test_the_gates_set_up_great_expectations_once_per_process(monkeypatch, served):
    check_snapshot(table(vectors()), table(vectors()))  # whatever ran before, the context now exists
    made = []
    real = gx.get_context
    monkeypatch.setattr(gx, "get_context", lambda *a, **k: made.append(k) or real(*a, **k))
    old = vectors()
    check_snapshot(table(vectors(seed=3)), table(old))
    check_snapshot(table(vectors(seed=4)), table(old), expected_users=range(400))
    check_aggregate_snapshot(agg_rows([3, 7], T1, seed=1), COLUMNS, served, expected_users=[3, 7])
    assert made == []


def test_a_bad_vector_after_a_clean_gate_is_stopped_and_named():
    old = vectors()
    assert check_snapshot(table(old), table(old), unchanged_users=range(50)).success
    new = old.copy()
    new[23, 5] = np.nan
    with pytest.raises(SnapshotGateError) as e:
        check_snapshot(table(new), table(old), unchanged_users=range(50))
    msg = str(e.value)
    assert "FAIL no NaN or infinite values: 1 of 400 users fail" in msg
    assert "user 23 (finite False)" in msg
    assert check_snapshot(table(old), table(old)).success  # and the next clean one passes again


def test_a_bad_aggregate_after_a_clean_gate_is_stopped_and_named(served):
    users = [3, 7, 11, 12]
    assert check_aggregate_snapshot(agg_rows(users, T1, seed=1), COLUMNS, served, expected_users=users).success
    bad = set_value(agg_rows(users, T1, seed=1), "page__home_share", 1, float("inf"))
    with pytest.raises(SnapshotGateError) as e:
        check_aggregate_snapshot(bad, COLUMNS, served, expected_users=users)
    assert "user 7: page__home_share = inf" in str(e.value)


def test_failing_rows_are_named_by_their_key_column_and_passing_runs_give_counts():
    frame = pd.DataFrame({"session_id": ["a#1", "a#2", "b#1"], "n_events": [3, 0, 2]})
    checks = [("ExpectColumnValuesToBeBetween", {"column": "n_events", "min_value": 1}, {"index": 0}),
              ("ExpectColumnValuesToBeUnique", {"column": "session_id"}, {"index": 1})]
    fmt = {"result_format": "SUMMARY", "partial_unexpected_count": 5, "unexpected_index_column_names": ["session_id"]}
    bad, unique = validate_frame("test.sessions", frame, checks, fmt)
    assert not bad.success and bad.result["unexpected_count"] == 1
    assert bad.result["partial_unexpected_index_list"] == [{"session_id": "a#2", "n_events": 0}]
    assert unique.success and unique.expectation_config.meta == {"index": 1}
    ok = validate_frame("test.sessions", frame.iloc[[0, 2]], checks, fmt)
    assert all(r.success for r in ok) and ok[0].result["element_count"] == 2


def test_a_bad_session_table_is_stopped_after_a_clean_one():
    con = duckdb.connect()
    con.execute("CREATE SCHEMA s")
    con.execute("CREATE TABLE s.events AS SELECT 'u' || (i % 3) AS user_id FROM range(9) t(i)")
    con.execute("CREATE TABLE good AS SELECT 'u' || i || '#1' AS session_id, 3 AS n_events, "
                "TIMESTAMP '2024-01-01' AS start_time, TIMESTAMP '2024-01-02' AS end_time FROM range(3) t(i)")
    con.execute("CREATE TABLE good_events AS SELECT 'u' || (i % 3) || '#1' AS session_id, 'u' || (i % 3) AS user_id "
                "FROM range(9) t(i)")
    con.execute("CREATE TABLE bad AS SELECT * REPLACE (CASE WHEN session_id = 'u1#1' THEN start_time - INTERVAL 1 "
                "DAY ELSE end_time END AS end_time) FROM good")

    class D:
        schema = "s"

    good = check_sessions(con, D(), "good", "good_events", explicit=False)
    assert all(r.success for r in good), good
    bad = [r for r in check_sessions(con, D(), "bad", "good_events", explicit=False) if not r.success]
    assert [r.check for r in bad] == ["a session does not end before it starts"]
    assert bad[0].where and bad[0].where[0]["session_id"] == "u1#1"
