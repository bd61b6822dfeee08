"""The Redis online store serves exactly the offline vectors; a republished timestamp replaces them there too.

Every run uses its own dataset name, so its view names (Redis hash fields) are its own: parallel runs
against one Redis never see each other's values. `.ci/run` starts Redis when it is not running.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest

from producers.publish import PublishConfig, get_store, online_features, publish
from producers.stores.warehouse import Home
from tests.feature_repo import files
from tests.feature_repo.conftest import T1, USERS, same_bits

HOST, PORT = "127.0.0.1", 6379


@pytest.fixture
def redis_home(tmp_path):
    import redis

    try:
        redis.Redis(host=HOST, port=PORT, socket_connect_timeout=2).ping()
    except redis.RedisError as e:
        pytest.skip(f"no Redis at {HOST}:{PORT} ({e}); start one with `redis-server --port {PORT}` (.ci/run does)")
    home = Home.resolve(tmp_path / "home")
    dataset = f"redis-test-{uuid.uuid4().hex[:10]}"
    yield home, dataset
    if (home.data_dir / "feast" / "registry.redis.db").exists():  # remove this run's fields from Redis
        store = get_store(home, "redis")
        store.apply([], objects_to_delete=store.list_feature_views(), partial=False)


def test_redis_serves_the_offline_vectors_bitwise(redis_home):
    home, dataset = redis_home
    schema = dataset.replace("-", "_")
    _, vecs = files.embeddings_file(home.data_dir, dataset, T1, USERS, dim=32, produced_at=datetime(2025, 1, 1))
    _, coles = files.coles_file(home.data_dir, dataset, T1, USERS)
    files.agg_file(home.data_dir, dataset, T1, USERS)
    result = publish(home, dataset, PublishConfig(online_store="redis", redis_url=f"redis://{HOST}:{PORT}/0",
                                                  materialize=True))
    assert result.online_store == "redis" and result.materialized
    assert not (home.data_dir / "feast" / "registry.db").exists()  # only the Redis store's registry
    df = online_features(home, dataset, ["llm4es_embedding", "coles_embedding", "agg_features"], [*USERS, 999],
                         online_store="redis")
    for i in range(len(USERS)):
        assert same_bits(df[f"{schema}__llm4es_embedding__vector"][i], vecs[i])
        assert same_bits(df[f"{schema}__coles_embedding__vector"][i], coles[i])
    assert df[f"{schema}__llm4es_embedding__vector"].tolist()[-1] is None
    assert df[f"{schema}__agg_features__n_events"].notna().sum() == len(USERS)

    # the same set embedded again at the same feature_timestamp: Redis skips writes that are not newer,
    # so publish drops the view's online rows first
    _, again = files.embeddings_file(home.data_dir, dataset, T1, USERS, dim=32, salt=1,
                                     produced_at=datetime(2025, 1, 2))
    publish(home, dataset, PublishConfig(online_store="redis", materialize=True))
    df = online_features(home, dataset, ["llm4es_embedding"], USERS, online_store="redis")
    assert all(same_bits(df[f"{schema}__llm4es_embedding__vector"][i], again[i]) for i in range(len(USERS)))


def test_redis_serves_session_views_by_session_and_their_rollups_by_user(redis_home):
    home, dataset = redis_home
    schema = dataset.replace("-", "_")
    sessions = [("a-1", 1, T1), ("a-2", 1, T1.replace(day=2)), ("b-1", 2, T1)]
    emb, intents = files.session_files(home.data_dir, dataset, sessions, ["browse", "buy"])
    publish(home, dataset, PublishConfig(online_store="redis", materialize=True))
    df = online_features(home, dataset, ["session_embedding", "session_intent"], ["a-1", "b-1", "zz"],
                         online_store="redis")
    assert same_bits(df[f"{schema}__session_embedding__embedding"][0], emb[0])
    assert df[f"{schema}__session_intent__intent"].tolist()[:2] == [intents[0], intents[2]]
    assert df[f"{schema}__session_embedding__embedding"][2] is None
    users = online_features(home, dataset, ["session_embedding_rollup"], [1], online_store="redis")
    assert same_bits(users[f"{schema}__session_embedding_rollup__last_session_embedding"][0], emb[1])  # the later one


def test_a_refresh_to_sqlite_refreshes_the_redis_store_the_home_also_serves(redis_home):
    """`llm4es refresh` (SQLite unless told otherwise, as in the README's cron line) in a home that publish also
    materialized into Redis: Redis must serve the changed users' new rows too, not keep their old ones."""
    home, dataset = redis_home
    schema = dataset.replace("-", "_")
    _, old = files.embeddings_file(home.data_dir, dataset, T1, USERS, dim=8)
    publish(home, dataset, PublishConfig(materialize=True))
    publish(home, dataset, PublishConfig(online_store="redis", materialize=True))
    changed = USERS[:2]
    snap, new = files.embeddings_file(home.data_dir / schema / "refresh" / "t2", dataset, T1 + timedelta(days=1),
                                      changed, dim=8)
    messages: list[str] = []
    publish(home, dataset, PublishConfig(materialize=True), messages.append, inputs={"llm4es": [snap]},
            users=changed)  # a refresh
    assert any("rows into the redis online store" in m for m in messages), messages  # says which store
    column = f"{schema}__llm4es_embedding__vector"
    for store in ("sqlite", "redis"):
        served = online_features(home, dataset, ["llm4es_embedding"], USERS, online_store=store)[column].tolist()
        for i, user in enumerate(USERS):
            want = new[i] if user in changed else old[i]
            assert same_bits(served[i], want), (store, user)
