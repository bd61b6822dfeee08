"""`publish`: views, provenance, reads back through Feast (offline and SQLite online), errors."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from producers.publish import (TEMPLATES, PublishConfig, PublishError, default_project, ensure_repo, get_store,
                               historical_features, materialize, online_features, package_repo_dir, publish,
                               published_views)
from producers.stores.warehouse import Home
from tests.feature_repo import files
from tests.feature_repo.conftest import DATASET, RUN, SCHEMA, T1, USERS, same_bits


def test_views_names_kinds_and_run_grouping(published):
    views = {v.name: v for v in published_views(published.home, DATASET)}
    assert list(views) == [v.name for v in published.result.views]
    assert set(views) == {f"{SCHEMA}__agg_features", f"{SCHEMA}__coles_embedding", f"{SCHEMA}__llm4es_embedding",
                          f"{SCHEMA}__llm4es__r1_epoch_1__serialized",
                          f"{SCHEMA}__llm4es__base_smollm2_135m__serialized",
                          f"{SCHEMA}__llm4es__base_smollm2_135m__enriched"}
    assert [v.name for v in views.values() if v.is_default] == [
        f"{SCHEMA}__agg_features", f"{SCHEMA}__coles_embedding", f"{SCHEMA}__llm4es_embedding"]
    default = views[f"{SCHEMA}__llm4es_embedding"]
    assert (default.kind, default.checkpoint, default.epoch, default.run, default.text_kind, default.dim) == (
        "llm4es", f"{RUN}/models/epoch-2", 2, RUN, "serialized", 8)
    # evaluate groups a run's epochs: the default (epoch 2) and the other epoch share run and text kind
    same_run = sorted((v.epoch, v.name) for v in views.values() if v.run == RUN and v.text_kind == "serialized")
    assert same_run == [(1, f"{SCHEMA}__llm4es__r1_epoch_1__serialized"), (2, f"{SCHEMA}__llm4es_embedding")]
    base = views[f"{SCHEMA}__llm4es__base_smollm2_135m__serialized"]
    assert (base.run, base.epoch, base.checkpoint) == (None, None, "base")
    agg = views[f"{SCHEMA}__agg_features"]
    assert agg.kind == "agg" and agg.features == ("n_events", "span_days", "rating_std") and agg.dim is None
    assert all(v.features == ("vector",) for v in views.values() if v.kind != "agg")
    assert all(v.feature_timestamps == (T1.isoformat(),) for v in views.values())
    assert published_views(published.home, "never-published") == []


def test_registry_has_vector_lengths_provenance_and_no_expiry(published):
    from feast.types import Array, Float32, Float64, Int64

    store = get_store(published.home)
    assert store.project == default_project(published.home)  # the home's own project
    fv = store.get_feature_view(f"{SCHEMA}__llm4es_embedding")
    vector = {f.name: f for f in fv.features}["vector"]
    assert vector.dtype == Array(Float32) and vector.vector_length == 8
    assert fv.ttl >= timedelta(days=365 * 99)  # old snapshots stay valid in point-in-time joins
    assert fv.batch_source.timestamp_field == "feature_timestamp"
    assert fv.batch_source.created_timestamp_column == "produced_at"
    tags = fv.tags
    assert tags["model"] == "smollm2-135m" and tags["checkpoint"] == f"{RUN}/models/epoch-2"
    assert (tags["epoch"], tags["layers"], tags["text_kind"], tags["run"]) == ("2", "9:31", "serialized", RUN)
    assert tags["source_hash"] == "src-texts" and tags["code_version"] == "0.1.0+gtest"
    assert tags["produced_at"].startswith("2025-01-04") and tags["feature_timestamp"] == T1.isoformat()
    assert "epoch 2" in fv.description and "smollm2-135m" in fv.description
    coles = store.get_feature_view(f"{SCHEMA}__coles_embedding")
    assert {f.name: f for f in coles.features}["vector"].vector_length == 6
    agg = store.get_feature_view(f"{SCHEMA}__agg_features")
    assert {f.name: f.dtype for f in agg.features} == {"n_events": Int64, "span_days": Float64, "rating_std": Float64}
    assert agg.tags["source_hash"] == "src-agg"
    entity = store.get_entity(f"{SCHEMA}__user")
    assert entity.join_key == "user_id" and entity.value_type.name == "INT64"


def test_repo_and_manifest_on_disk(published):
    repo = published.home.root / "feature_repo"
    assert published.result.repo == repo
    for name in ("definitions.py", "registry_store.py"):
        assert (repo / name).read_bytes() == (package_repo_dir() / name).read_bytes()
    for name, template in TEMPLATES.items():  # the templates with the home's project
        want = (package_repo_dir() / template).read_text().replace("project: llm4es\n",
                                                                   f"project: {default_project(published.home)}\n")
        assert (repo / name).read_text() == want
    manifest = json.loads((published.home.data_dir / "feast" / "manifest.json").read_text())
    entry = manifest["datasets"][DATASET]
    assert entry["user_id_type"] == "INT64" and entry["entity"] == f"{SCHEMA}__user"
    assert {v["name"] for v in entry["views"]} == {v.name for v in published.result.views}
    # the offline store: one history file per set, all snapshots in it
    for view in published.result.views:
        assert view.path.is_file() and view.path.is_relative_to(published.home.data_dir / "feast" / SCHEMA)
        assert not list(view.path.parent.glob(".*.tmp"))


def test_home_in_the_checkout_uses_the_repo_in_place():
    checkout = Home(package_repo_dir().parent)
    assert ensure_repo(checkout) == package_repo_dir()


def test_historical_features_return_the_offline_values(published):
    names = [v.name for v in published.result.views]
    when = datetime(1998, 2, 1, tzinfo=timezone.utc)
    users = [3, 1, 99, 6]  # 99 has no features; order is kept
    df = historical_features(published.home, DATASET, names, pd.DataFrame({"user_id": users, "event_timestamp": when}))
    assert df["user_id"].tolist() == users
    assert list(df.columns) == ["user_id", "event_timestamp", *(f"{v}__{f}" for v in names
                                                               for f in ("n_events", "span_days", "rating_std")
                                                               if v.endswith("agg_features"))] + [
        f"{v}__vector" for v in names if not v.endswith("agg_features")]
    for view, vecs in published.vectors.items():
        col = df[f"{view}__vector"]
        for row, user in enumerate(users):
            if user == 99:
                assert col[row] is None
            else:
                assert col[row].dtype == np.float32 and same_bits(col[row], vecs[USERS.index(user)]), (view, user)
    agg = pq.read_table(published.agg).to_pandas().set_index("user_id")
    for row, user in enumerate(users):
        if user == 99:
            assert pd.isna(df[f"{SCHEMA}__agg_features__n_events"][row])
            continue
        assert df[f"{SCHEMA}__agg_features__n_events"][row] == agg.loc[user, "n_events"]
        assert df[f"{SCHEMA}__agg_features__span_days"][row] == agg.loc[user, "span_days"]
    assert pd.isna(df[f"{SCHEMA}__agg_features__rating_std"][users.index(1)])  # NULL stays missing
    # short names work too; before the snapshot there is nothing
    early = historical_features(published.home, DATASET, ["llm4es_embedding"],
                                pd.DataFrame({"user_id": [1], "event_timestamp": [T1 - timedelta(seconds=1)]}))
    assert early[f"{SCHEMA}__llm4es_embedding__vector"][0] is None


def test_sqlite_online_store_serves_the_offline_vectors_bitwise(published):
    materialize(published.home)
    names = [v.name for v in published.result.views]
    df = online_features(published.home, DATASET, names, [*USERS, 99])
    assert df["user_id"].tolist() == [*USERS, 99]
    for view, vecs in published.vectors.items():
        col = df[f"{view}__vector"].tolist()
        assert col[-1] is None
        for i in range(len(USERS)):
            assert same_bits(col[i], vecs[i]), view
    agg = pq.read_table(published.agg).to_pandas()
    assert df[f"{SCHEMA}__agg_features__n_events"].tolist()[:-1] == agg["n_events"].tolist()


def test_unknown_views_and_bad_entity_frames_are_clear_errors(published):
    frame = pd.DataFrame({"user_id": [1], "event_timestamp": [T1]})
    with pytest.raises(PublishError, match="no published view 'nope'.*ml_pub__agg_features"):
        historical_features(published.home, DATASET, ["nope"], frame)
    with pytest.raises(PublishError, match="event_timestamp"):
        historical_features(published.home, DATASET, ["agg_features"], frame[["user_id"]])
    with pytest.raises(PublishError, match="nothing is published for other"):
        online_features(published.home, "other", ["agg_features"], [1])


def test_nothing_to_publish_is_a_clear_error(home):
    with pytest.raises(PublishError, match=r"nothing to publish for movielens-100k.*llm4es aggregate movielens-100k"
                                           r".*agg_features\.parquet"):
        publish(home, "movielens-100k")
    assert not (home.data_dir / "feast" / "manifest.json").exists()


def test_unknown_online_store_is_refused(home):
    with pytest.raises(PublishError, match="online store 'mongo'"):
        publish(home, DATASET, PublishConfig(online_store="mongo"))


def test_choosing_the_default_set_and_skipping_missing_kinds(tmp_path):
    home = Home.resolve(tmp_path / "home")
    _, base = files.embeddings_file(home.data_dir, DATASET, T1, USERS, produced_at=datetime(2025, 1, 1))
    _, ep1 = files.embeddings_file(home.data_dir, DATASET, T1, USERS, checkpoint=f"{RUN}/models/epoch-1", epoch=1,
                                   produced_at=datetime(2025, 1, 2))
    messages: list[str] = []
    result = publish(home, DATASET, log=messages.append)
    assert result.skipped == ["agg", "coles", "sessions", "intents"]
    assert any("no aggregate features" in m and "skipping" in m for m in messages)
    assert any("no CoLES embeddings" in m for m in messages)
    frame = pd.DataFrame({"user_id": [2], "event_timestamp": [T1 + timedelta(days=1)]})
    col = f"{SCHEMA}__llm4es_embedding__vector"
    assert same_bits(historical_features(home, DATASET, ["llm4es_embedding"], frame)[col][0], ep1[1])

    with pytest.raises(PublishError, match="matches none.*base_smollm2_135m__serialized"):
        publish(home, DATASET, PublishConfig(llm4es_set="epoch-7"))
    assert not list((home.data_dir / "feast").rglob("*.tmp"))  # a failed publish leaves nothing behind
    result = publish(home, DATASET, PublishConfig(llm4es_set="base_smollm2_135m__serialized"))
    default = next(v for v in result.views if v.is_default)
    assert default.checkpoint == "base"
    assert {v.name for v in result.views} == {f"{SCHEMA}__llm4es_embedding",
                                              f"{SCHEMA}__llm4es__r1_epoch_1__serialized"}
    # the default view now reads the base model's history, in the registry too
    assert same_bits(historical_features(home, DATASET, ["llm4es_embedding"], frame)[col][0], base[1])
    materialize(home)
    online = online_features(home, DATASET, ["llm4es_embedding", "llm4es__r1_epoch_1__serialized"], [2])
    assert same_bits(online[col][0], base[1])
    assert same_bits(online[f"{SCHEMA}__llm4es__r1_epoch_1__serialized__vector"][0], ep1[1])


def test_string_user_ids(tmp_path):
    home = Home.resolve(tmp_path / "home")
    _, vecs = files.embeddings_file(home.data_dir, "bank", T1, USERS, string_ids=True)
    files.agg_file(home.data_dir, "bank", T1, USERS, string_ids=True)
    publish(home, "bank", PublishConfig(materialize=True))
    assert get_store(home).get_entity("bank__user").value_type.name == "STRING"
    frame = pd.DataFrame({"user_id": ["u002", "u404"], "event_timestamp": [T1, T1]})
    df = historical_features(home, "bank", ["llm4es_embedding", "agg_features"], frame)
    assert same_bits(df["bank__llm4es_embedding__vector"][0], vecs[1])
    assert df["bank__llm4es_embedding__vector"][1] is None
    online = online_features(home, "bank", ["llm4es_embedding"], ["u002"])
    assert same_bits(online["bank__llm4es_embedding__vector"][0], vecs[1])


def test_user_id_types_must_agree(tmp_path):
    home = Home.resolve(tmp_path / "home")
    files.embeddings_file(home.data_dir, "mixed", T1, USERS, string_ids=True)
    files.agg_file(home.data_dir, "mixed", T1, USERS)
    with pytest.raises(PublishError, match="disagree on the type of user_id"):
        publish(home, "mixed")


def test_step_checkpoints_of_two_runs_get_distinct_names_and_a_path_picks_the_default(tmp_path):
    """max_steps runs end in `models/step-N`: two runs' step-40 sets must not share a label."""
    home = Home.resolve(tmp_path / "home")
    for run, day in (("demo", 1), ("serialized-only", 2)):
        files.embeddings_file(home.data_dir, DATASET, T1, USERS, checkpoint=f"runs/{SCHEMA}/{run}/models/step-40",
                              produced_at=datetime(2025, 1, day))
    checkpoint = home.root / "runs" / SCHEMA / "demo" / "models" / "step-40"
    checkpoint.mkdir(parents=True)
    result = publish(home, DATASET, PublishConfig(llm4es_set=str(checkpoint)))  # an absolute path, as a shell gives it
    names = {v.name: v for v in result.views}
    assert set(names) == {f"{SCHEMA}__llm4es_embedding", f"{SCHEMA}__llm4es__serialized_only_step_40__serialized"}
    assert names[f"{SCHEMA}__llm4es_embedding"].checkpoint == f"runs/{SCHEMA}/demo/models/step-40"
    assert names[f"{SCHEMA}__llm4es_embedding"].run == f"runs/{SCHEMA}/demo"


def _counting_applies(monkeypatch) -> list:
    from feast import FeatureStore

    calls: list = []
    real = FeatureStore.apply

    def counted(self, *args, **kwargs):
        calls.append(self.project)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "apply", counted)
    return calls


def test_apply_is_skipped_when_the_registry_holds_these_declarations(tmp_path, monkeypatch):
    """Publishing the same files again declares the same objects (their tags name each history file's hash):
    the registry is left as it is, materialization goes on from it, and the views still serve."""
    home = Home.resolve(tmp_path / "home")
    _, vectors = files.embeddings_file(home.data_dir, DATASET, T1, USERS, produced_at=datetime(2025, 1, 1))
    publish(home, DATASET, PublishConfig(materialize=True))
    registry = (home.data_dir / "feast" / "registry.db").read_bytes()
    calls = _counting_applies(monkeypatch)
    messages: list[str] = []
    publish(home, DATASET, PublishConfig(materialize=True), log=messages.append)
    assert calls == [] and any("already holds" in m and "not applied" in m for m in messages)
    assert (home.data_dir / "feast" / "registry.db").read_bytes() != registry  # materialized on (its intervals)
    col = f"{SCHEMA}__llm4es_embedding__vector"
    assert same_bits(online_features(home, DATASET, ["llm4es_embedding"], [USERS[0]])[col][0], vectors[0])


def test_apply_runs_when_a_declaration_or_the_registry_changed(tmp_path, monkeypatch):
    """Any other declaration (here a view's description), another project, or a registry changed behind
    publish's back (a `feast apply` of other objects) is applied as before."""
    from producers.publish.repo import _definitions

    home = Home.resolve(tmp_path / "home")
    files.embeddings_file(home.data_dir, DATASET, T1, USERS, produced_at=datetime(2025, 1, 1))
    publish(home, DATASET)
    calls = _counting_applies(monkeypatch)
    definitions = _definitions()
    real_build = definitions.build

    def build(manifest, feast_dir):
        objects = real_build(manifest, feast_dir)
        objects[f"{SCHEMA}__llm4es_embedding"].description += " (changed)"
        return objects

    monkeypatch.setattr(definitions, "build", build)
    publish(home, DATASET)
    assert len(calls) == 1
    view = get_store(home).get_feature_view(f"{SCHEMA}__llm4es_embedding")
    assert view.description.endswith(" (changed)")
    monkeypatch.setattr(definitions, "build", real_build)
    publish(home, DATASET)
    assert len(calls) == 2 and not get_store(home).get_feature_view(f"{SCHEMA}__llm4es_embedding"
                                                                     ).description.endswith(" (changed)")
    publish(home, DATASET)
    assert len(calls) == 2  # unchanged again
    store = get_store(home)  # a view edited in the registry itself
    view = store.get_feature_view(f"{SCHEMA}__llm4es_embedding")
    view.tags["edited"] = "by hand"
    store.apply([view])
    calls.clear()
    publish(home, DATASET)
    assert len(calls) == 1 and "edited" not in get_store(home).get_feature_view(f"{SCHEMA}__llm4es_embedding").tags
    publish(home, DATASET, PublishConfig(project="another_project"))
    assert len(calls) == 2
