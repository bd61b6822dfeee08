"""A new feature kind needs its producer and one `register` call: publish, the manifest, the Feast
declarations and serving take it without a change."""
from __future__ import annotations

from datetime import datetime

import numpy as np
import pyarrow as pa
import pytest

from producers.publish import PublishConfig, online_features, publish, published_views
from producers.stores import outputs
from producers.stores.outputs import FeatureOutput, read_provenance, write_parquet
from producers.stores.warehouse import Home, float32_lists

DATASET = "toy-shop"
SCHEMA = "toy_shop"
TOY = FeatureOutput(kind="toy", table="toy_scores", entity="user", key="user_id", timestamp="feature_timestamp",
                    file="toy_scores.parquet", scalars=(("score", "DOUBLE"), ("visits", "BIGINT")), vectors=("taste",),
                    label="toy scores of {dataset} users", description="toy scores (toy_scores.parquet)",
                    produced_by="llm4es toy")


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(outputs.OUTPUTS, TOY.kind, TOY)  # removed again after the test
    return TOY


def _produce(home: Home, users: list[int], as_of: datetime) -> tuple[np.ndarray, np.ndarray]:
    """The toy producer: its rows through the one Parquet write path, with provenance."""
    rng = np.random.default_rng(7)
    scores, taste = rng.normal(size=len(users)), rng.normal(size=(len(users), 3)).astype(np.float32)
    rows = pa.table({"user_id": pa.array(users, pa.int64()),
                     "feature_timestamp": pa.array([as_of] * len(users), pa.timestamp("us")),
                     "score": pa.array(scores), "visits": pa.array(range(len(users)), pa.int64()),
                     "taste": float32_lists(taste)})
    write_parquet(rows, TOY.parquet_path(home, SCHEMA), {"output": TOY.table, "source_hash": "toy-src",
                                                         "code_version": "test", "produced_at": "2025-01-01T00:00:00"})
    return scores, taste


def test_a_registered_toy_output_is_published_and_served_online(tmp_path, toy_registered):
    home = Home.resolve(tmp_path / "home")
    users = [10, 11, 12, 13]
    scores, taste = _produce(home, users, datetime(2020, 5, 1))
    assert read_provenance(TOY.parquet_path(home, SCHEMA))["source_hash"] == "toy-src"

    result = publish(home, DATASET, PublishConfig(materialize=True))
    assert result.skipped == ["agg", "coles", "llm4es", "sessions", "intents"]
    (view,) = published_views(home, DATASET)
    assert (view.name, view.kind, view.features, view.vector_features) == (
        f"{SCHEMA}__toy_scores", "toy", ("score", "visits", "taste"), ("taste",))

    online = online_features(home, DATASET, ["toy_scores"], [12, 10, 99])
    assert online["user_id"].tolist() == [12, 10, 99]
    assert online[f"{SCHEMA}__toy_scores__score"].tolist()[:2] == [scores[2], scores[0]]
    assert online[f"{SCHEMA}__toy_scores__visits"].tolist()[:2] == [2, 0]
    served = online[f"{SCHEMA}__toy_scores__taste"].tolist()
    assert np.array_equal(served[0], taste[2]) and np.array_equal(served[1], taste[0]) and served[2] is None


def test_without_registration_the_file_is_not_published(tmp_path):
    home = Home.resolve(tmp_path / "home")
    _produce(home, [1, 2], datetime(2020, 5, 1))
    from producers.publish import PublishError

    with pytest.raises(PublishError, match="nothing to publish"):
        publish(home, DATASET)
