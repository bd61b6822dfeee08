"""Session-keyed views and their user rollups: point in time by session end, recomputed by hand, served online."""
from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from producers.publish import PublishConfig, PublishError, historical_features, materialize, online_features, publish
from producers.stores.warehouse import Home
from tests.feature_repo import files
from tests.feature_repo.conftest import same_bits

DATASET = "clicks-pub"
SCHEMA = "clicks_pub"
LABELS = ["mortgage shopping", "account servicing", "help"]
T0 = datetime(2024, 3, 1)
# user 1: four sessions a day apart; user 2: one session; user 3: two sessions ending at the same instant
SESSIONS = [(f"u1-{k}", 1, T0 + timedelta(days=k)) for k in range(4)] + [("u2-0", 2, T0 + timedelta(hours=5))] + \
           [("u3-a", 3, T0 + timedelta(days=1)), ("u3-b", 3, T0 + timedelta(days=1))]
K = 2


@pytest.fixture(scope="module")
def sessions_published(tmp_path_factory):
    home = Home.resolve(tmp_path_factory.mktemp("sessions") / "home")
    emb, intents = files.session_files(home.data_dir, DATASET, SESSIONS, LABELS)
    result = publish(home, DATASET, PublishConfig(recent_sessions=K))
    return home, result, emb, intents


def test_views_and_their_declarations(sessions_published):
    home, result, emb, _ = sessions_published
    views = {v.name: v for v in result.views}
    assert set(views) == {f"{SCHEMA}__{n}" for n in ("session_embedding", "session_intent",
                                                      "session_embedding_rollup", "intent_shares")}
    assert views[f"{SCHEMA}__session_embedding"].join_key == "session_id"
    assert views[f"{SCHEMA}__session_embedding_rollup"].join_key == "user_id"
    assert views[f"{SCHEMA}__intent_shares"].features == ("share__mortgage_shopping", "share__account_servicing",
                                                          "share__help", "recent_sessions")
    assert result.skipped == ["agg", "coles", "llm4es"]


def test_rollups_are_point_in_time_by_session_end(sessions_published):
    home, _, emb, intents = sessions_published
    at = T0 + timedelta(days=2, hours=1)  # user 1 has ended sessions 0, 1, 2
    frame = pd.DataFrame({"user_id": [1, 1, 2, 3], "event_timestamp": [at, T0 - timedelta(days=1), at, at]})
    out = historical_features(home, DATASET, ["session_embedding_rollup", "intent_shares"], frame)
    last = out[f"{SCHEMA}__session_embedding_rollup__last_session_embedding"]
    mean = out[f"{SCHEMA}__session_embedding_rollup__recent_mean_embedding"]
    assert same_bits(last[0], emb[2])
    assert np.allclose(mean[0], emb[1:3].mean(axis=0), atol=1e-6)  # the last K=2 sessions
    assert last[1] is None  # before any session ended
    assert same_bits(last[2], emb[4])
    assert out[f"{SCHEMA}__session_embedding_rollup__sessions_so_far"][0] == 3
    assert same_bits(last[3], emb[6])  # same end time: the later of the two by id
    shares = out[[f"{SCHEMA}__intent_shares__share__{s}" for s in ("mortgage_shopping", "account_servicing", "help")]]
    expected = [np.mean([intents[i] == lbl for i in (1, 2)]) for lbl in LABELS]
    assert np.allclose(shares.iloc[0].to_numpy(dtype=float), expected)
    assert out[f"{SCHEMA}__intent_shares__recent_sessions"][0] == K


def test_session_keyed_views_read_by_session_id(sessions_published):
    home, _, emb, intents = sessions_published
    frame = pd.DataFrame({"session_id": ["u1-3", "u2-0"], "event_timestamp": [T0 + timedelta(days=9)] * 2})
    out = historical_features(home, DATASET, ["session_embedding", "session_intent"], frame)
    assert same_bits(out[f"{SCHEMA}__session_embedding__embedding"][0], emb[3])
    assert out[f"{SCHEMA}__session_intent__intent"].tolist() == [intents[3], intents[4]]
    assert out[f"{SCHEMA}__session_intent__user_id"].tolist() == [1, 2]
    assert abs(float(np.sum(out[f"{SCHEMA}__session_intent__intent_probabilities"][0])) - 1) < 1e-5
    with pytest.raises(PublishError, match="keyed by user and by session"):
        historical_features(home, DATASET, ["session_embedding", "intent_shares"], frame)


def test_materialized_views_read_back_online(sessions_published):
    home, _, emb, intents = sessions_published
    materialize(home)
    sessions = online_features(home, DATASET, ["session_embedding", "session_intent"], ["u1-1", "nope"])
    assert same_bits(sessions[f"{SCHEMA}__session_embedding__embedding"][0], emb[1])
    assert sessions[f"{SCHEMA}__session_intent__intent"][0] == intents[1]
    assert sessions[f"{SCHEMA}__session_embedding__embedding"][1] is None
    users = online_features(home, DATASET, ["session_embedding_rollup", "intent_shares"], [1])
    assert same_bits(users[f"{SCHEMA}__session_embedding_rollup__last_session_embedding"][0], emb[3])
    expected = np.mean([intents[i] == LABELS[0] for i in (2, 3)])
    assert users[f"{SCHEMA}__intent_shares__share__mortgage_shopping"][0] == pytest.approx(expected)
