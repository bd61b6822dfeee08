"""Publishing new data under live readers: no failed read, no lost value, and a killed publish leaves the
previous state serving (issue 11, point 4).

Readers are threads calling Feast's `get_online_features` in a loop, each with its own FeatureStore from
the home's repo, as a feature server would. Kills are real: a subprocess runs `publish` and is sent SIGKILL
while it waits at a named phase (`producers.publish._reached`, replaced in the subprocess).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from producers.publish import PublishConfig, get_store, publish
from producers.stores.warehouse import Home
from tests.feature_repo import files

DATASET, SCHEMA = "live", "live"
T1, T2 = datetime(1998, 1, 1), datetime(1998, 3, 1)  # both long before any materialization's end (now)
USERS = list(range(1, 21))
EMB, AGG = f"{SCHEMA}__llm4es_embedding", f"{SCHEMA}__agg_features"
REFS = [f"{EMB}:vector", f"{AGG}:n_events", f"{AGG}:span_days"]
REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS = "127.0.0.1:6379"


def snapshot(home: Home, when: datetime, dataset: str = DATASET, salt: int = 0) -> dict[str, dict]:
    """Write the feature files of one as-of time; the values each user must then be served, by column."""
    agg = files.agg_file(home.data_dir, dataset, when, USERS)
    _, vecs = files.embeddings_file(home.data_dir, dataset, when, USERS, produced_at=datetime(2025, 1, when.month),
                                    salt=salt)
    import pyarrow.parquet as pq

    table = pq.read_table(agg).to_pandas().set_index("user_id")
    schema = dataset.replace("-", "_")
    return {f"{schema}__llm4es_embedding__vector": {u: vecs[i].tobytes() for i, u in enumerate(USERS)},
            f"{schema}__agg_features__n_events": {u: int(table.loc[u, "n_events"]) for u in USERS},
            f"{schema}__agg_features__span_days": {u: float(table.loc[u, "span_days"]) for u in USERS}}


def read(store, users=USERS, refs=REFS) -> dict[str, list]:
    """One online read: column -> values in `users` order (vectors as float32 bytes)."""
    got = store.get_online_features(features=refs, entity_rows=[{"user_id": u} for u in users],
                                    full_feature_names=True).to_dict()
    return {c: [None if v is None else np.asarray(v, dtype=np.float32).tobytes() if c.endswith("vector") else v
                for v in got[c]] for c in got if c != "user_id"}


def matches(values: dict[str, list], *allowed: dict[str, dict]) -> list[str]:
    """What in `values` is neither of the allowed states (a null counts as a mismatch)."""
    wrong = []
    for col, vals in values.items():
        for u, v in zip(USERS, vals):
            if v is None:
                wrong.append(f"{col}[{u}] is null")
            elif all(v != state[col][u] for state in allowed):
                wrong.append(f"{col}[{u}] = {v!r:.40} is neither the old nor the new value")
    return wrong


class Readers:
    """Threads reading online features until stopped; failures and wrong values are collected."""

    def __init__(self, home: Home, online_store: str, allowed: list[dict], n: int = 3, redis_url: str | None = None):
        self.home, self.online_store, self.allowed, self.redis_url = home, online_store, allowed, redis_url
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.wrong: list[str] = []
        self.reads = 0
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]

    def _loop(self) -> None:
        store = get_store(self.home, self.online_store, self.redis_url)
        while not self.stop.is_set():
            try:
                values = read(store)
            except Exception as e:  # noqa: BLE001 - every failure a reader would see is what we count
                self.errors.append(f"{type(e).__name__}: {e}"[:300])
                continue
            self.reads += 1
            self.wrong += matches(values, *self.allowed)[:3]
            time.sleep(0.005)  # a server between requests; leaves the publish in this process its share of the GIL

    def __enter__(self) -> "Readers":
        for t in self.threads:
            t.start()
        while self.reads < len(self.threads) and not self.errors:  # every reader is reading
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def _publish_under_readers(home: Home, config: PublishConfig, dataset: str = DATASET) -> None:
    old = snapshot(home, T1, dataset)
    publish(home, dataset, config)
    new = snapshot(home, T2, dataset)
    with Readers(home, config.online_store, [old, new], redis_url=config.redis_url) as readers:
        before = readers.reads
        publish(home, dataset, config)  # a new snapshot, older than the last materialization's end
        during = readers.reads - before
        time.sleep(0.3)
    assert readers.errors == [], readers.errors[:5]
    assert readers.wrong == [], readers.wrong[:5]
    assert during > 0 and readers.reads > 0
    assert matches(read(get_store(home, config.online_store, config.redis_url)), new) == []  # the new values serve


def test_sqlite_readers_see_no_failure_and_no_null_while_publishing(tmp_path):
    _publish_under_readers(Home.resolve(tmp_path / "home"), PublishConfig(materialize=True))


def _redis_or_skip() -> None:
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
    except redis.RedisError as e:
        pytest.skip(f"no Redis at {REDIS} ({e})")


def _forget_redis(home: Home) -> None:
    """Remove this home's rows from the shared Redis."""
    if (home.data_dir / "feast" / "registry.redis.db").exists():
        store = get_store(home, "redis")
        store.apply([], objects_to_delete=store.list_feature_views(), partial=False)


def test_redis_readers_see_no_failure_and_no_null_while_publishing(tmp_path):
    _redis_or_skip()
    home = Home.resolve(tmp_path / "home")
    try:
        _publish_under_readers(home, PublishConfig(online_store="redis", materialize=True))
    finally:
        _forget_redis(home)


def test_two_homes_on_one_redis_keep_their_own_values(tmp_path):
    """Same dataset name, same Redis: each home is its own Feast project, so neither overwrites the other."""
    _redis_or_skip()
    dataset = f"shared-{uuid.uuid4().hex[:8]}"
    homes = [Home.resolve(tmp_path / name / "home") for name in ("a", "b")]
    try:
        served = []
        for salt, home in enumerate(homes):
            served.append(snapshot(home, T1, dataset, salt=salt))
            publish(home, dataset, PublishConfig(online_store="redis", materialize=True))
        assert get_store(homes[0], "redis").project != get_store(homes[1], "redis").project
        schema = dataset.replace("-", "_")
        refs = [f"{schema}__llm4es_embedding:vector", f"{schema}__agg_features:n_events"]
        for home, values in zip(homes, served):
            got = read(get_store(home, "redis"), refs=refs)
            assert matches(got, values) == []
        assert served[0][f"{schema}__llm4es_embedding__vector"] != served[1][f"{schema}__llm4es_embedding__vector"]
    finally:
        for home in homes:
            _forget_redis(home)


def test_a_chosen_project_names_the_repo_and_the_store(tmp_path, monkeypatch):
    home = Home.resolve(tmp_path / "home")
    snapshot(home, T1)
    publish(home, DATASET, PublishConfig(project="team_a"))
    assert get_store(home).project == "team_a"
    monkeypatch.setenv("LLM4ES_FEAST_PROJECT", "team_b")
    publish(home, DATASET)
    assert get_store(home).project == "team_b"
    monkeypatch.delenv("LLM4ES_FEAST_PROJECT")
    publish(home, DATASET)  # no choice: the home keeps the project it has
    assert get_store(home).project == "team_b"
    from producers.publish import PublishError

    with pytest.raises(PublishError, match="Feast project 'a b'"):
        publish(home, DATASET, PublishConfig(project="a b"))


KILLED = """
import sys, time
from pathlib import Path
import producers.publish as p
from producers.stores.warehouse import Home

phase, marker, home, dataset = sys.argv[1:5]
def reached(name):
    if name == phase:
        Path(marker).write_text("here")
        time.sleep(600)
p._reached = reached
p.publish(Home.resolve(home), dataset, p.PublishConfig(materialize=True))
"""


def _publish_killed_at(home: Home, phase: str, tmp_path: Path) -> None:
    marker = tmp_path / f"{phase}.reached"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "FEAST_USAGE": "False"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, phase, str(marker), str(home.root), DATASET], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"publish ended before {phase}: {proc.stdout.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, f"publish never reached {phase}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow  # a fresh Python per kill: its Feast import takes most of the time
@pytest.mark.parametrize("phase", ["staging", "apply", "materialize"])
def test_a_publish_killed_at_each_phase_leaves_the_previous_state_serving(tmp_path, phase):
    home = Home.resolve(tmp_path / "home")
    old = snapshot(home, T1)
    publish(home, DATASET, PublishConfig(materialize=True))
    views = sorted(v.name for v in get_store(home).list_feature_views())
    new = snapshot(home, T2)

    _publish_killed_at(home, phase, tmp_path)

    store = get_store(home)
    assert sorted(v.name for v in store.list_feature_views()) == views  # the registry is whole
    after_kill = read(store)
    if phase == "materialize":  # killed after its first view: each value is the old or the new one, none null
        assert matches(after_kill, old, new) == []
        assert matches(after_kill, new) != [], "the kill came after the last view: nothing was left to do"
    else:
        assert matches(after_kill, old) == []
        left = [*(home.data_dir / "feast").rglob(".*.tmp"), *(home.data_dir / "feast").glob(".*.staging")]
        assert left, "the killed publish left no temp file: the kill came too late to test anything"

    messages: list[str] = []
    publish(home, DATASET, PublishConfig(materialize=True), log=messages.append)  # the next publish completes
    assert matches(read(get_store(home)), new) == []
    assert not [*(home.data_dir / "feast").rglob(".*.tmp"), *(home.data_dir / "feast").glob(".*.staging")]
    if phase != "materialize":
        assert any("left by a publish that did not finish" in m for m in messages)


def test_a_default_view_switching_to_a_set_with_fewer_users_serves_nothing_of_the_old_set(tmp_path):
    """`s__llm4es_embedding` moves to a newer set that lacks some users: they read null online, not the
    previous set's vectors (two models' vectors in one view would be silently wrong)."""
    home = Home.resolve(tmp_path / "home")
    files.embeddings_file(home.data_dir, DATASET, T1, USERS, produced_at=datetime(2025, 1, 1))
    publish(home, DATASET, PublishConfig(materialize=True))
    fewer = USERS[:5]
    _, newer = files.embeddings_file(home.data_dir, DATASET, T1, fewer, checkpoint="runs/live/r1/models/epoch-1",
                                     epoch=1, produced_at=datetime(2025, 1, 2))
    messages: list[str] = []
    publish(home, DATASET, PublishConfig(materialize=True), log=messages.append)
    got = read(get_store(home), refs=[f"{EMB}:vector"])[f"{EMB}__vector"]
    assert got[:5] == [v.tobytes() for v in newer]
    assert got[5:] == [None] * (len(USERS) - 5)
    assert any("clearing the online rows of 15 keys" in m for m in messages)


def test_a_registry_write_that_dies_leaves_the_previous_registry_whole(tmp_path, monkeypatch):
    """Every registry commit (apply, each step of a materialization, `feast` by hand) goes through
    `AtomicFileRegistryStore`: a write that dies before its rename leaves the old file as it was."""
    home = Home.resolve(tmp_path / "home")
    snapshot(home, T1)
    publish(home, DATASET, PublishConfig(materialize=True))
    registry = home.data_dir / "feast" / "registry.db"
    before = registry.read_bytes()

    import feature_repo.registry_store as registry_store

    def dies(*_):
        raise KeyboardInterrupt("killed between writing and renaming")

    monkeypatch.setattr(registry_store.os, "replace", dies)
    store = get_store(home)
    view = store.get_feature_view(EMB)
    view.description = "changed"
    with pytest.raises(KeyboardInterrupt):
        store.apply([view])
    assert registry.read_bytes() == before
    assert not list(registry.parent.glob(".registry.db.*.tmp"))
    monkeypatch.undo()
    assert sorted(v.name for v in get_store(home).list_feature_views()) == sorted([AGG, EMB])


def test_a_rebuilt_session_table_clears_the_online_rows_of_sessions_and_users_it_lost(tmp_path):
    home = Home.resolve(tmp_path / "home")
    labels = ["browse", "buy"]
    files.session_files(home.data_dir, DATASET, [("a-1", 1, T1), ("a-2", 1, T2), ("b-1", 2, T1)], labels)
    publish(home, DATASET, PublishConfig(materialize=True))
    emb, _ = files.session_files(home.data_dir, DATASET, [("a-1", 1, T1), ("a-2", 1, T2)], labels)  # b-1 is gone
    messages: list[str] = []
    publish(home, DATASET, PublishConfig(materialize=True), log=messages.append)
    store = get_store(home)
    sessions = store.get_online_features(features=[f"{SCHEMA}__session_embedding:embedding"],
                                         entity_rows=[{"session_id": s} for s in ("a-1", "b-1")],
                                         full_feature_names=True).to_dict()[f"{SCHEMA}__session_embedding__embedding"]
    assert np.array_equal(np.asarray(sessions[0], np.float32), emb[0]) and sessions[1] is None
    users = store.get_online_features(features=[f"{SCHEMA}__session_embedding_rollup:last_session_embedding"],
                                      entity_rows=[{"user_id": 1}, {"user_id": 2}], full_feature_names=True).to_dict()
    last = users[f"{SCHEMA}__session_embedding_rollup__last_session_embedding"]
    assert np.array_equal(np.asarray(last[0], np.float32), emb[1]) and last[1] is None
    assert any("no longer holds 1 keys" in m for m in messages)
    assert not list((home.data_dir / "feast").rglob("*.removed.parquet"))  # cleared, then forgotten
