"""The session encoder: tiny runs on a themed clickstream, exact resume, reuse, batch-invariant vectors."""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from producers.datasets.definition import parse_definition
from producers.ingest import IngestConfig, ingest
from producers.sessions import (SessionEncoderConfig, SessionsConfig, SessionsError, build_sessions,
                                embed_sessions, train_encoder)
from producers.sessions.embed import infer, read_provenance
from producers.stores.warehouse import Home, last_ingest
from tests.fixtures.clicks_files import CLICKS_YAML, write_clicks

TINY = SessionEncoderConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.1, max_events=8, max_categories=50,
                            text_buckets=64, max_tokens=4, epochs=2, batch_size=16, lr=3e-3, seed=3,
                            device="cpu", threads=1, progress=False, force=True)


@pytest.fixture(scope="module")
def clicks(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder")
    folder = write_clicks(root / "clicks", visitors=20, visits=4)
    home = Home.resolve(root / "home")
    ingest(home, parse_definition(CLICKS_YAML, "clicks.yaml"), IngestConfig(source=folder))
    build_sessions(home, "clicks", SessionsConfig(force=True))
    return home


def weights(run_dir, epoch):
    import torch

    return torch.load(run_dir / f"epoch-{epoch}.pt", map_location="cpu", weights_only=False)["model"]


def test_features_from_the_session_events(clicks):
    from producers.sessions import features as F
    from producers.stores.warehouse import stored_definition

    con = clicks.connect(read_only=True)
    try:
        d = stored_definition(con, "clicks")
        data, vocab = F.load(con, d, TINY)
        n_events = con.execute("SELECT n_events FROM clicks.sessions ORDER BY session_id").fetchall()
        longest = int(np.argmax(data.n_events))
        pages = [p for (p,) in con.execute("SELECT page FROM clicks.session_events WHERE session_id = ? "
                                           "ORDER BY position", [data.session_ids[longest]]).fetchall()]
    finally:
        con.close()
    assert list(vocab.categorical) == ["page"] and list(vocab.numeric) == ["price"] and vocab.text == ["query"]
    assert vocab.skipped == ["visit (the session column)"] and len(vocab.categorical["page"]) == 9
    assert data.n == 80 and [n for (n,) in n_events] == data.n_events.tolist()
    assert (np.diff(data.offsets) == np.minimum(data.n_events, 8)).all() and (data.n_events > 8).any()
    codes = {v: i + 2 for i, v in enumerate(vocab.categorical["page"])}
    assert len(pages) > 8 and data.cat[data.events(longest), 0].tolist() == [codes[p] for p in pages[-8:]]  # the last 8
    assert data.cat[:-1].min() >= 2  # every page is in the vocabulary; 0 is padding only
    assert set(np.unique(data.num[:-1, 1])) == {0.0, 1.0}  # missing prices are flagged
    assert data.txt[:-1].max() <= 64 and (data.txt[:-1] > 0).any() and not data.txt[-1].any()


def test_training_lowers_the_loss_and_a_finished_run_is_reused(clicks):
    config = replace(TINY, epochs=6)
    result = train_encoder(clicks, "clicks", config)
    assert result.epochs_trained == 6 and len(result.losses) == 6 and result.resumed_from is None
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    assert (result.run_dir / "done.json").is_file() and result.sessions_per_second > 0
    assert result.run_dir.parent.name == "sessions" and result.run_dir.parts[-3] == "clicks"
    again = train_encoder(clicks, "clicks", config)
    assert (again.epochs_trained, again.losses, again.run_key) == (0, result.losses, result.run_key)


def test_a_killed_run_resumes_to_the_same_weights(clicks, monkeypatch):
    import torch

    from producers.sessions import train as T

    config = replace(TINY, epochs=3, seed=11)
    straight = train_encoder(clicks, "clicks", config)
    want = weights(straight.run_dir, 3)
    shutil.rmtree(straight.run_dir)
    real = T.run_epoch

    def killed(model, optimizer, data, cfg, epoch, device):
        if epoch == 2:
            raise KeyboardInterrupt("killed")
        return real(model, optimizer, data, cfg, epoch, device)

    monkeypatch.setattr(T, "run_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        train_encoder(clicks, "clicks", config)
    monkeypatch.undo()
    assert sorted(p.name for p in straight.run_dir.glob("epoch-*.pt")) == ["epoch-1.pt", "epoch-2.pt"]
    assert not (straight.run_dir / "done.json").exists()
    resumed = train_encoder(clicks, "clicks", config)
    assert (resumed.resumed_from, resumed.epochs_trained, resumed.run_key) == (2, 1, straight.run_key)
    assert resumed.losses == straight.losses
    got = weights(resumed.run_dir, 3)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_embedding_without_a_trained_run_says_what_to_do(clicks):
    with pytest.raises(SessionsError, match=r"run `llm4es sessions train clicks`"):
        embed_sessions(clicks, "clicks", replace(TINY, seed=99))


def test_embeddings_are_deterministic_batch_invariant_and_carry_provenance(clicks):
    from producers.sessions import features as F
    from producers.sessions import train as T

    train_encoder(clicks, "clicks", TINY)
    first = embed_sessions(clicks, "clicks", TINY)
    table = pq.read_table(first.parquet_path)
    assert table.column_names == ["session_id", "user_id", "session_end", "embedding"] and table.num_rows == 80
    con = clicks.connect(read_only=True)
    try:
        stored = con.execute("SELECT session_id, user_id, session_end, embedding FROM clicks.session_embeddings "
                             "ORDER BY session_id").fetchall()
        sessions = con.execute("SELECT session_id, user_id, end_time FROM clicks.sessions "
                               "ORDER BY session_id").fetchall()
        types = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns "
                                 "WHERE table_name = 'session_embeddings'").fetchall())
        source_hash = last_ingest(con, "clicks")["source_hash"]
    finally:
        con.close()
    assert [r[:3] for r in stored] == sessions and all(len(r[3]) == 16 for r in stored)
    assert types == {"session_id": "VARCHAR", "user_id": "BIGINT", "session_end": "TIMESTAMP", "embedding": "FLOAT[]"}
    meta = read_provenance(first.parquet_path)
    assert meta["run_key"] == T.prepare(clicks, "clicks", TINY, lambda _: None).run_key
    assert meta["checkpoint"] == f"{meta['run_dir']}/epoch-2.pt" and meta["epoch"] == 2
    assert meta["config"]["d_model"] == 16 and meta["data"]["source_hash"] == source_hash
    assert meta["data"]["inputs_sha256"] and meta["code_version"] and meta["vocab"]["text"] == ["query"]
    assert not list(first.parquet_path.parent.glob("*.tmp"))
    second = embed_sessions(clicks, "clicks", TINY)
    assert pq.read_table(second.parquet_path).column("embedding").to_pylist() == table.column("embedding").to_pylist()
    # another batching of the same sessions gives the same vectors
    con = clicks.connect(read_only=True)
    try:
        from producers.stores.warehouse import stored_definition

        data, vocab = F.load(con, stored_definition(con, "clicks"), TINY)
    finally:
        con.close()
    model = T.build_model(vocab, TINY)
    model.load_state_dict(T.load_checkpoint(first.run_dir / "epoch-2.pt")["model"])
    with T.torch_threads(1):
        one = infer(model, data, TINY, "cpu", batch_size=1)
        mixed = infer(model, data, TINY, "cpu", batch_size=7, order=np.random.default_rng(0).permutation(data.n))
    assert np.abs(one - mixed).max() < 1e-5
    assert np.abs(one - np.array(table.column("embedding").to_pylist())).max() < 1e-5


@pytest.mark.parametrize("change, message", [
    ({"d_model": 10, "n_heads": 4}, "multiple of n_heads"),
    ({"batch_size": 1}, "batch_size must be at least 2"),
    ({"mask_prob": 0.0}, "mask_prob"),
    ({"device": "tpu"}, "device 'tpu'"),
    ({"threads": 0}, "threads must be at least 1"),
])
def test_bad_config_values_are_refused(change, message, tmp_path):
    with pytest.raises(SessionsError, match=message):
        train_encoder(Home.resolve(tmp_path / "nowhere"), "clicks", replace(TINY, **change))
    assert not (tmp_path / "nowhere").exists()


def test_importing_the_package_does_not_import_torch():
    code = "import sys, producers.sessions; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_statistics_in_the_run_key_are_the_same_on_every_call(clicks):
    """DuckDB sums doubles in parallel: unrounded means differed in their last bits between calls, so
    `sessions embed` computed another run key than `sessions train` and found no encoder."""
    import duckdb

    from producers.sessions.features import fit_vocab
    from producers.stores.warehouse import stored_definition

    con = clicks.connect(read_only=True)
    try:
        d = stored_definition(con, "clicks")
    finally:
        con.close()
    big = duckdb.connect()
    big.execute("SET threads = 4")
    big.execute("CREATE SCHEMA clicks")
    big.execute("""CREATE TABLE clicks.session_events AS SELECT 'home' AS page, random() * 1e4 AS price,
                   'q' AS query, 1 AS visit, random() * 1e6 AS gap_s FROM range(2000000)""")
    vocabs = {repr(fit_vocab(big, d, TINY)) for _ in range(6)}
    assert len(vocabs) == 1
