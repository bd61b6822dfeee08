"""The aggregate snapshot gate: a planted bad aggregate snapshot is stopped with a message naming what is wrong."""
from __future__ import annotations

from datetime import datetime

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from validation.aggregate_gate import check_aggregate_snapshot, served_ranges
from validation.snapshot_gate import SnapshotGateError

T0, T1 = datetime(2024, 1, 1), datetime(2024, 1, 8)
COLUMNS = ["user_id", "feature_timestamp", "n_events", "recency_days", "dwell_s_mean", "page__home_count",
           "page__home_share", "page__home_dwell_s_mean"]


def agg_rows(users, ts, seed=0, scale=1.0) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = len(users)
    events = rng.integers(5, 200, n)
    home = (events * rng.uniform(0, 1, n)).astype(np.int64)
    # a category mean is NULL for a user without events in it: legitimate, not a defect
    home_mean = [None if h == 0 else float(x) for h, x in zip(home, rng.uniform(1, 60, n))]
    return pa.table({"user_id": pa.array(users, pa.int64()), "feature_timestamp": pa.array([ts] * n),
                     "n_events": pa.array(events, pa.int64()), "recency_days": rng.uniform(0, 30, n),
                     "dwell_s_mean": rng.uniform(1, 60, n) * scale, "page__home_count": pa.array(home, pa.int64()),
                     "page__home_share": home / events, "page__home_dwell_s_mean": pa.array(home_mean, pa.float64())})


@pytest.fixture(scope="module")
def served():
    con = duckdb.connect()
    con.register("hist", agg_rows(list(range(1000)), T0))
    try:
        return served_ranges(con, "SELECT * FROM hist")
    finally:
        con.close()


def set_value(table: pa.Table, column: str, row: int, value) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = value
    return table.set_column(table.column_names.index(column), column, pa.array(values, table.schema.field(column).type))


def test_a_clean_refresh_with_legitimate_nulls_passes(served):
    snap = agg_rows([3, 7, 11, 12], T1, seed=1)
    snap = set_value(snap, "page__home_dwell_s_mean", 0, None)
    report = check_aggregate_snapshot(snap, COLUMNS, served, expected_users=[3, 7, 11, 12])
    assert report.success, report.message()


def test_a_planted_nan_is_stopped_and_named(served):
    snap = set_value(agg_rows([3, 7, 11, 12], T1, seed=1), "dwell_s_mean", 2, float("nan"))
    with pytest.raises(SnapshotGateError) as e:
        check_aggregate_snapshot(snap, COLUMNS, served, expected_users=[3, 7, 11, 12])
    text = str(e.value)
    assert "FAIL no NaN or infinite values: 1 of 4 users fail" in text
    assert "user 11: dwell_s_mean = nan" in text


def test_an_infinite_share_is_stopped(served):
    snap = set_value(agg_rows([3, 7], T1, seed=1), "page__home_share", 1, float("inf"))
    with pytest.raises(SnapshotGateError, match="user 7: page__home_share = inf"):
        check_aggregate_snapshot(snap, COLUMNS, served)


def test_a_missing_column_and_a_missing_user_are_named(served):
    snap = agg_rows([3, 7], T1, seed=1).drop_columns(["page__home_share"])
    with pytest.raises(SnapshotGateError) as e:
        check_aggregate_snapshot(snap, COLUMNS, served, expected_users=[3, 7, 9])
    text = str(e.value)
    assert "FAIL the served columns, in order" in text and "missing page__home_share" in text
    assert "FAIL share of refreshed users present" in text and "missing 9" in text


def test_values_outside_the_served_range_are_stopped_with_the_column(served):
    snap = agg_rows(list(range(40)), T1, seed=2, scale=1000.0)  # seconds written as milliseconds
    with pytest.raises(SnapshotGateError) as e:
        check_aggregate_snapshot(snap, COLUMNS, served)
    text = str(e.value)
    assert "FAIL values within the served range: 1 of 3 columns fail" in text
    assert "dwell_s_mean: 100% outside" in text
    # a count past the served maximum is a longer history, not a defect
    grown = agg_rows([3], T1, seed=1)
    assert check_aggregate_snapshot(set_value(grown, "n_events", 0, 10_000), COLUMNS, served).success
    # forced: reported, not raised
    assert not check_aggregate_snapshot(snap, COLUMNS, served, force=True).success


def test_a_null_activity_column_is_stopped(served):
    snap = set_value(agg_rows([3, 7], T1, seed=1), "n_events", 0, None)
    with pytest.raises(SnapshotGateError, match="FAIL n_events is never NULL"):
        check_aggregate_snapshot(snap, COLUMNS, served)
