"""Embedding every session with a trained encoder: `"<schema>".session_embeddings` and its Parquet copy.

- `session_embeddings`: session_id, user_id (the dataset's user type), session_end TIMESTAMP
  (= sessions.end_time, the point-in-time key), embedding FLOAT[] (d_model numbers: the masked
  mean of the encoder's outputs, not normalised); built as a staging table and swapped in;
- `data/<schema>/session_embeddings.parquet`: the same rows, written to a temp file and renamed,
  with the provenance (run, checkpoint, epoch, config, data version, code version) as JSON under
  the Parquet key-value metadata key `llm4es`.

The run is the one `train_encoder` made for the same config and data (same run key); there is
no training here. `embed_some` (a refresh) embeds only the given sessions with a given checkpoint (the
served encoder, whatever the data now is: values coded with the vocabulary it was trained on) and keeps
every other stored row whose session still exists; it refuses a checkpoint other than the one the stored
rows came from (two encoders' vectors in one table would be silently wrong). It changes the table in place
(`producers.stores.outputs.change_in_place`: the given sessions' rows and the refreshed users' rows of
sessions that are gone, in one transaction; no other row is rewritten) and leaves the Parquet copy behind
the table (written again from it before a full publish reads it); the refreshed users' sessions, all of
them, go to the refresh's own file (`snapshot`).

Inference is in eval mode (no dropout), sessions in batches sorted by length; a session's vector
does not depend on the batch it is in (padding is masked out).
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from producers.shared.devices import pick_device
from producers.stores.provenance import code_version
from producers.sessions import features as F
from producers.sessions.config import SessionEmbedResult, SessionEncoderConfig, SessionsError
from producers.stores.outputs import (
    SESSION_EMBEDDINGS,
    current_provenance,
    read_provenance,
    replace_sessions_in_place,
    write_output,
)
from producers.stores.warehouse import Home, float32_lists

TABLE = SESSION_EMBEDDINGS.table
__all__ = ["TABLE", "embed_sessions", "embed_some", "infer", "read_provenance"]
Log = Callable[[str], None]


def embed_sessions(home: Home, dataset: str, config: SessionEncoderConfig = SessionEncoderConfig(),
                   log: Log = lambda _: None, batch_size: int = 256) -> SessionEmbedResult:
    """Embed every session with the finished run of this config and data; write the table and the Parquet copy."""
    config.check()
    from producers.sessions import train as T

    with T.torch_threads(config.threads):
        return _embed(home, dataset, config, log, batch_size)


def _embed(home: Home, dataset: str, config: SessionEncoderConfig, log: Log, batch_size: int) -> SessionEmbedResult:
    started = time.perf_counter()
    import torch

    from producers.sessions import train as T

    p = T.prepare(home, dataset, config, log)
    path = p.run_dir / f"epoch-{config.epochs}.pt"
    if not path.is_file():
        have = sorted(T.checkpoints(p.run_dir)) if p.run_dir.is_dir() else []
        raise SessionsError(
            f"no trained session encoder for {p.dataset} with this config and its current sessions "
            f"(run {p.run_key}, epoch {config.epochs}"
            f"{f'; that run has epochs {have}' if have else ''}): "
            f"run `llm4es sessions train {p.dataset}` first")
    state = T.load_checkpoint(path)
    vocab = F.Vocab.from_dict(state["vocab"])
    data = p.data if vocab.as_dict() == p.vocab.as_dict() else _reencode(home, p, config, vocab)
    device = pick_device(config.device, SessionsError)
    model = T.build_model(vocab, config)
    model.load_state_dict(state["model"])
    model.to(device)
    vectors = infer(model, data, config, device, batch_size)
    produced_at = datetime.now(timezone.utc).replace(tzinfo=None)
    checkpoint = home.relative(path)
    provenance = {
        "output": TABLE, "dataset": p.dataset, "table": f"{p.schema}.{TABLE}", "model": "session-transformer",
        "run_key": p.run_key, "run_dir": home.relative(p.run_dir), "checkpoint": checkpoint, "epoch": config.epochs,
        "losses": state.get("losses"), "config": config.as_dict(), "data": p.data_version, "vocab": state["vocab"],
        "dim": int(vectors.shape[1]), "device": str(device), "produced_at": produced_at.isoformat(),
        "torch_version": torch.__version__, "code_version": code_version(),
        "vector": "masked mean of the Transformer outputs over the session's kept events (not normalised)",
    }
    parquet = _write(home, p.schema, p.user_type, data, vectors, provenance, log)
    seconds = time.perf_counter() - started
    log(f"{data.n:,} session vectors of {vectors.shape[1]} -> {p.schema}.{TABLE}, {home.relative(parquet)} "
        f"({seconds:.1f}s)")
    return SessionEmbedResult(dataset=p.dataset, table=f"{p.schema}.{TABLE}", parquet_path=parquet, n_sessions=data.n,
                              dim=int(vectors.shape[1]), run_dir=p.run_dir, checkpoint=checkpoint,
                              epoch=config.epochs, seconds=seconds, provenance=provenance)


def embed_some(home: Home, dataset: str, checkpoint: Path, sessions: list[str] | None, log: Log = lambda _: None,
               also: list[str] | tuple = (), device: str = "auto", threads: int | None = 1,
               batch_size: int = 256, users: list | None = None, snapshot: Path | None = None) -> SessionEmbedResult:
    """Embed `sessions` (None: every session) with the encoder saved at `checkpoint` and store them: their rows
    are replaced or added, every other stored row is kept while its session exists. `also`: sessions embedded
    but not stored (their vectors in `result.unstored`, e.g. a refresh's unchanged canaries).

    Some sessions: changed in place. `users` (a refresh's users; None: every user) bounds the rows whose
    session is looked up (a gone session's row is dropped); `snapshot`: where every current session row of
    `users` goes (`result.parquet_path`; None without one)."""
    from producers.sessions import train as T

    if snapshot is not None and (sessions is None or users is None):
        raise ValueError("a snapshot file is written for some users' sessions: pass `users` and `sessions`")
    with T.torch_threads(threads):
        return _embed_some(home, dataset, Path(checkpoint), sessions, log, list(also), device, batch_size, users,
                           snapshot)


def _embed_some(home: Home, dataset: str, checkpoint: Path, sessions: list[str] | None, log: Log, also: list[str],
                device_name: str, batch_size: int, users: list | None, snapshot: Path | None) -> SessionEmbedResult:
    started = time.perf_counter()
    import dataclasses

    import pyarrow as pa
    import torch

    from producers.sessions import train as T
    from producers.stores.warehouse import last_ingest, stored_definition

    if not checkpoint.is_file():
        raise SessionsError(f"the session encoder {checkpoint} is gone: train it again (`llm4es sessions train`)")
    state = T.load_checkpoint(checkpoint)
    names = {f.name for f in dataclasses.fields(SessionEncoderConfig)}
    config = SessionEncoderConfig(**{k: v for k, v in state["config"].items() if k in names})
    vocab = F.Vocab.from_dict(state["vocab"])
    rel = home.relative(checkpoint)
    con = home.connect(read_only=True)
    try:
        d = stored_definition(con, dataset)
        previous = current_provenance(con, home, SESSION_EMBEDDINGS, d.schema)
        if sessions is not None and previous.get("checkpoint") != rel:
            raise SessionsError(
                f"{d.name}: the stored session embeddings are of the encoder {previous.get('checkpoint')}; embedding "
                f"some sessions with {rel} would put two encoders' vectors in one table: embed every session with it")
        wanted = None if sessions is None else sorted(set(sessions) | set(also))
        data = F.encode(F.read_raw(con, d, config, wanted), vocab) if wanted != [] else None
        ingest = last_ingest(con, d.schema) or {}
    finally:
        con.close()
    device = pick_device(device_name, SessionsError)
    dim = config.d_model
    vectors = np.zeros((0, dim), dtype=np.float32)
    if data is not None:
        model = T.build_model(vocab, config)
        model.load_state_dict(state["model"])
        model.to(device)
        vectors = infer(model, data, config, device, batch_size)
    ids = [] if data is None else data.session_ids
    store = set(ids) if sessions is None else set(sessions)
    keep = [i for i, s in enumerate(ids) if s in store]
    rest = [i for i, s in enumerate(ids) if s not in store]
    unstored = pa.table({"session_id": pa.array([ids[i] for i in rest], pa.string()),
                         "embedding": float32_lists(vectors[rest])})
    produced_at = datetime.now(timezone.utc).replace(tzinfo=None)
    provenance = {
        "output": TABLE, "dataset": d.name, "table": f"{d.schema}.{TABLE}", "model": "session-transformer",
        "run_key": state.get("run_key"), "run_dir": home.relative(checkpoint.parent), "checkpoint": rel,
        "epoch": state.get("epoch"), "losses": state.get("losses"), "config": state["config"],
        "data": previous.get("data") if sessions is not None else state.get("data_version"), "vocab": state["vocab"],
        "dim": dim, "device": str(device), "produced_at": produced_at.isoformat(), "torch_version": torch.__version__,
        "code_version": code_version(), "source_hash": ingest.get("source_hash"),
        "vector": "masked mean of the Transformer outputs over the session's kept events (not normalised)",
        "refresh": {"sessions_embedded": len(keep), "every_session": sessions is None,
                    "ingest_id": ingest.get("ingest_id"), "at": produced_at.isoformat()},
    }
    new = pa.table({"session_id": pa.array([ids[i] for i in keep], pa.string()),
                    "user_id": pa.array([data.user_ids[i] for i in keep] if data else []),
                    "session_end": pa.array([data.ends[i] for i in keep] if data else [], pa.timestamp("us")),
                    "embedding": float32_lists(vectors[keep])})
    select = f"""SELECT CAST(session_id AS VARCHAR) AS session_id, CAST(user_id AS {d.events.user_dtype}) AS user_id,
                        CAST(session_end AS TIMESTAMP) AS session_end, CAST(embedding AS FLOAT[]) AS embedding
                 FROM new_rows"""
    if sessions is not None:
        parquet = _store_some(home, d, new, select, provenance, sessions, users, snapshot, log)
    else:
        parquet = write_output(home, SESSION_EMBEDDINGS, d.schema, new, select + " ORDER BY session_id", provenance,
                               log=log)
    seconds = time.perf_counter() - started
    log(f"{len(keep):,} session vectors of {dim} with {rel} -> {d.schema}.{TABLE}"
        f"{' (every other stored session kept)' if sessions is not None else ''} ({seconds:.1f}s)")
    return SessionEmbedResult(dataset=d.name, table=f"{d.schema}.{TABLE}", parquet_path=parquet, n_sessions=len(keep),
                              dim=dim, run_dir=checkpoint.parent, checkpoint=rel, epoch=int(state.get("epoch") or 0),
                              seconds=seconds, provenance=provenance, unstored=unstored)


def _store_some(home: Home, d: Any, new: Any, select: str, provenance: dict, sessions: list[str],
                users: list | None, snapshot: Path | None, log: Log) -> Path | None:
    """The embedded sessions' rows replaced or added in place, the users' rows of gone sessions dropped
    (`replace_sessions_in_place`); every current row of `users` to `snapshot`."""
    con = home.connect()
    try:
        _check_kept(con, d, sessions, users)
        con.register("new_rows", new)
        try:
            con.execute(f"CREATE OR REPLACE TEMP TABLE embedded AS {select}")
        finally:
            con.unregister("new_rows")
        n_new = replace_sessions_in_place(con, home, SESSION_EMBEDDINGS, d.schema, "embedded", f'"{d.schema}".sessions',
                                          users, snapshot, provenance)
        con.execute("DROP TABLE embedded")
    finally:
        con.close()
    log(f"{n_new:,} session rows replaced or added in place in {d.schema}.{TABLE}"
        f"{f'; every session of the {len(users or []):,} users to {snapshot}' if snapshot else ''}")
    return snapshot


def _check_kept(con: Any, d: Any, sessions: list[str], users: list | None = None) -> None:
    """A kept row whose session now ends at another time was not embedded again though it changed: refuse.
    Only `users`' rows are looked at (None: every row): no other user's sessions were cut again."""
    who, params = ("TRUE", {}) if users is None else ("m.user_id IN (SELECT unnest($users))", {"users": list(users)})
    stale = con.execute(f"""SELECT m.session_id FROM "{d.schema}".{TABLE} m JOIN "{d.schema}".sessions s
        USING (session_id) WHERE {who} AND m.session_end <> s.end_time
        AND m.session_id NOT IN (SELECT unnest($ids)) ORDER BY 1 LIMIT 5""",
                        {"ids": list(sessions), **params}).fetchall()
    if stale:
        raise SessionsError(f"{d.name}: stored session vectors of sessions that changed since are not among those "
                            f"to embed (e.g. {', '.join(r[0] for r in stale)}): embed them too")


def infer(model: Any, data: F.Sessions, config: SessionEncoderConfig, device: Any, batch_size: int = 256,
          order: np.ndarray | None = None) -> np.ndarray:
    """One vector per session (in data order); batches follow `order` (default: by length, to spare padding)."""
    import torch

    from producers.sessions.model import to_device

    model.eval()
    lengths = np.diff(data.offsets)
    order = np.argsort(-lengths, kind="stable") if order is None else order
    out = np.zeros((data.n, model.position.embedding_dim), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, data.n, batch_size):
            rows = order[start:start + batch_size]
            batch = to_device(F.collate(data, [data.events(i) for i in rows], config.max_events), device)
            out[rows] = model.embed(batch).float().cpu().numpy()
    return out


def _reencode(home: Home, p: Any, config: SessionEncoderConfig, vocab: F.Vocab) -> F.Sessions:
    from producers.stores.warehouse import stored_definition

    con = home.connect(read_only=True)
    try:
        return F.load(con, stored_definition(con, p.dataset), config, vocab)[0]
    finally:
        con.close()


def _write(home: Home, schema: str, user_type: str, data: F.Sessions, vectors: np.ndarray, provenance: dict,
           log: Log) -> Path:
    """The vectors through the one write path (`producers.stores.outputs.write_output`)."""
    import pyarrow as pa

    arrow = pa.table({"session_id": pa.array(data.session_ids, pa.string()), "user_id": pa.array(data.user_ids),
                      "session_end": pa.array(data.ends, pa.timestamp("us")), "embedding": float32_lists(vectors)})
    return write_output(home, SESSION_EMBEDDINGS, schema, arrow, f"""
            SELECT CAST(session_id AS VARCHAR) AS session_id, CAST(user_id AS {user_type}) AS user_id,
                   CAST(session_end AS TIMESTAMP) AS session_end, CAST(embedding AS FLOAT[]) AS embedding
            FROM new_rows ORDER BY session_id""", provenance, log=log)
