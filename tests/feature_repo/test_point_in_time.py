"""Two snapshots: historical reads never see features computed from later data; the online store follows.

The aggregate features are the real ones (`llm4es aggregate` on the MovieLens fixture, as of two
times); the embeddings are synthetic files with the same two feature timestamps.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pyarrow.parquet as pq
import pytest

from producers.aggregate import AggregateConfig, aggregate
from producers.datasets.definition import load_builtin
from producers.ingest import IngestConfig, ingest
from producers.publish import PublishConfig, historical_features, materialize, online_features, publish, published_views
from producers.stores.warehouse import Home
from tests.feature_repo import files
from tests.feature_repo.conftest import same_bits
from tests.fixtures.movielens_files import write_grouplens

DATASET, SCHEMA = "movielens-100k", "movielens_100k"
AGG, EMB = f"{SCHEMA}__agg_features", f"{SCHEMA}__llm4es_embedding"


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """Publish at t1, materialize, then publish different values at t2 (t1 < t2 < the last event)."""
    root = tmp_path_factory.mktemp("pit")
    home = Home.resolve(root / "home")
    ingest(home, load_builtin(DATASET), IngestConfig(source=write_grouplens(root / "ml-100k")))
    con = home.connect(read_only=True)
    first, last = con.execute(f"SELECT min(event_time), max(event_time) FROM {SCHEMA}.events").fetchall()[0]
    users = [r[0] for r in con.execute(f"SELECT DISTINCT user_id FROM {SCHEMA}.events ORDER BY 1").fetchall()]
    con.close()
    t1 = first + (last - first) / 3
    t2 = first + 2 * (last - first) / 3
    out = {"home": home, "t1": t1, "t2": t2, "users": users}

    aggregate(home, DATASET, AggregateConfig(as_of=t1, force=True))
    out["agg1"] = pq.read_table(home.data_dir / SCHEMA / "agg_features.parquet").to_pandas().set_index("user_id")
    _, out["emb1"] = files.embeddings_file(home.data_dir, DATASET, t1, users, dim=16, produced_at=datetime(2025, 1, 1))
    publish(home, DATASET, PublishConfig(materialize=True))
    out["online1"] = online_features(home, DATASET, ["llm4es_embedding", "agg_features"], users)

    aggregate(home, DATASET, AggregateConfig(as_of=t2, force=True))
    out["agg2"] = pq.read_table(home.data_dir / SCHEMA / "agg_features.parquet").to_pandas().set_index("user_id")
    _, out["emb2"] = files.embeddings_file(home.data_dir, DATASET, t2, users, dim=16, produced_at=datetime(2025, 1, 2))
    messages: list[str] = []
    out["result"] = publish(home, DATASET, log=messages.append)
    out["messages"] = messages
    return out


def _at(s, when: datetime) -> pd.DataFrame:
    frame = pd.DataFrame({"user_id": s["users"], "event_timestamp": when.replace(tzinfo=timezone.utc)})
    return historical_features(s["home"], DATASET, [AGG, EMB], frame)


def test_snapshots_accumulate(snapshots):
    views = {v.name: v for v in published_views(snapshots["home"], DATASET)}
    expected = (snapshots["t1"].isoformat(), snapshots["t2"].isoformat())
    assert views[AGG].feature_timestamps == expected and views[EMB].feature_timestamps == expected
    history = pq.read_table(views[EMB].path).to_pandas()
    assert len(history) == 2 * len(snapshots["users"])


def test_between_the_snapshots_the_first_one(snapshots):
    s = snapshots
    df = _at(s, s["t1"] + (s["t2"] - s["t1"]) / 2)
    _check(df, s["agg1"], s["emb1"], s["users"])
    # exactly at a snapshot's time it counts (its events are all at or before it)
    _check(_at(s, s["t1"]), s["agg1"], s["emb1"], s["users"])


def test_after_the_second_snapshot_the_second_one(snapshots):
    s = snapshots
    _check(_at(s, s["t2"] + timedelta(days=365)), s["agg2"], s["emb2"], s["users"])


def test_before_the_first_snapshot_nothing(snapshots):
    s = snapshots
    df = _at(s, s["t1"] - timedelta(seconds=1))
    assert df[f"{EMB}__vector"].isna().all()
    assert df[f"{AGG}__n_events"].isna().all()


def test_schema_change_between_snapshots(snapshots):
    """Top categories differ between the two as-of times: the view declares the latest snapshot's columns;
    older rows hold NULL in columns they did not have."""
    s = snapshots
    new_cols = [c for c in s["agg2"].columns if c not in s["agg1"].columns]
    view = next(v for v in published_views(s["home"], DATASET) if v.name == AGG)
    assert list(view.features) == [c for c in s["agg2"].columns if c != "feature_timestamp"]
    if new_cols:
        df = _at(s, s["t1"] + timedelta(seconds=1))
        assert df[f"{AGG}__{new_cols[0]}"].isna().all()


def test_online_store_follows_a_new_snapshot_of_older_data(snapshots):
    """t2 (1998) is long before the first materialization ended (now): Feast's incremental
    materialization alone would skip it; publish resets the views whose data changed."""
    s = snapshots
    first = s["online1"]
    assert all(same_bits(first[f"{EMB}__vector"][i], s["emb1"][i]) for i in range(len(s["users"])))
    assert any("new data for" in m and EMB in m for m in s["messages"])
    materialize(s["home"])
    now = online_features(s["home"], DATASET, ["llm4es_embedding", "agg_features"], s["users"])
    assert all(same_bits(now[f"{EMB}__vector"][i], s["emb2"][i]) for i in range(len(s["users"])))
    assert now[f"{AGG}__n_events"].tolist() == s["agg2"].loc[s["users"], "n_events"].tolist()


def test_republishing_a_timestamp_replaces_it(snapshots):
    s = snapshots
    home = s["home"]
    _, changed = files.embeddings_file(home.data_dir, DATASET, s["t2"], s["users"], dim=16, salt=1,
                                       produced_at=datetime(2025, 1, 3))
    assert not same_bits(changed, s["emb2"])
    publish(home, DATASET, PublishConfig(materialize=True))
    view = next(v for v in published_views(home, DATASET) if v.name == EMB)
    assert len(pq.read_table(view.path)) == 2 * len(s["users"])  # replaced, not added
    _check(_at(s, s["t2"]), s["agg2"], changed, s["users"])
    _check(_at(s, s["t1"]), s["agg1"], s["emb1"], s["users"])  # the older snapshot is untouched
    online = online_features(home, DATASET, ["llm4es_embedding"], s["users"])
    assert all(same_bits(online[f"{EMB}__vector"][i], changed[i]) for i in range(len(s["users"])))


def _check(df: pd.DataFrame, agg: pd.DataFrame, vectors, users: list) -> None:
    assert df["user_id"].tolist() == users
    for i, user in enumerate(users):
        assert same_bits(df[f"{EMB}__vector"][i], vectors[i]), user
    for col in ("n_events", "span_days", "recency_days", "rating_mean"):
        got = df[f"{AGG}__{col}"].tolist()
        want = agg.loc[users, col].tolist()
        assert got == want, col


def test_a_home_given_as_a_folder_reads_the_same_features(snapshots):
    """The README's downstream snippet passes the home folder, not a Home: it failed with "'PosixPath' object has
    no attribute 'data_dir'"."""
    s = snapshots
    frame = pd.DataFrame({"user_id": s["users"], "event_timestamp": s["t1"].replace(tzinfo=timezone.utc)})
    by_home = historical_features(s["home"], DATASET, [EMB], frame)
    for folder in (s["home"].root, str(s["home"].root)):
        by_folder = historical_features(folder, DATASET, [EMB], frame)
        assert all(same_bits(a, b) for a, b in zip(by_home[f"{EMB}__vector"], by_folder[f"{EMB}__vector"]))
        online = online_features(folder, DATASET, ["llm4es_embedding"], s["users"])
        assert len(online) == len(s["users"]) and online[f"{EMB}__vector"].notna().all()
