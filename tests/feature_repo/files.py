"""Synthetic feature files in the shapes `llm4es aggregate`, `llm4es embed` and `llm4es coles` write.

Deterministic (seeded by what they describe), so two test runs write the same values.
"""
from __future__ import annotations

import json
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from producers.datasets.definition import schema_name


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(json.dumps(parts, default=str).encode()))


def _write(path: Path, table: pa.Table, provenance: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(table.schema.metadata or {})
    meta[b"llm4es"] = json.dumps(provenance, default=str).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)
    return path


def _ids(users: list, string_ids: bool) -> pa.Array:
    return pa.array([f"u{u:03d}" for u in users] if string_ids else users,
                    type=pa.string() if string_ids else pa.int64())


def agg_file(data_dir: Path, dataset: str, as_of: datetime, users: list[int], string_ids: bool = False,
             produced_at: datetime | None = None, extra_column: str | None = None) -> Path:
    """`data/<schema>/agg_features.parquet`: user_id, feature_timestamp, then BIGINT/DOUBLE features (some NULL)."""
    rng = _rng("agg", dataset, as_of, users)
    n = len(users)
    std = rng.normal(size=n)
    std[0] = np.nan  # a user with one value: NULL std
    cols = {
        "user_id": _ids(users, string_ids),
        "feature_timestamp": pa.array([as_of] * n, type=pa.timestamp("us")),
        "n_events": pa.array(rng.integers(1, 100, size=n), type=pa.int64()),
        "span_days": pa.array(rng.uniform(0, 200, size=n), type=pa.float64()),
        "rating_std": pa.array(std, type=pa.float64(), from_pandas=True),
    }
    if extra_column:
        cols[extra_column] = pa.array(rng.integers(0, 5, size=n), type=pa.int64())
    provenance = {"output": "agg_features", "dataset": dataset, "as_of": as_of.isoformat(), "source_hash": "src-agg",
                  "code_version": "0.1.0+gtest", "produced_at": (produced_at or datetime(2025, 1, 1)).isoformat()}
    return _write(data_dir / schema_name(dataset) / "agg_features.parquet", pa.table(cols), provenance)


def vectors(kind: str, dataset: str, key: tuple, as_of: datetime, users: list, dim: int) -> np.ndarray:
    """The float32 vectors a fixture file holds (the values a test expects back)."""
    return _rng(kind, dataset, key, as_of, users).normal(size=(len(users), dim)).astype(np.float32)


def _vector_table(users, vecs: np.ndarray, string_ids: bool, columns: dict) -> pa.Table:
    n, dim = vecs.shape
    vector = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32)),
                                      pa.array(vecs.reshape(-1), type=pa.float32()))
    table = {"user_id": _ids(users, string_ids), "vector": vector, "dim": pa.array([dim] * n, type=pa.int32())}
    for name, (value, typ) in columns.items():
        table[name] = pa.array([value] * n, type=typ)
    return pa.table(table)


def embeddings_file(data_dir: Path, dataset: str, as_of: datetime, users: list[int], dim: int = 8,
                    model: str = "smollm2-135m", checkpoint: str = "base", epoch: int | None = None,
                    text_kind: str = "serialized", layers: str = "9:31", produced_at: datetime | None = None,
                    string_ids: bool = False, salt: int = 0) -> tuple[Path, np.ndarray]:
    """One LLM4ES set in `data/<schema>/embeddings/`; returns the file and its vectors (rows in `users` order).
    `salt` gives other values for the same set and time (a set embedded again)."""
    key = (model, checkpoint, layers, text_kind)
    vecs = vectors("llm4es", dataset, (*key, salt) if salt else key, as_of, users, dim)
    produced_at = produced_at or datetime(2025, 1, 1)
    table = _vector_table(users, vecs, string_ids, {
        "model": (model, pa.string()), "checkpoint": (checkpoint, pa.string()), "epoch": (epoch, pa.int32()),
        "layers": (layers, pa.string()), "text_kind": (text_kind, pa.string()),
        "feature_timestamp": (as_of, pa.timestamp("us")), "produced_at": (produced_at, pa.timestamp("us")),
        "source_hash": ("src-texts", pa.string()), "code_version": ("0.1.0+gtest", pa.string())})
    name = f"{model}__{checkpoint.replace('/', '_')}__L{layers.replace(':', '-')}__{text_kind}.parquet"
    path = data_dir / schema_name(dataset) / "embeddings" / name
    return _write(path, table, {"model": model, "checkpoint": checkpoint, "epoch": epoch, "layers": layers,
                                "text_kind": text_kind, "texts_digest": "digest"}), vecs


def coles_file(data_dir: Path, dataset: str, as_of: datetime, users: list[int], dim: int = 6,
               model: str = "coles-gru", checkpoint: str = "runs/coles/model.pt",
               produced_at: datetime | None = None) -> tuple[Path, np.ndarray]:
    key = (model, checkpoint)
    vecs = vectors("coles", dataset, key, as_of, users, dim)
    table = _vector_table(users, vecs, False, {
        "model": (model, pa.string()), "checkpoint": (checkpoint, pa.string()), "epoch": (None, pa.int32()),
        "feature_timestamp": (as_of, pa.timestamp("us")),
        "produced_at": (produced_at or datetime(2025, 1, 1), pa.timestamp("us")),
        "source_hash": ("src-events", pa.string()), "code_version": ("0.1.0+gtest", pa.string())})
    return _write(data_dir / schema_name(dataset) / "coles_embeddings.parquet", table, {"model": model}), vecs


def session_files(data_dir: Path, dataset: str, sessions: list[tuple[str, int, datetime]], labels: list[str],
                  dim: int = 4, produced_at: datetime | None = None) -> tuple[np.ndarray, list[str]]:
    """`session_embeddings.parquet` and `session_intents.parquet` as `llm4es sessions embed` and
    `llm4es intents distill` write them, for (session_id, user_id, session_end) rows; returns the
    embeddings (rows in `sessions` order) and each session's intent."""
    rng = _rng("sessions", dataset, sessions)
    n = len(sessions)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    probs = rng.dirichlet(np.ones(len(labels)), size=n).astype(np.float32)
    intents = [labels[i] for i in probs.argmax(axis=1)]
    produced = (produced_at or datetime(2025, 1, 1)).isoformat()
    base = {"session_id": pa.array([s for s, _, _ in sessions]),
            "user_id": pa.array([u for _, u, _ in sessions], pa.int64()),
            "session_end": pa.array([t for _, _, t in sessions], pa.timestamp("us"))}
    folder = data_dir / schema_name(dataset)
    _write(folder / "session_embeddings.parquet",
           pa.table({**base, "embedding": pa.array(list(emb), pa.list_(pa.float32()))}),
           {"model": "session-encoder", "run_dir": "runs/x/sessions/r1", "epoch": 3, "produced_at": produced,
            "code_version": "0.1.0+gtest"})
    _write(folder / "session_intents.parquet",
           pa.table({**base, "taxonomy_version": pa.array([1] * n, pa.int32()), "label": pa.array(intents),
                     "probabilities": pa.array(list(probs), pa.list_(pa.float32()))}),
           {"labels": labels, "llm_model": "fake-llm", "classifier": "logistic_regression", "produced_at": produced,
            "code_version": "0.1.0+gtest"})
    return emb, intents
