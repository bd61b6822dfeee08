"""`llm4es refresh`: only the users with new events are recomputed, gated, published and materialized."""
from __future__ import annotations

import os
import shutil
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from producers.aggregate import AggregateConfig, aggregate
from producers.coles import ColesConfig, coles
from producers.datasets.definition import load_builtin
from producers.ingest import IngestConfig, ingest
from producers.ingest.append import append
from producers.publish import PublishConfig, historical_features, online_features, publish
from producers.refresh import RefreshConfig, RefreshError, refresh
from producers.serialize.run import SerializeConfig, serialize
from producers.stores.outputs import read_provenance
from producers.stores.warehouse import Home
from tests.fixtures.movielens_files import write_grouplens
from tests.fixtures.spies import record_materializations
from tests.fixtures.tiny_model import save_tiny_model, tiny_tokenizer
from tests.producers.test_append import new_ratings, write_delta
from training.embed import EmbedConfig, embed
from validation.run import ValidateConfig, validate
from validation.snapshot_gate import SnapshotGateError

os.environ.setdefault("FEAST_USAGE", "False")

ML = load_builtin("movielens-100k")
DATASET = ML.name
CHANGED = [2, 5, 7]
EMB, AGG, COLES = "llm4es_embedding", "agg_features", "coles_embedding"
TINY_COLES = ColesConfig(hidden_size=8, embedding_dim=4, epochs=1, batch_size=4, split_count=3, cnt_min=3, cnt_max=8,
                         seed=7, progress=False, threads=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), tiny_tokenizer(), seed=0)


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_dir):
    """Ingested, validated, serialized, embedded with the tiny model, aggregated, published and materialized."""
    root = tmp_path_factory.mktemp("refresh")
    home = Home.resolve(root / "home")
    source = write_grouplens(root / "ml-100k")
    ingest(home, ML, IngestConfig(source=source))
    assert validate(home, DATASET, ValidateConfig(data_docs=False)).success
    serialize(home, DATASET, SerializeConfig(model="tiny", max_tokens=110), tokenizer=tiny_tokenizer())
    embed(home, DATASET, EmbedConfig(model=str(model_dir), layers="1:", max_length=120))
    aggregate(home, DATASET, AggregateConfig())
    coles(home, DATASET, TINY_COLES)
    publish(home, DATASET, PublishConfig(materialize=True))
    return root, home, source


@pytest.fixture
def home(served, tmp_path):
    """A copy of the served home, with new events for CHANGED appended and validated."""
    root, built, source = served
    target = tmp_path / "home"
    shutil.copytree(built.root, target)
    h = Home.resolve(target)
    append(h, ML, IngestConfig(write_delta(tmp_path / "delta", new_ratings(source, CHANGED))))
    assert validate(h, DATASET, ValidateConfig(data_docs=False)).success
    return h


def users_of(home) -> list[int]:
    return [u for u, in home.connect(read_only=True).execute(f"SELECT DISTINCT user_id FROM {ML.schema}.events "
                                                              "ORDER BY 1").fetchall()]


def vectors(frame: pd.DataFrame, column: str) -> dict:
    return {u: np.asarray(v) for u, v in zip(frame["user_id"], frame[column])}


def test_refresh_serves_new_vectors_for_exactly_the_changed_users(home):
    users = users_of(home)
    before = online_features(home, DATASET, [EMB, AGG, COLES], users)
    old_emb = vectors(before, f"{ML.schema}__{EMB}__vector")
    old_coles = vectors(before, f"{ML.schema}__{COLES}__vector")
    old_n = dict(zip(before["user_id"], before[f"{ML.schema}__{AGG}__n_events"]))
    since_ts = pd.Timestamp(refresh_since(home))

    r = refresh(home, DATASET, log=print, tokenizer=tiny_tokenizer())
    assert r.published and not r.nothing_new and r.users == CHANGED
    assert sorted(r.refreshed) == ["agg", "coles", "llm4es"] and r.gate_passed and r.not_refreshed == []
    assert "mean cosine" in r.gate["coles"] and "mean cosine" in r.gate["llm4es"]
    assert r.as_of > r.since

    after = online_features(home, DATASET, [EMB, AGG, COLES], users)
    new_emb = vectors(after, f"{ML.schema}__{EMB}__vector")
    new_coles = vectors(after, f"{ML.schema}__{COLES}__vector")
    new_n = dict(zip(after["user_id"], after[f"{ML.schema}__{AGG}__n_events"]))
    for u in users:
        moved = not np.array_equal(old_emb[u], new_emb[u])
        assert moved == (u in CHANGED), u
        assert (not np.array_equal(old_coles[u], new_coles[u])) == (u in CHANGED), u
        assert (new_n[u] == old_n[u] + 3) if u in CHANGED else (new_n[u] == old_n[u]), u

    # Point in time: at the old as-of everyone has the old vector; after the new one, only CHANGED moved.
    frame = pd.DataFrame({"user_id": users * 2, "event_timestamp": [since_ts] * len(users)
                          + [pd.Timestamp(r.as_of) + timedelta(seconds=1)] * len(users)})
    hist = historical_features(home, DATASET, [EMB], frame)
    col = next(c for c in hist.columns if c.endswith("__vector"))
    for i, (u, v) in enumerate(zip(hist["user_id"], hist[col])):
        want = old_emb[u] if i < len(users) else new_emb[u]  # rows come back in the frame's order
        assert np.array_equal(np.asarray(v, dtype=np.float32), np.asarray(want, dtype=np.float32)), (i, u)

    again = refresh(home, DATASET, tokenizer=tiny_tokenizer())
    assert again.nothing_new and not again.published


def test_a_set_pooled_otherwise_is_refreshed_with_its_own_pooling(home, model_dir):
    embed(home, DATASET, EmbedConfig(model=str(model_dir), layers="1:", max_length=120, pooling="last"))
    publish(home, DATASET, PublishConfig(materialize=True))

    r = refresh(home, DATASET, tokenizer=tiny_tokenizer())
    assert r.published and "llm4es" in r.refreshed and r.users == CHANGED
    assert read_provenance(_served_llm4es_file(home))["pooling_spec"] == "last"


def _served_llm4es_file(home):
    from producers.stores.serving import _read_manifest, manifest_path

    entry = _read_manifest(manifest_path(home))["datasets"][DATASET]
    return entry["sets"][entry["defaults"]["llm4es"]]["file"]


def refresh_since(home) -> datetime:
    from producers.stores.serving import _read_manifest, manifest_path

    entry = _read_manifest(manifest_path(home))["datasets"][DATASET]
    return datetime.fromisoformat(max(entry["sets"][entry["defaults"]["llm4es"]]["feature_timestamps"]))


def test_a_nan_snapshot_is_stopped_by_the_gate_and_not_published(home, monkeypatch):
    import training.embed.parts as embed_parts

    users = users_of(home)
    before = online_features(home, DATASET, [EMB], users)
    real = embed_parts.write_part

    def plant_nan(path, users_, enc, hashes):
        enc.vectors[0, 0] = np.nan
        real(path, users_, enc, hashes)

    monkeypatch.setattr(embed_parts, "write_part", plant_nan)
    with pytest.raises(SnapshotGateError) as e:
        refresh(home, DATASET, tokenizer=tiny_tokenizer())
    assert "FAIL no NaN or infinite values" in str(e.value) and "1 of" in str(e.value)
    after = online_features(home, DATASET, [EMB], users)
    assert all(np.array_equal(a, b) for a, b in zip(before.iloc[:, 1], after.iloc[:, 1]))


def test_a_bad_aggregate_snapshot_is_stopped_by_the_gate_and_not_published(home, monkeypatch):
    import pyarrow as pa

    import producers.aggregate as agg_mod

    users = users_of(home)
    before = online_features(home, DATASET, [AGG], users)
    real = agg_mod.write_parquet

    def plant_nan(rows, path, *a, **k):
        i = rows.column_names.index("rating_mean")
        values = rows.column(i).to_pylist()
        values[0] = float("nan")
        return real(rows.set_column(i, "rating_mean", pa.array(values, pa.float64())), path, *a, **k)

    monkeypatch.setattr(agg_mod, "write_parquet", plant_nan)
    with pytest.raises(SnapshotGateError) as e:
        refresh(home, DATASET, tokenizer=tiny_tokenizer())
    assert "agg: feature snapshot of 3 users" in str(e.value)
    assert "FAIL no NaN or infinite values: 1 of 3 users fail" in str(e.value)
    assert f"user {CHANGED[0]}: rating_mean = nan" in str(e.value)
    after = online_features(home, DATASET, [AGG], users)
    pd.testing.assert_frame_equal(before, after)


def test_another_model_is_refused_without_full(home, tmp_path):
    other = save_tiny_model(tmp_path / "other", tiny_tokenizer(), seed=1)
    with pytest.raises(RefreshError, match="two models in one view"):
        refresh(home, DATASET, RefreshConfig(model=str(other)), tokenizer=tiny_tokenizer())


@pytest.mark.parametrize("phase", ["computed", "gated"])
def test_a_killed_refresh_leaves_serving_unchanged_and_the_next_run_completes(home, monkeypatch, phase):
    import producers.refresh as refresh_mod

    users = users_of(home)
    before = online_features(home, DATASET, [EMB], users)

    class Killed(BaseException):
        pass

    def die(at):
        if at == phase:
            raise Killed(at)

    monkeypatch.setattr(refresh_mod, "_reached", die)
    with pytest.raises(Killed):
        refresh(home, DATASET, tokenizer=tiny_tokenizer())
    after = online_features(home, DATASET, [EMB], users)
    assert all(np.array_equal(a, b) for a, b in zip(before.iloc[:, 1], after.iloc[:, 1]))
    monkeypatch.undo()
    r = refresh(home, DATASET, tokenizer=tiny_tokenizer())
    assert r.published and r.users == CHANGED
    done = online_features(home, DATASET, [EMB], users)
    moved = [u for u, a, b in zip(users, before.iloc[:, 1], done.iloc[:, 1]) if not np.array_equal(a, b)]
    assert moved == CHANGED


def test_full_re_embeds_everyone_with_the_new_model_and_serves_it(home, tmp_path):
    from producers.stores.serving import _read_manifest, manifest_path

    users = users_of(home)
    before = vectors(online_features(home, DATASET, [EMB], users), f"{ML.schema}__{EMB}__vector")
    other = save_tiny_model(tmp_path / "other", tiny_tokenizer(), seed=1)
    r = refresh(home, DATASET, RefreshConfig(model=str(other), full=True), tokenizer=tiny_tokenizer())
    assert r.published and r.model == str(other)
    entry = _read_manifest(manifest_path(home))["datasets"][DATASET]
    served = entry["sets"][entry["defaults"]["llm4es"]]
    assert served["model"] == str(other) and served["n_rows"] == len(users)  # its own history: no mixing
    after = vectors(online_features(home, DATASET, [EMB], users), f"{ML.schema}__{EMB}__vector")
    assert all(not np.array_equal(before[u], after[u]) for u in users)


def test_cli_says_nothing_new_and_refuses_another_model(served, tmp_path):
    from click.testing import CliRunner

    from producers.cli import cli

    _, built, _ = served
    target = tmp_path / "home"
    shutil.copytree(built.root, target)
    runner = CliRunner()
    r = runner.invoke(cli, ["--home", str(target), "refresh", DATASET])
    assert r.exit_code == 0, r.output
    assert "nothing new" in r.output and "nothing refreshed" in r.output
    other = save_tiny_model(tmp_path / "other", tiny_tokenizer(), seed=1)
    r = runner.invoke(cli, ["--home", str(target), "refresh", DATASET, "--model", str(other)])
    assert r.exit_code == 1 and "two models in one view" in r.output and "--full" in r.output


def test_a_second_day_refreshes_from_the_first_refresh_snapshot(served, home, tmp_path):
    """Day 2: new events for another user, the data gate on the delta, a refresh: its aggregate snapshot holds
    that user alone, with the served columns (read from day 1's snapshot file), and passes the gate."""
    import pyarrow.parquet as pq

    from tests.producers.test_append import AFTER

    _, _, source = served
    first = refresh(home, DATASET, tokenizer=tiny_tokenizer())
    assert first.published
    day2 = new_ratings(source, [3], t0=AFTER + 20 * 86400)
    append(home, ML, IngestConfig(write_delta(tmp_path / "day2", day2)))
    report = validate(home, DATASET, ValidateConfig(data_docs=False, delta=True))
    assert report.success and report.scope.endswith(": 1 users"), [(r.check, r.examples) for r in report.failed]
    users = users_of(home)
    before = online_features(home, DATASET, [AGG], users)
    second = refresh(home, DATASET, tokenizer=tiny_tokenizer())
    assert second.published and second.users == [3] and "all checks passed" in second.gate["agg"]
    snap = pq.read_table(second.snapshot_dir / "agg_features.parquet")
    assert snap.column("user_id").to_pylist() == [3]
    assert snap.column_names == read_provenance(first.snapshot_dir / "agg_features.parquet")["columns"]
    after = online_features(home, DATASET, [AGG], users)
    n = f"{ML.schema}__{AGG}__n_events"
    moved = {u for u, a, b in zip(users, before[n], after[n]) if a != b}
    assert moved == {3}


def _same(a, b) -> bool:
    """Equal values, NaN (a missing aggregate) equal to NaN."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


def _served_latest(home, view: str, users: list[int]) -> dict:
    """Each user's latest row of the view's history (by feature_timestamp, then produced_at): what a
    materialization over the whole history serves."""
    import json

    import pyarrow.parquet as pq

    manifest = json.loads((home.data_dir / "feast" / "manifest.json").read_text())
    entry = manifest["datasets"][DATASET]
    (v,) = [v for v in entry["views"] if v["name"] == f"{ML.schema}__{view}"]
    frame = pq.read_table(home.data_dir / "feast" / v["source"]).to_pandas()
    frame = frame.sort_values(["feature_timestamp", "produced_at"]).groupby("user_id").tail(1)
    return {u: row for u, row in zip(frame["user_id"], frame.to_dict("records")) if u in users}


def test_a_refresh_writes_the_changed_rows_online_without_materializing_whole_histories(home, monkeypatch):
    """The views the online store served up to date take the refreshed users' latest rows straight in (no
    materialize-incremental, which reads a view's whole history); the registry records the materialization,
    so a later `materialize-incremental` starts after it and changes nothing."""

    from producers.publish import materialize
    from producers.stores.serving import get_store

    publish(home, DATASET, PublishConfig(materialize=True))  # the copied home's registry names the served files
    users = users_of(home)
    calls = record_materializations(monkeypatch)
    started = datetime.now().astimezone()
    r = refresh(home, DATASET, tokenizer=tiny_tokenizer())
    assert r.published and r.users == CHANGED
    assert calls == []
    after = online_features(home, DATASET, [EMB, AGG, COLES], users)
    for view, column in ((EMB, "vector"), (COLES, "vector"), (AGG, "n_events")):
        latest = _served_latest(home, view, users)
        for u, value in zip(after["user_id"], after[f"{ML.schema}__{view}__{column}"]):
            assert np.array_equal(np.asarray(value), np.asarray(latest[u][column])), (view, u)
    store = get_store(home)
    for v in store.list_feature_views():
        assert v.most_recent_end_time >= started, v.name

    materialize(home)  # the feast CLI's materialize-incremental: nothing left to write
    assert calls  # this one materializes
    again = online_features(home, DATASET, [EMB, AGG, COLES], users)
    for col in again.columns[1:]:
        diff = [(u, a, b) for u, a, b in zip(users, after[col], again[col]) if not _same(a, b)]
        assert diff == [], col


def test_a_refresh_after_a_publish_left_rows_unmaterialized_materializes_them_too(served, home, tmp_path):
    """Rows a refresh published without materializing are not in the online store: the next refresh cannot just
    write its own users' rows, it materializes, so the first refresh's users are served their new rows too."""
    from tests.producers.test_append import AFTER

    _, _, source = served
    publish(home, DATASET, PublishConfig(materialize=True))  # the copied home's registry names the served files
    users = users_of(home)
    before = online_features(home, DATASET, [EMB, AGG], users)
    first = refresh(home, DATASET, RefreshConfig(materialize=False), tokenizer=tiny_tokenizer())
    assert first.published and first.users == CHANGED
    unmoved = online_features(home, DATASET, [AGG], users)
    n = f"{ML.schema}__{AGG}__n_events"
    assert list(unmoved[n]) == list(before[n])
    append(home, ML, IngestConfig(write_delta(tmp_path / "day2", new_ratings(source, [3], t0=AFTER + 20 * 86400))))
    assert validate(home, DATASET, ValidateConfig(data_docs=False, delta=True)).success
    second = refresh(home, DATASET, tokenizer=tiny_tokenizer())
    assert second.published and second.users == [3]
    after = online_features(home, DATASET, [EMB, AGG], users)
    moved = {u for u, a, b in zip(users, before[n], after[n]) if a != b}
    assert moved == {*CHANGED, 3}
    latest = _served_latest(home, EMB, users)
    for u, value in zip(after["user_id"], after[f"{ML.schema}__{EMB}__vector"]):
        assert np.array_equal(np.asarray(value), np.asarray(latest[u]["vector"])), u
