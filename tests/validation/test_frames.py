"""validation.frames: the gates share one GX context per process, and a bad value is still stopped and named.

The gates validate counts first and fetch the failing rows only when something failed; these tests run a
clean gate, then a bad one, in the same process, so a state kept between runs cannot hide the second.
Suites are built once per process, and GX builds an expectation's configuration once per validation: the
tests below count both, and check that the results are those GX gives without the memo.
"""
from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest

import great_expectations as gx
import great_expectations.expectations.expectation as gx_expectation
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


def session_tables():
    con = duckdb.connect()
    con.execute("CREATE SCHEMA s")
    con.execute("CREATE TABLE s.events AS SELECT 'u' || (i % 3) AS user_id FROM range(9) t(i)")
    con.execute("CREATE TABLE good AS SELECT 'u' || i || '#1' AS session_id, 3 AS n_events, "
                "TIMESTAMP '2024-01-01' AS start_time, TIMESTAMP '2024-01-02' AS end_time FROM range(3) t(i)")
    con.execute("CREATE TABLE good_events AS SELECT 'u' || (i % 3) || '#1' AS session_id, 'u' || (i % 3) AS user_id "
                "FROM range(9) t(i)")
    con.execute("CREATE TABLE bad AS SELECT * REPLACE (CASE WHEN session_id = 'u1#1' THEN start_time - INTERVAL 1 "
                "DAY ELSE end_time END AS end_time) FROM good")
    return con


class D:
    schema = "s"


def test_a_bad_session_table_is_stopped_after_a_clean_one():
    con = session_tables()
    good = check_sessions(con, D(), "good", "good_events", explicit=False)
    assert all(r.success for r in good), good
    bad = [r for r in check_sessions(con, D(), "bad", "good_events", explicit=False) if not r.success]
    assert [r.check for r in bad] == ["a session does not end before it starts"]
    assert bad[0].where and bad[0].where[0]["session_id"] == "u1#1"


def test_the_session_checks_build_their_suites_once_per_process(monkeypatch):
    con = session_tables()
    check_sessions(con, D(), "good", "good_events", explicit=True)  # whatever ran before, its suites now exist
    made = []
    real = gx.ExpectationSuite
    monkeypatch.setattr(gx, "ExpectationSuite", lambda *a, **k: made.append(k) or real(*a, **k))
    assert all(r.success for r in check_sessions(con, D(), "good", "good_events", explicit=True))
    bad = [r for r in check_sessions(con, D(), "bad", "good_events", explicit=True) if not r.success]
    assert [r.check for r in bad] == ["a session does not end before it starts"]  # the same suites, a new frame
    assert made == []


SESSION_FRAME = pd.DataFrame({"session_id": [f"u{i}#1" for i in range(50)], "n_events": [3] * 50,
                              "start_time": pd.Timestamp("2024-01-01"), "end_time": pd.Timestamp("2024-01-02")})
SESSION_CHECKS = [
    ("ExpectColumnValuesToNotBeNull", {"column": "session_id"}, {"index": 0}),
    ("ExpectColumnValuesToBeUnique", {"column": "session_id"}, {"index": 1}),
    ("ExpectColumnValuesToBeBetween", {"column": "n_events", "min_value": 1}, {"index": 2}),
    ("ExpectColumnPairValuesAToBeGreaterThanB", {"column_A": "end_time", "column_B": "start_time", "or_equal": True},
     {"index": 3}),
]
FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 5, "unexpected_index_column_names": ["session_id"]}


def test_gx_builds_an_expectations_configuration_about_ten_times_per_validation_not_a_hundred(monkeypatch):
    validate_frame("test.count", SESSION_FRAME, SESSION_CHECKS, FORMAT)
    built = []
    real = gx_expectation.ExpectationConfiguration

    class Counting(real):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gx_expectation, "ExpectationConfiguration", Counting)
    assert all(r.success for r in validate_frame("test.count", SESSION_FRAME, SESSION_CHECKS, FORMAT))
    # GX 1.x alone: ~104 per expectation (the property is rebuilt at every read); with the memo ~11
    assert 0 < len(built) <= 15 * len(SESSION_CHECKS)
    one = gx.expectations.ExpectColumnValuesToNotBeNull(column="x")
    assert one.configuration is not one.configuration  # outside a validation GX's property is untouched


def test_the_memo_gives_the_results_gx_gives_without_it():
    frame = SESSION_FRAME.copy()
    frame.loc[[3, 7], "end_time"] = pd.Timestamp("2023-12-31")
    frame.loc[9, "n_events"] = 0
    frame.loc[12, "session_id"] = "u11#1"
    suite = gx.ExpectationSuite(name="test.plain")
    for name, kwargs, meta in SESSION_CHECKS:
        suite.add_expectation(getattr(gx.expectations, name)(**kwargs, meta=meta))
    from validation.frames import _batch_definition

    plain = _batch_definition().get_batch(batch_parameters={"dataframe": frame}).validate(suite, result_format=FORMAT)
    memo = validate_frame("test.memo", frame, SESSION_CHECKS, FORMAT)

    def shown(results):
        return sorted((r.expectation_config.meta["index"], r.success, repr(r.result)) for r in results)

    assert shown(memo) == shown(plain.results)
    assert [s for _, s, _ in shown(memo)] == [True, False, False, False]


def test_a_reused_suite_takes_each_runs_parameters():
    """The suite is built once; the parameters (a chunk's known users) are each run's own, never the first's."""
    checks = [("ExpectColumnValuesToBeInSet", {"column": "user_id", "value_set": {"$PARAMETER": "known"}},
               {"index": 0})]
    frame = pd.DataFrame({"user_id": [1, 2, 3]})
    fmt = {"result_format": "SUMMARY", "partial_unexpected_count": 5}
    assert validate_frame("test.param", frame, checks, fmt, {"known": [1, 2, 3]})[0].success
    bad = validate_frame("test.param", frame, checks, fmt, {"known": [1, 2]})[0]
    assert not bad.success and bad.result["partial_unexpected_list"] == [3]
    assert validate_frame("test.param", frame, checks, fmt, {"known": [1, 2, 3]})[0].success
