"""`training.embed`: pooling by hand, batch/padding invariance, resume, one set per epoch folder."""
from __future__ import annotations

import json
import re
import shutil

import duckdb
import numpy as np
import pytest

from producers.datasets.definition import load_builtin
from producers.ingest import IngestConfig, ingest
from producers.serialize.run import SerializeConfig, serialize
from producers.stores.outputs import read_provenance
from producers.stores.warehouse import Home
from tests.fixtures.movielens_files import write_grouplens
from tests.fixtures.tiny_model import TINY, save_tiny_model, tiny_tokenizer
from training import embed as embed_mod
from training.embed import parts as embed_parts
from training.embed import (
    CHECKPOINT_FILE,
    CPU_BATCH_TOKENS,
    EmbedConfig,
    Embedder,
    EmbedError,
    embed,
    find_checkpoints,
    plan_batches,
    resolve_layers,
)
from validation.gate import ValidationGateError
from validation.run import ValidateConfig, validate

MAX_LENGTH = 120  # the tiny model has 128 positions
N_HIDDEN = TINY["layers"] + 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), tiny_tokenizer(), seed=0)


@pytest.fixture(scope="module")
def built_home(tmp_path_factory):
    """MovieLens fixture, ingested, validated and serialized with the tiny tokenizer (built once)."""
    root = tmp_path_factory.mktemp("embed-home")
    home = Home.resolve(root / "home")
    source = write_grouplens(root / "ml-100k")
    ingest(home, load_builtin("movielens-100k"), IngestConfig(source=source))
    assert validate(home, "movielens-100k", ValidateConfig(data_docs=False)).success
    serialize(home, "movielens-100k", SerializeConfig(model="tiny", max_tokens=110), tokenizer=tiny_tokenizer())
    return home


@pytest.fixture
def ready_home(built_home, tmp_path):
    target = tmp_path / "home"
    shutil.copytree(built_home.root, target)
    return Home.resolve(target)


def query(home, sql: str) -> list[tuple]:
    con = duckdb.connect(str(home.warehouse_path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def user_texts(home):
    return query(home, "SELECT user_id, text FROM movielens_100k.texts WHERE kind = 'serialized' ORDER BY user_id")


def table_rows(home):
    return query(home, "SELECT user_id, vector, dim, model, checkpoint, epoch, layers, text_kind "
                       "FROM movielens_100k.embeddings ORDER BY checkpoint, user_id")


def embedder(model_dir, layers="1:", padding_side="right", attn="sdpa", pooling="mean"):
    config = EmbedConfig(model=str(model_dir), layers=layers, max_length=MAX_LENGTH, padding_side=padding_side,
                         attn_implementation=attn, pooling=pooling)
    return Embedder.load(str(model_dir), str(model_dir), config)


def config(model_dir, **kw):
    return EmbedConfig(model=str(model_dir), layers="1:", max_length=MAX_LENGTH, **kw)


# ---------------------------------------------------------------------------------------------
# Layers and pooling


def test_layer_specs_resolve_like_python_slices_of_hidden_states():
    assert resolve_layers("9:", 31) == range(9, 31)
    assert resolve_layers("-4:", 31) == range(27, 31)
    assert resolve_layers("all", 31) == range(31)
    assert resolve_layers("last", 31) == range(30, 31)
    assert resolve_layers("2:5", 31) == range(2, 5)
    assert resolve_layers("-1", 31) == range(30, 31)
    for bad in ("9:", "x", "10", "3:1"):
        with pytest.raises(EmbedError):
            resolve_layers(bad, 4)


@pytest.mark.parametrize("layers", ["1:", "-2:", "all", "last", "0:2"])
def test_pooling_matches_a_hand_computation(model_dir, layers):
    import torch

    from producers.shared.models import load_causal_lm, load_tokenizer

    texts = ["the cat sat on the mat with the hat", "a dog", "in the beginning there was the word"]
    e = embedder(model_dir, layers=layers)
    got = e.encode(texts).vectors
    e.close()

    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), dtype=torch.float32)
    chosen = resolve_layers(layers, N_HIDDEN)
    for i, text in enumerate(texts):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        assert len(hidden) == N_HIDDEN
        want = torch.stack([hidden[k][0] for k in chosen]).mean(dim=0).mean(dim=0).numpy()
        np.testing.assert_allclose(got[i], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pooling", ["last", "lines:2"])
def test_last_token_and_last_lines_pooling_match_a_hand_computation(model_dir, pooling, side):
    import torch

    from producers.shared.models import load_causal_lm, load_tokenizer

    # the third text ends with a line break, which closes its last line rather than opening one
    texts = ["the cat sat\non the mat\nwith the hat", "a dog", "in the\nbeginning there\nwas\nthe word\n"]
    e = embedder(model_dir, layers="1:", padding_side=side, pooling=pooling)
    got = e.encode(texts).vectors  # one batch: padding on `side`
    e.close()
    tok = load_tokenizer(str(model_dir))
    newline = {i for i in range(len(tok)) if "\n" in tok.decode([i])}
    assert newline, "the tiny tokenizer must have a line-break token for this test"
    model = load_causal_lm(str(model_dir), dtype=torch.float32)
    for i, text in enumerate(texts):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        per_token = torch.stack([hidden[k][0] for k in resolve_layers("1:", N_HIDDEN)]).mean(dim=0)
        if pooling == "last":
            want = per_token[-1]
        else:
            breaks = [j for j, t in enumerate(ids[0].tolist()) if t in newline and j < ids.shape[1] - 1]
            start = breaks[-2] + 1 if len(breaks) >= 2 else 0
            want = per_token[start:].mean(dim=0)
        np.testing.assert_allclose(got[i], want.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", ["max", "lines", "lines:0", "lines:x", "last:3"])
def test_an_unknown_pooling_is_refused(model_dir, bad):
    with pytest.raises(EmbedError, match="pooling"):
        embedder(model_dir, pooling=bad)


def test_output_hidden_states_fallback_agrees_with_the_hooks(model_dir):
    texts = ["the cat sat on the mat", "a dog", "in the beginning"]
    e = embedder(model_dir, layers="0:3")
    hooked = e.encode(texts).vectors
    e.close()  # no hooks: the generic output_hidden_states path
    assert e._sum is None
    np.testing.assert_allclose(e.encode(texts).vectors, hooked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers, runs", [("0:1", 0), ("1:2", 1), ("0:3", 2), ("1:3", 2), ("1:", 3), ("all", 3)])
def test_early_exit_runs_only_the_layers_needed_and_gives_the_full_forwards_vectors(model_dir, layers, runs):
    texts = ["the cat sat on the mat", "a dog", "in the beginning there was the word"]
    e = embedder(model_dir, layers=layers)
    assert e.layers_run == runs
    calls = []
    watched = [*e.base.layers, e.base.norm]
    handles = [m.register_forward_pre_hook(lambda m, a, k=k: calls.append(k)) for k, m in enumerate(watched)]
    early = e.encode(texts).vectors
    for h in handles:
        h.remove()
    # a module that starts counts as run; the norm (index 3) runs only when the last state is chosen
    assert sorted(set(calls)) == list(range(runs)) + ([3] if runs == TINY["layers"] else [])
    e.close()  # no hooks: the generic output_hidden_states path runs every layer
    assert e._sum is None
    np.testing.assert_allclose(early, e.encode(texts).vectors, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_a_user_gets_the_same_vector_alone_and_in_any_batch(built_home, model_dir, side, attn):
    texts = [t for _, t in user_texts(built_home)]
    lengths = [len(t) for t in texts]
    assert max(lengths) > min(lengths) + 20  # padding really happens
    e = embedder(model_dir, layers="all", padding_side=side, attn=attn)
    alone = np.stack([e.encode([t]).vectors[0] for t in texts])
    order = np.argsort(lengths)
    compositions = [
        [list(range(len(texts)))],  # everyone together
        [list(order[::-1])],  # longest first
        [[int(order[0]), int(order[-1])], [int(order[1]), int(order[-2]), int(order[2])]],  # shortest with longest
        [list(range(0, len(texts), 2)), list(range(1, len(texts), 2))],
    ]
    worst = 0.0
    for batches in compositions:
        for batch in batches:
            got = e.encode([texts[i] for i in batch]).vectors
            worst = max(worst, float(np.abs(got - alone[batch]).max()))
    e.close()
    assert worst < 1e-4, worst


@pytest.mark.parametrize("side, sent", [("right", ["input_ids"]), ("left", ["attention_mask", "input_ids",
                                                                              "position_ids"])])
def test_right_padding_sends_no_mask_so_sdpa_can_take_its_causal_kernel(model_dir, side, sent):
    """A 2-D padding mask makes SDPA build a 4-D mask and leave its causal (flash) kernel; under the
    causal mask, right padding is never seen by a real token, so the mask is sent only for left padding.
    (That a user's vector does not depend on its batch is the batch-invariance test above.)"""
    texts = ["the cat sat on the mat with the hat", "a dog"]  # padding happens
    e = embedder(model_dir, layers="1:", padding_side=side)
    seen = []
    hook = e.base.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(sorted(k for k, v in kwargs.items() if v is not None and k != "use_cache")),
        with_kwargs=True)
    without = e.encode(texts).vectors
    hook.remove()
    assert seen == [sent]
    e.padding_mask = True  # the baseline the GPU check measures against: the same vectors
    np.testing.assert_allclose(e.encode(texts).vectors, without, atol=1e-6, rtol=0)
    e.close()


@pytest.mark.parametrize("ahead", [None, 1, 2])
def test_batches_launched_ahead_come_back_in_order_with_the_same_vectors(model_dir, ahead):
    """On a GPU the next batch is launched before this one's vectors are waited for (`ahead` 1); on the
    CPU (default 0) each batch is computed only when its vectors are asked for, and written at once."""
    texts = ["the cat sat on the mat with the hat", "a dog", "in the beginning", "was the word", "and"]
    e = embedder(model_dir, layers="1:")
    batches = [e.tokenize(texts[i:i + 2])[0] for i in range(0, len(texts), 2)]
    one_by_one = [e.encode_ids(b).vectors for b in batches]
    events = []
    real_launch = e.launch

    def launch(ids):
        events.append(f"launch {len(events)}")
        return real_launch(ids)

    e.launch = launch
    got = []
    for enc in e.encode_batches(batches, ahead=ahead):
        events.append(f"got {len(got)}")
        got.append(enc.vectors)
    e.close()
    for a, b in zip(got, one_by_one, strict=True):
        np.testing.assert_array_equal(a, b)
    launched_before_first = events.index("got 0")
    assert launched_before_first == 1 + (ahead or 0)  # the CPU's default launches nothing ahead


def test_batches_are_sorted_by_length_and_hold_the_token_budget():
    lengths = [5, 50, 7, 30, 30, 100, 1]
    batches = plan_batches(lengths, 100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [5]
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 100 or len(b) == 1
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


# ---------------------------------------------------------------------------------------------
# The stage


def test_one_row_per_user_with_the_hidden_size_and_provenance(ready_home, model_dir):
    logs = []
    r = embed(ready_home, "movielens-100k", config(model_dir, batch_tokens=400), log=logs.append)
    users = [u for u, _ in user_texts(ready_home)]
    rows = table_rows(ready_home)
    assert [row[0] for row in rows] == users and r.n_users == len(users) == 12
    assert all(row[2] == len(row[1]) == TINY["hidden"] == r.dim for row in rows)
    assert {row[3:] for row in rows} == {(str(model_dir), "base", None, "1:4", "serialized")}
    (s,) = r.sets
    assert s.n_computed == 12 and s.n_resumed == 0 and s.tokens > 0 and s.tokens_per_s > 0
    meta = read_provenance(s.parquet)
    assert meta["layers"] == "1:4" and meta["layers_spec"] == "1:" and meta["max_length"] == MAX_LENGTH
    assert meta["checkpoint"] == "base" and meta["n_users"] == 12 and meta["tokens"] == s.tokens
    assert meta["code_version"] and meta["model_path"] == str(model_dir) and meta["batch_tokens"] == 400
    import pyarrow.parquet as pq

    exported = pq.read_table(s.parquet)
    assert exported.num_rows == 12 and exported.column("user_id").to_pylist() == users
    assert not (ready_home.data_dir / "movielens_100k" / "embeddings_parts" / s.run_key).exists()

    # The same texts and settings again: the finished set is reused, nothing is recomputed.
    reused = embed(ready_home, "movielens-100k", config(model_dir)).sets[0]  # batch_tokens auto: 16,384 on a CPU
    assert reused.n_computed == 0 and reused.run_key == s.run_key and reused.parquet == s.parquet
    assert table_rows(ready_home) == rows
    # Other settings (here the max length) make another run, which replaces the set rather than adding to it.
    other = embed(ready_home, "movielens-100k", EmbedConfig(model=str(model_dir), layers="1:",
                                                            max_length=MAX_LENGTH + 1)).sets[0]
    assert read_provenance(other.parquet)["batch_tokens"] == CPU_BATCH_TOKENS  # auto, on a CPU
    again = table_rows(ready_home)
    assert len(again) == 12
    for a, b in zip(rows, again):
        np.testing.assert_allclose(a[1], b[1], atol=1e-4)


def test_a_run_over_some_users_keeps_the_others(ready_home, model_dir):
    embed(ready_home, "movielens-100k", config(model_dir))
    before = {row[0]: row[1] for row in table_rows(ready_home)}
    r = embed(ready_home, "movielens-100k", config(model_dir, limit_users=5))
    assert r.n_users == 5 and r.sets[0].n_computed == 5
    after = {row[0]: row[1] for row in table_rows(ready_home)}
    assert sorted(after) == sorted(before) and len(after) == 12
    # The exported file holds the whole set, not only the users of the last run.
    import pyarrow.parquet as pq

    assert pq.read_table(r.parquet[0]).num_rows == 12


def test_refuses_unvalidated_data(home, grouplens, model_dir):
    ingest(home, load_builtin("movielens-100k"), IngestConfig(source=grouplens))
    with pytest.raises(ValidationGateError):
        embed(home, "movielens-100k", config(model_dir))


def test_an_empty_layer_range_is_refused(ready_home, model_dir):
    with pytest.raises(EmbedError, match="select none"):
        embed(ready_home, "movielens-100k", EmbedConfig(model=str(model_dir), max_length=MAX_LENGTH))  # "9:" of 4


def test_a_killed_run_resumes_with_only_the_remaining_users(ready_home, built_home, tmp_path, model_dir, monkeypatch):
    reference_home = Home.resolve(tmp_path / "reference")
    shutil.copytree(built_home.root, reference_home.root)
    embed(reference_home, "movielens-100k", config(model_dir, batch_tokens=250))
    reference = table_rows(reference_home)

    real_write = embed_parts.write_part
    written: list[list] = []

    def write_then_die(path, users, enc, hashes):
        if written:
            raise KeyboardInterrupt("killed")
        real_write(path, users, enc, hashes)
        written.append(list(users))

    monkeypatch.setattr(embed_parts, "write_part", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        embed(ready_home, "movielens-100k", config(model_dir, batch_tokens=250))
    first = written[0]
    assert 0 < len(first) < 12
    parts = list((ready_home.data_dir / "movielens_100k" / "embeddings_parts").glob("*/batch-*.parquet"))
    assert len(parts) == 1

    resumed: list[list] = []

    def record(path, users, enc, hashes):
        real_write(path, users, enc, hashes)
        resumed.append(list(users))

    monkeypatch.setattr(embed_parts, "write_part", record)
    r = embed(ready_home, "movielens-100k", config(model_dir, batch_tokens=250))
    (s,) = r.sets
    remaining = sorted(u for b in resumed for u in b)
    assert s.n_resumed == len(first) and s.n_computed == 12 - len(first) == len(remaining)
    assert sorted(first + remaining) == [u for u, _ in user_texts(ready_home)]
    got = table_rows(ready_home)
    assert [row[0] for row in got] == [row[0] for row in reference]
    for a, b in zip(got, reference):
        assert a[2:] == b[2:]
        np.testing.assert_allclose(a[1], b[1], atol=1e-5)


def test_a_batch_with_a_non_finite_vector_stops_the_run_and_the_batches_before_it_are_kept(
        ready_home, model_dir, monkeypatch):
    """float16 can overflow and a diverged checkpoint gives NaN: such vectors must never be stored. The run
    stops at that batch, naming its users, and the same command resumes after the batches already written."""
    real_result = embed_mod.Launched.result
    calls = []

    def nan_in_the_second_batch(self):
        enc = real_result(self)
        calls.append(len(enc.vectors))
        if len(calls) == 2:
            enc.vectors[-1, 3] = np.nan
        return enc

    monkeypatch.setattr(embed_mod.Launched, "result", nan_in_the_second_batch)
    with pytest.raises(EmbedError, match=r"the vectors of user \d+ are not finite .* try --dtype float32"):
        embed(ready_home, "movielens-100k", config(model_dir, batch_tokens=250))
    parts = list((ready_home.data_dir / "movielens_100k" / "embeddings_parts").glob("*/batch-*.parquet"))
    assert len(parts) == 1  # the first batch only
    monkeypatch.setattr(embed_mod.Launched, "result", real_result)
    (s,) = embed(ready_home, "movielens-100k", config(model_dir, batch_tokens=250)).sets
    assert s.n_resumed == calls[0] and s.n_users == 12
    assert all(np.isfinite(row[1]).all() for row in table_rows(ready_home))


def fake_run(home, model_dir, run="run-1"):
    """Two epoch folders, as fine-tuning leaves them: a model, its tokenizer and llm4es_checkpoint.json."""
    folder = home.root / "runs" / "movielens_100k" / run
    for name, epoch, seed in (("epoch-1", 1, 1), ("epoch-2", 2, 2), ("step-25", 2.5, 3), (".epoch-3.tmp", 3, 4)):
        out = save_tiny_model(folder / "models" / name, tiny_tokenizer(), seed=seed)
        marker = {"epoch": epoch, "model_source": str(model_dir), "global_step": int(10 * epoch)}
        (out / CHECKPOINT_FILE).write_text(json.dumps(marker))
    return folder


def test_a_run_folder_gives_one_set_per_saved_model(ready_home, model_dir):
    run = fake_run(ready_home, model_dir)
    found = find_checkpoints(ready_home, str(run))
    # every saved model, epochs and the step-N one that --max-steps leaves, oldest first; no half-written folder
    assert [c.epoch for c in found] == [1, 2, None]
    assert [c.label for c in found] == [f"runs/movielens_100k/run-1/models/{n}" for n in ("epoch-1", "epoch-2",
                                                                                          "step-25")]

    r = embed(ready_home, "movielens-100k", config(model_dir, checkpoint=str(run)))
    assert [s.epoch for s in r.sets] == [1, 2, None] and len(set(r.parquet)) == 3
    rows = table_rows(ready_home)
    assert len(rows) == 36 and {row[5] for row in rows} == {1, 2, None}
    by_epoch = {e: np.array([row[1] for row in rows if row[5] == e]) for e in (1, 2)}
    assert np.abs(by_epoch[1] - by_epoch[2]).max() > 1e-3  # different weights, different vectors
    for s in r.sets[:2]:
        meta = read_provenance(s.parquet)
        assert meta["epoch"] == s.epoch and meta["checkpoint_info"]["global_step"] == 10 * s.epoch
        assert s.model == str(model_dir)
    assert read_provenance(r.sets[2].parquet)["checkpoint_info"]["global_step"] == 25

    # One epoch folder alone (relative to the home) replaces only its own set.
    one = embed(ready_home, "movielens-100k", config(model_dir, checkpoint="runs/movielens_100k/run-1/models/epoch-2"))
    assert [s.epoch for s in one.sets] == [2] and len(table_rows(ready_home)) == 36


def test_a_run_stopped_by_max_steps_embeds_its_step_model_and_state_json_decides(ready_home, model_dir):
    """`finetune --max-steps 30` leaves models/step-30 only; state.json names the run's models."""
    run = ready_home.root / "runs" / "movielens_100k" / "short"
    out = save_tiny_model(run / "models" / "step-30", tiny_tokenizer(), seed=5)
    (out / CHECKPOINT_FILE).write_text(json.dumps({"epoch": 0.75, "global_step": 30, "model_source": str(model_dir)}))
    save_tiny_model(run / "models" / "step-99", tiny_tokenizer(), seed=6)  # not in state.json: not the run's
    (run / "state.json").write_text(json.dumps({"models": ["step-30"], "global_step": 30}))
    found = find_checkpoints(ready_home, "runs/movielens_100k/short")
    assert [c.label for c in found] == ["runs/movielens_100k/short/models/step-30"] and found[0].epoch is None
    r = embed(ready_home, "movielens-100k", config(model_dir, checkpoint="runs/movielens_100k/short"))
    assert len(r.sets) == 1 and r.sets[0].n_users == 12


def test_an_unusable_checkpoint_folder_says_what_was_expected(ready_home):
    empty = ready_home.root / "runs" / "movielens_100k" / "nothing"
    (empty / "models").mkdir(parents=True)
    (empty / "config.json").unlink(missing_ok=True)
    (empty / "notes.txt").write_text("x")
    with pytest.raises(EmbedError, match=r"models/epoch-E/ or models/step-N/.*found models/, notes.txt"):
        find_checkpoints(ready_home, str(empty))
    with pytest.raises(EmbedError, match="no such folder"):
        find_checkpoints(ready_home, str(empty / "missing"))
    odd = ready_home.root / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"run_name": "x"}))  # a run's config, not a model's
    with pytest.raises(EmbedError, match="is not a model's config"):
        find_checkpoints(ready_home, str(odd))


def test_the_suite_is_pinned_to_the_cpu(monkeypatch):
    """tests/conftest.py sets LLM4ES_DEVICE=cpu; `auto` follows it (and refuses CUDA where there is none)."""
    import torch

    from training.embed import pick_device

    assert pick_device("auto").type == "cpu" and EmbedConfig().device == "auto"
    monkeypatch.setenv("LLM4ES_DEVICE", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(EmbedError, match="CUDA is not available"):
            pick_device("auto")
    else:
        assert pick_device("auto").type == "cuda"


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun, gloo on the CPU)


def torchrun(home, model_dir, *die, nproc=2):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "LLM4ES_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(root / "tests" / "training" / "embed_worker.py"), str(home.root), str(model_dir), *map(str, die)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    # Tolerant of two ranks' lines run together: each result is one flat JSON object.
    results = [json.loads(found) for found in re.findall(r"RESULT (\{[^{}]*\})", done.stdout)]
    return done, sorted(results, key=lambda r: r["rank"])


def vectors_by_user(home):
    return {u: np.array(v) for u, v in query(home, "SELECT user_id, vector FROM movielens_100k.embeddings")}


def test_shards_are_length_balanced_and_cover_every_user_once():
    lengths = [100, 90, 80, 10, 10, 10, 5, 300]
    shards = embed_mod.shard_users(lengths, 2)
    assert sorted(i for s in shards for i in s) == list(range(8))
    loads = [sum(lengths[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(lengths[i] for i in range(8) if i != 7)  # greedy bound
    assert shards == embed_mod.shard_users(lengths, 2)  # a pure function: a resumed process finds its shard
    assert embed_mod.shard_users(lengths, 1) == [list(range(8))]


@pytest.mark.slow
def test_two_processes_give_the_one_process_output_and_a_killed_rank_resumes(built_home, model_dir, tmp_path):
    one = Home.resolve(shutil.copytree(built_home.root, tmp_path / "one"))
    embed(one, "movielens-100k", config(model_dir, batch_tokens=256))
    expected = vectors_by_user(one)

    two = Home.resolve(shutil.copytree(built_home.root, tmp_path / "two"))
    killed, _ = torchrun(two, model_dir, 1, 1)  # process 1 dies after its first part file
    assert killed.returncode != 0, killed.stdout + killed.stderr
    parts = list((two.data_dir / "movielens_100k" / "embeddings_parts").glob("*/batch-r001-*.parquet"))
    assert len(parts) == 1  # its finished part is on disk, and nothing was published
    assert not query(two, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'embeddings'")[0][0]

    done, results = torchrun(two, model_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [r["rank"] for r in results] == [0, 1] and all(r["n_users"] == 12 for r in results)
    assert results[1]["resumed"] >= 1  # process 1 took up its shard where it died
    assert results[0]["computed"] + results[1]["computed"] + sum(r["resumed"] for r in results) == 12
    got = vectors_by_user(two)
    assert got.keys() == expected.keys()
    assert max(np.abs(got[u] - expected[u]).max() for u in got) <= 1e-5
    assert results[0]["parquet"] == results[1]["parquet"] and read_provenance(results[0]["parquet"])[
        "num_processes"] == 2
    assert not list((two.data_dir / "movielens_100k" / "embeddings_parts").glob("*"))  # merged once, cleaned up


def test_progress_shows_in_a_log_file(ready_home, model_dir, monkeypatch):
    """stdout not a terminal (a log file): lines with users done, tokens/s and an ETA, not just 'loading'."""
    from training import hardware

    monkeypatch.setattr(hardware.sys.stdout, "isatty", lambda: False, raising=False)
    lines: list[str] = []
    embed(ready_home, "movielens-100k", config(model_dir, batch_tokens=256), log=lines.append)
    progress = [line for line in lines if " users (" in line]
    assert progress and progress[-1].startswith("12/12 users (100%)")
    assert "tokens/s" in progress[-1] and "ETA 0m00s" in progress[-1]


def test_progress_lines_come_every_interval_and_at_the_end():
    from training.hardware import Progress

    lines: list[str] = []
    p = Progress(lines.append, total=10, unit="users", every_s=3600, enabled=True)
    for done in range(1, 11):
        p.update(done, tokens=done * 100)
    assert len(lines) == 1 and lines[0].startswith("10/10 users (100%)")  # the interval holds back the rest
    p = Progress(lines.append, total=10, unit="users", every_s=0, enabled=True)
    p.update(4, 400)
    assert lines[-1].startswith("4/10 users (40%)") and "ETA" in lines[-1]
    quiet: list[str] = []
    Progress(quiet.append, total=3, unit="users", enabled=False).update(3, 10)
    assert not quiet  # a terminal has tqdm's bar instead
