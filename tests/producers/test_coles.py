"""CoLES embeddings through pytorch-lifestream: records checked by hand, runs tiny enough for a CPU."""
from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import pyarrow.parquet as pq
import pytest

from producers.coles import ColesConfig, ColesError, coles, read_provenance
from producers.coles.records import TIME_DELTA, read_records
from producers.datasets.definition import load_builtin, parse_definition
from producers.ingest import IngestConfig, ingest
from producers.stores.warehouse import Home, last_ingest, stored_definition
from tests.fixtures.bank_files import write_gender
from tests.fixtures.movielens_files import read_ratings
from validation.gate import ValidationGateError
from validation.run import ValidateConfig, validate

SCHEMA = "movielens_100k"
TINY = ColesConfig(hidden_size=8, embedding_dim=4, epochs=1, batch_size=4, split_count=3, cnt_min=3, cnt_max=8,
                   seed=7, progress=False)


def utc(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc).replace(tzinfo=None)


def slog(x: float) -> float:
    return math.copysign(math.log1p(abs(x)), x)


@pytest.fixture(scope="module")
def ml(validated_grouplens):
    """A validated grouplens fixture (12 users, 20-30 ratings each) and its raw ratings."""
    home, source = validated_grouplens
    return home, read_ratings(source)  # (user, movie, rating, unix time, year)


def vectors(result) -> dict:
    table = pq.read_table(result.parquet_path)
    return dict(zip(table.column("user_id").to_pylist(), map(tuple, table.column("vector").to_pylist())))


def test_records_match_a_hand_computation(ml):
    home, ratings = ml
    config = replace(TINY, max_categories=5, max_seq_len=10)
    con = home.connect(read_only=True)
    try:
        records = read_records(con, stored_definition(con, "movielens-100k"), config)
    finally:
        con.close()
    counts = Counter(m for _, m, *_ in ratings)
    ranked = sorted(counts, key=lambda m: (-counts[m], m))
    code = {m: i + 1 for i, m in enumerate(ranked[:5])}
    assert records.categorical == {"movie_id": 5} and records.numeric == ["year", "rating", TIME_DELTA]
    assert records.vocabulary["movie_id"]["distinct_values"] == len(counts)
    assert records.users == sorted({u for u, *_ in ratings}) and records.as_of == utc(max(r[3] for r in ratings))
    user = ratings[0][0]
    mine = sorted((r for r in ratings if r[0] == user), key=lambda r: (r[3], r[1]))  # time, then the key (movie)
    assert len(mine) > 10
    deltas = [0.0] + [math.log1p((b[3] - a[3]) / 86400) for a, b in zip(mine, mine[1:])]
    keep = slice(len(mine) - 10, None)  # the 10 most recent; the first kept delta still counts from its predecessor
    rec = records.records[records.users.index(user)]
    assert rec["user_id"] == user and records.n_events[records.users.index(user)] == len(mine)
    assert rec["event_time"].tolist() == [float(r[3]) for r in mine[keep]]
    assert rec["movie_id"].tolist() == [code.get(r[1], 6) for r in mine[keep]]  # 6 = "other"
    assert 6 in rec["movie_id"].tolist() and min(rec["movie_id"].tolist()) >= 1  # 0 is padding only
    assert rec["year"].numpy() == pytest.approx([slog(r[4]) for r in mine[keep]], rel=1e-6)
    assert rec["rating"].numpy() == pytest.approx([slog(r[2]) for r in mine[keep]], rel=1e-6)
    assert rec[TIME_DELTA].numpy() == pytest.approx(deltas[keep], rel=1e-5, abs=1e-6)
    assert str(rec["movie_id"].dtype) == "torch.int64" and str(rec["rating"].dtype) == "torch.float32"


def test_a_run_writes_one_vector_per_user(ml):
    home, ratings = ml
    result = coles(home, "movielens-100k", replace(TINY, resume=False))
    users = sorted({u for u, *_ in ratings})
    last = utc(max(r[3] for r in ratings))
    assert (result.n_users, result.dim, result.epoch, result.model) == (len(users), 8, 1, "coles-gru-8")
    assert result.as_of == last and result.final_loss is not None and math.isfinite(result.final_loss)
    assert (home.root / result.checkpoint).is_file() and result.checkpoint.startswith(f"runs/{SCHEMA}/coles/")
    assert json.loads((result.run_dir / "config.json").read_text())["run_key"] == result.run_key
    con = home.connect(read_only=True)
    try:
        types = dict((r[0], r[1]) for r in con.execute(f"DESCRIBE {SCHEMA}.coles_embeddings").fetchall())
        rows = con.execute(f"SELECT user_id, vector, dim, model, checkpoint, epoch, feature_timestamp, source_hash, "
                           f"code_version FROM {SCHEMA}.coles_embeddings ORDER BY user_id").fetchall()
        ingest_row = last_ingest(con, SCHEMA)
        staging = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name LIKE '%staging'"
                              ).fetchall()[0][0]
    finally:
        con.close()
    assert types == {"user_id": "BIGINT", "vector": "FLOAT[]", "dim": "INTEGER", "model": "VARCHAR",
                     "checkpoint": "VARCHAR", "epoch": "INTEGER", "feature_timestamp": "TIMESTAMP",
                     "produced_at": "TIMESTAMP", "source_hash": "VARCHAR", "code_version": "VARCHAR"}
    assert [r[0] for r in rows] == users and staging == 0
    assert {(r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows} == {
        (8, "coles-gru-8", result.checkpoint, 1, last, ingest_row["source_hash"])}
    assert all(len(r[1]) == 8 and all(math.isfinite(x) for x in r[1]) for r in rows) and rows[0][8]
    # the Parquet copy holds the same rows, and the provenance
    table = pq.read_table(result.parquet_path)
    assert table.column_names == list(types)
    got = vectors(result)
    assert list(got) == users and all(np.allclose(got[r[0]], r[1], rtol=0, atol=0) for r in rows)
    meta = read_provenance(result.parquet_path)
    assert meta["config"]["hidden_size"] == 8 and meta["data"]["source_hash"] == ingest_row["source_hash"]
    assert meta["ptls_version"] == "0.7.0" and meta["torch_version"] and meta["epochs_trained"] == 1
    assert meta["final_loss"] == result.final_loss and meta["feature_timestamp"] == last.isoformat()
    assert not list(result.parquet_path.parent.glob("*.tmp"))


def test_the_same_seed_gives_the_same_vectors(ml):
    home, _ = ml
    first = vectors(coles(home, "movielens-100k", replace(TINY, resume=False)))
    second = vectors(coles(home, "movielens-100k", replace(TINY, resume=False)))  # trained again from scratch
    assert first == second
    other = coles(home, "movielens-100k", replace(TINY, seed=8, resume=False))
    assert vectors(other) != first and other.run_key != coles(home, "movielens-100k", TINY).run_key


def test_an_interrupted_run_resumes_to_the_same_vectors(ml, monkeypatch):
    home, _ = ml
    two = replace(TINY, epochs=2)
    straight = coles(home, "movielens-100k", replace(two, resume=False))
    want = vectors(straight)
    # a kill in the middle of epoch 2: epoch 1's checkpoint is on disk, epoch 2's is not
    from producers.coles import train

    def killed(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 1:
            raise RuntimeError("killed")

    monkeypatch.setattr(train._EpochCallback, "on_train_batch_start", killed, raising=False)
    with pytest.raises(RuntimeError, match="killed"):
        coles(home, "movielens-100k", replace(two, resume=False))
    monkeypatch.undo()
    assert sorted(p.name for p in (straight.run_dir / "checkpoints").iterdir()) == ["epoch-001.ckpt"]
    resumed = coles(home, "movielens-100k", two)
    assert (resumed.resumed_from, resumed.epochs_trained, resumed.run_key) == (1, 1, straight.run_key)
    assert resumed.losses == straight.losses and vectors(resumed) == want
    # asking for more epochs continues the run; a finished epoch is reused, not trained again
    one = coles(home, "movielens-100k", TINY)
    assert (one.epochs_trained, one.epoch, one.run_key) == (0, 1, straight.run_key)
    again = coles(home, "movielens-100k", two)
    assert again.epochs_trained == 0 and vectors(again) == want and again.final_loss == straight.final_loss


def test_mean_pooling_averages_the_gru_states_and_reuses_the_run(ml):
    """pooling="mean": the vector is the mean, over t, of the encoder's state after the first t events
    (each computed here as ptls's own last-step vector of the t-event prefix, one user at a time)."""
    import torch
    from ptls.data_load.utils import collate_feature_dict

    from producers.coles import train as T

    home, _ = ml
    last = coles(home, "movielens-100k", replace(TINY, epochs=2, pooling="last"))
    last_vectors = vectors(last)  # before the next call writes the same table and file
    mean = coles(home, "movielens-100k", replace(TINY, epochs=2, pooling="mean"))
    assert (mean.run_key, mean.epochs_trained) == (last.run_key, 0)  # same encoder, only read another way
    assert "averaged" in read_provenance(mean.parquet_path)["vector"]
    con = home.connect(read_only=True)
    try:
        records = read_records(con, stored_definition(con, "movielens-100k"), TINY)
    finally:
        con.close()
    module = T.build_module(records, TINY)
    T.load_weights(module, home.root / mean.checkpoint)
    encoder = module.seq_encoder.eval()
    got, lengths = vectors(mean), {len(r["event_time"]) for r in records.records}
    assert len(lengths) > 1  # users of uneven lengths share inference batches: padding must not count
    for rec in records.records[:3]:
        features = {k: v for k, v in rec.items() if k != "user_id"}
        with torch.no_grad():
            states = [encoder(collate_feature_dict([{k: v[:t] for k, v in features.items()}]))[0].numpy()
                      for t in range(1, len(rec["event_time"]) + 1)]
        assert np.allclose(got[rec["user_id"]], np.mean(states, axis=0), atol=1e-5)
        assert np.allclose(last_vectors[rec["user_id"]], states[-1], atol=1e-5)


def test_norm_skips_padding_and_the_softmax_loss(ml):
    """norm_skips_padding: in training, the numeric inputs are normalised over the real events only
    (ptls's default counts the padding zeros, and ln(1 + year) ~ 7.6 then reads as "not padding");
    loss="softmax": ptls's InfoNCE loss trains to a finite loss."""
    import torch
    from ptls.data_load.utils import collate_feature_dict
    from ptls.frames.coles.losses import SoftmaxLoss

    from producers.coles import train as T

    home, _ = ml
    con = home.connect(read_only=True)
    try:
        records = read_records(con, stored_definition(con, "movielens-100k"), TINY)
    finally:
        con.close()
    short = {k: v[:3] for k, v in records.records[0].items() if k != "user_id"}  # padded to the long one's length
    batch = collate_feature_dict([short, {k: v for k, v in records.records[1].items() if k != "user_id"}])
    real = batch.seq_len_mask.bool()
    year = records.numeric.index("year")
    for skips, normalised in ((True, True), (False, False)):
        encoder = T.build_module(records, replace(TINY, norm_skips_padding=skips)).seq_encoder.trx_encoder.train()
        with torch.no_grad():
            out = encoder(batch).payload[..., -len(records.numeric):][real][:, year]
        # std a little under 1: BatchNorm's eps (1e-5) is not small next to the variance of ln(1 + year)
        assert (abs(float(out.mean())) < 1e-3 and float(out.std(unbiased=False)) > 0.9) == normalised, (skips, out)
    result = coles(home, "movielens-100k", replace(TINY, loss="softmax"))
    assert isinstance(T.build_module(records, replace(TINY, loss="softmax"))._loss, SoftmaxLoss)
    assert math.isfinite(result.final_loss) and result.run_key != coles(home, "movielens-100k", TINY).run_key


def test_bank_transactions_with_amounts_and_mcc(home, tmp_path):
    source = write_gender(tmp_path / "gender")
    ingest(home, load_builtin("gender"), IngestConfig(source=source))
    assert validate(home, "gender", ValidateConfig(data_docs=False)).success
    with open(source / "transactions.csv", encoding="utf-8") as f:
        txns = [(int(r["customer_id"]), r["mcc_code"].zfill(4), float(r["amount"])) for r in csv.DictReader(f)]
    said = []
    # every user is shorter than cnt_min; an epoch of at most one batch
    result = coles(home, "gender", replace(TINY, cnt_min=20, cnt_max=40, max_batches_per_epoch=1), log=said.append)
    n_users = len({u for u, _, _ in txns})
    warning = next(m for m in said if m.startswith("warning:"))
    assert f"{n_users} of {n_users} users (100%) have fewer than 20 events" in warning
    assert any("training on everyone" in m for m in said)
    assert any(f"1 of {-(-n_users // TINY.batch_size)} batches per epoch" in m for m in said)
    assert any(m.startswith("epoch 1/1:") and "(1 batches)" in m for m in said)
    meta = read_provenance(result.parquet_path)
    assert (meta["short_users"], meta["training_users"], meta["batches_per_epoch"]) == (n_users, n_users, 1)
    assert set(meta["inputs"]["categorical"]) == {"mcc", "tr_type", "term_id"}
    assert meta["inputs"]["numeric"] == ["amount", TIME_DELTA]
    assert meta["inputs"]["categorical"]["mcc"] == len({m for _, m, _ in txns})
    assert list(vectors(result)) == sorted({u for u, _, _ in txns}) and result.dim == 8
    con = home.connect(read_only=True)
    try:
        records = read_records(con, stored_definition(con, "gender"), TINY)
    finally:
        con.close()
    user = records.users[0]
    amounts = sorted(slog(a) for u, _, a in txns if u == user)
    assert sorted(records.records[0]["amount"].tolist()) == pytest.approx(amounts, rel=1e-6)


def test_as_of_keeps_earlier_events_and_embeds_one_event_users(ml):
    home, ratings = ml
    firsts = sorted({min(t for u2, _, _, t, _ in ratings if u2 == u) for u, *_ in ratings})
    cut = firsts[5]  # six users have begun; the sixth has exactly one event
    result = coles(home, "movielens-100k", replace(TINY, as_of=datetime.fromtimestamp(cut, timezone.utc)))
    seen = Counter(u for u, _, _, t, _ in ratings if t <= cut)
    assert result.as_of == utc(cut) and result.n_users == 6 and 1 in seen.values()
    got = vectors(result)
    assert list(got) == sorted(seen) and all(len(v) == 8 and all(map(math.isfinite, v)) for v in got.values())
    assert read_provenance(result.parquet_path)["data"]["n_events"] == sum(seen.values())


def test_importing_the_stage_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, producers.coles; assert not {'torch', 'ptls', 'pytorch_lightning'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


NOTES = """
name: notes
tables:
  notes: {file: notes.csv}
events:
  table: notes
  user: who
  time: {column: ts, format: "%Y-%m-%d"}
  fields:
    - {name: note, kind: text, column: note}
"""


def test_a_dataset_without_categorical_or_numeric_fields_is_refused(home, tmp_path):
    (tmp_path / "notes.csv").write_text("who,ts,note\na,2024-01-01,hello\nb,2024-01-02,world\n")
    ingest(home, parse_definition(NOTES, "notes.yaml"), IngestConfig(source=tmp_path))
    with pytest.raises(ColesError, match="no categorical or numeric event fields"):
        coles(home, "notes", replace(TINY, force=True))


def test_the_gate_and_the_time_window(ml, home, grouplens):
    ingest(home, load_builtin("movielens-100k"), IngestConfig(source=grouplens))
    with pytest.raises(ValidationGateError, match="has not been validated"):
        coles(home, "movielens-100k", TINY)
    ml_home, _ = ml
    with pytest.raises(ColesError, match="no events at or before"):
        coles(ml_home, "movielens-100k", replace(TINY, as_of=datetime(1990, 1, 1)))


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 0}, "hidden_size must be"),
    ({"batch_size": 1}, "batch_size must be at least 2"),
    ({"split_count": 1}, "split_count must be at least 2"),
    ({"cnt_min": 50, "cnt_max": 10}, "must not exceed"),
    ({"lr": 0.0}, "lr must be positive"),
    ({"lr_gamma": 1.5}, "lr_gamma"),
    ({"device": "tpu"}, "device 'tpu'"),
    ({"max_seq_len": -1}, "max_seq_len"),
    ({"threads": 0}, "threads must be at least 1"),
    ({"pooling": "max"}, "pooling must be last or mean"),
    ({"loss": "triplet"}, "loss must be contrastive or softmax"),
])
def test_bad_config_values_are_refused_before_any_work(change, message, tmp_path):
    with pytest.raises(ColesError, match=message):
        coles(Home.resolve(tmp_path / "nowhere"), "movielens-100k", replace(TINY, **change))
    assert not (tmp_path / "nowhere").exists()


def test_a_recorded_config_keeps_the_settings_it_was_trained_with():
    from producers.coles.config import recorded_config

    before = {"hidden_size": 256, "embedding_dim": 16, "epochs": 10, "seed": 42, "as_of": "1998-04-22T23:10:38"}
    old = recorded_config(before, datetime(1999, 1, 1))  # a run from before pooling / norm_skips_padding / loss
    assert (old.pooling, old.norm_skips_padding, old.loss) == ("last", False, "contrastive")
    assert (old.hidden_size, old.embedding_dim, old.as_of) == (256, 16, datetime(1999, 1, 1))
    assert ColesConfig().pooling == "mean" and recorded_config(ColesConfig().as_dict()) == ColesConfig()


def test_the_training_plan_follows_the_data():
    from producers.coles.config import training_plan

    movielens = training_plan(np.full(943, 20) + np.arange(943) % 700, ColesConfig())
    assert (len(movielens.train_rows), movielens.n_short, movielens.batches_per_epoch, movielens.note) == \
        (943, 0, 30, "")  # MovieLens-100k: everyone, every batch, as before the rule
    mixed = np.array([2] * 300 + [40] * 200)  # 200 long enough: more than two batches of 32
    plan = training_plan(mixed, ColesConfig())
    assert plan.train_rows == tuple(range(300, 500)) and plan.n_short == 300 and plan.batches_per_epoch == 7
    few = training_plan(np.array([2] * 20_000 + [40] * 50), ColesConfig())  # purchases: ~2 per customer
    assert len(few.train_rows) == 20_050 and "training on everyone" in few.note
    assert few.batches_per_epoch == 100 and "100 of 627 batches per epoch" in few.note


def test_stored_codes_survive_late_events(home, grouplens):
    """A refresh codes values with the encoder's stored vocabulary: late events (an append dated before the
    trained as-of, as a daily export in another time zone gives) must not re-rank the values, which would
    feed the encoder other codes for the same events (seen: mean cosine 0.95 on unchanged users)."""
    ingest(home, load_builtin("movielens-100k"), IngestConfig(source=grouplens))
    config = replace(TINY, max_categories=5)
    con = home.connect()
    try:
        d = stored_definition(con, "movielens-100k")
        before = read_records(con, d, config)
        values = before.vocabulary["movie_id"]["values"]
        assert len(values) == 5
        counts = dict(con.execute(f"SELECT movie_id, count(*) FROM {SCHEMA}.events GROUP BY 1").fetchall())
        sixth = sorted(counts, key=lambda m: (-counts[m], m))[5]
        late = before.users[0]  # this user's late events make the sixth movie the most frequent
        for days in range(1, 11):
            con.execute(f"INSERT INTO {SCHEMA}.events SELECT * REPLACE (CAST(? AS {d.events.user_dtype}) AS user_id, "
                        f"event_time - to_days(CAST(? AS INTEGER)) AS event_time) FROM {SCHEMA}.events "
                        "WHERE movie_id = ? AND user_id <> ?", [late, days, sixth, late])
        others = [u for u in before.users if u != late]
        reranked = read_records(con, d, config, vocab_as_of=before.as_of, users=others)
        kept = read_records(con, d, config, vocab_as_of=before.as_of, users=others, codes={"movie_id": values})
    finally:
        con.close()
    old = {u: r["movie_id"].tolist() for u, r in zip(before.users, before.records)}
    assert any(r["movie_id"].tolist() != old[u] for u, r in zip(reranked.users, reranked.records))  # the hazard
    assert all(r["movie_id"].tolist() == old[u] for u, r in zip(kept.users, kept.records))
    assert kept.categorical == before.categorical and kept.vocabulary["movie_id"]["values"] == values
