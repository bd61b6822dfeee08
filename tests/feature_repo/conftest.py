"""A published home shared by a module: Feast's import and first apply take seconds, later calls less."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from producers.stores.warehouse import Home
from tests.feature_repo import files

os.environ.setdefault("FEAST_USAGE", "False")

DATASET = "ml-pub"
SCHEMA = "ml_pub"
T1 = datetime(1998, 1, 1)
USERS = [1, 2, 3, 4, 5, 6]
RUN = "runs/ml_pub/r1"


@dataclass
class Published:
    home: Home
    result: object
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # view name -> vectors in USERS order
    agg: Path | None = None


def write_all(home: Home) -> dict[str, np.ndarray]:
    """Aggregates, CoLES, and four LLM4ES sets: the base model (serialized and enriched texts) and two epochs
    of one fine-tuning run, epoch 2 produced last (so the default)."""
    out = {}
    files.agg_file(home.data_dir, DATASET, T1, USERS)
    _, out[f"{SCHEMA}__coles_embedding"] = files.coles_file(home.data_dir, DATASET, T1, USERS)
    _, out[f"{SCHEMA}__llm4es__base_smollm2_135m__serialized"] = files.embeddings_file(
        home.data_dir, DATASET, T1, USERS, produced_at=datetime(2025, 1, 1))
    _, out[f"{SCHEMA}__llm4es__base_smollm2_135m__enriched"] = files.embeddings_file(
        home.data_dir, DATASET, T1, USERS, text_kind="enriched", produced_at=datetime(2025, 1, 2))
    _, out[f"{SCHEMA}__llm4es__r1_epoch_1__serialized"] = files.embeddings_file(
        home.data_dir, DATASET, T1, USERS, checkpoint=f"{RUN}/models/epoch-1", epoch=1,
        produced_at=datetime(2025, 1, 3))
    _, out[f"{SCHEMA}__llm4es_embedding"] = files.embeddings_file(
        home.data_dir, DATASET, T1, USERS, checkpoint=f"{RUN}/models/epoch-2", epoch=2,
        produced_at=datetime(2025, 1, 4))
    return out


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Published:
    from producers.publish import publish

    home = Home.resolve(tmp_path_factory.mktemp("published") / "home")
    vectors = write_all(home)
    messages: list[str] = []
    result = publish(home, DATASET, log=messages.append)
    return Published(home, result, vectors, home.data_dir / SCHEMA / "agg_features.parquet")


def same_bits(a, b) -> bool:
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))
