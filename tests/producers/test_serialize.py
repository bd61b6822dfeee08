"""Serialization: the paper's text format, built in SQL, cut to an exact token budget."""
from __future__ import annotations

from datetime import datetime

import duckdb
import pytest

from producers.datasets.definition import load_builtin
from producers.ingest import IngestConfig, ingest
from producers.serialize.budget import count_tokens, fit_texts
from producers.serialize.run import SerializeConfig, SerializeError, serialize
from tests.fixtures.bank_files import write_gender
from tests.fixtures.tiny_model import trained_tokenizer
from validation.gate import ValidationGateError
from validation.run import ValidateConfig, validate

CORPUS = ["1997-10-05 14:02, Toy Story, 1995, Animation, Children's, Comedy, 4",
          "Date | Title | Year | Genres | Rating", "Grocery Stores, Supermarkets, -1234.50, 2019-01-04 10:23"] * 50


@pytest.fixture(scope="module")
def tok():
    return trained_tokenizer(CORPUS, vocab_size=400)


def ready(home, name, source):
    ingest(home, load_builtin(name), IngestConfig(source=source))
    assert validate(home, name, ValidateConfig(data_docs=False)).success


def texts(home, schema):
    con = duckdb.connect(str(home.warehouse_path), read_only=True)
    try:
        return {u: (t, n_ev, n_tok) for u, t, n_ev, n_tok in con.execute(
            f"SELECT user_id, text, n_events, n_tokens FROM {schema}.texts WHERE kind = 'serialized'").fetchall()}
    finally:
        con.close()


def events_by_user(grouplens):
    out: dict[int, list[int]] = {}
    for line in (grouplens / "u.data").read_text().splitlines():
        user, _, _, when = line.split("\t")
        out.setdefault(int(user), []).append(int(when))
    return out


def test_one_text_per_user_in_the_papers_format(home, grouplens, tok):
    ready(home, "movielens-100k", grouplens)
    r = serialize(home, "movielens-100k", SerializeConfig(model="tiny", max_tokens=0), tokenizer=tok)
    got = texts(home, "movielens_100k")
    per_user = events_by_user(grouplens)
    assert r.n_texts == len(got) == len(per_user) and r.n_cut == 0
    for user, (text, n_events, n_tokens) in got.items():
        lines = text.split("\n")
        assert lines[0] == "Date | Title | Year | Genres | Rating"
        assert n_events == len(lines) - 1 == len(per_user[user])
        stamps = [datetime.strptime(line[:16], "%Y-%m-%d %H:%M") for line in lines[1:]]
        assert stamps == sorted(stamps)
        assert n_tokens == len(tok(text, add_special_tokens=False)["input_ids"])
    # A movie is its title and year, its genres, the rating; the id is not serialized.
    first = got[1][0].split("\n")[1]
    assert first.count(", ") >= 3 and "(" not in first.split(", ")[1]


def test_budget_keeps_the_most_recent_events_and_holds_exactly(home, grouplens, tok):
    ready(home, "movielens-100k", grouplens)
    full = serialize(home, "movielens-100k", SerializeConfig(model="tiny", max_tokens=0), tokenizer=tok)
    whole = texts(home, "movielens_100k")
    r = serialize(home, "movielens-100k", SerializeConfig(model="tiny", max_tokens=300), tokenizer=tok)
    cut = texts(home, "movielens_100k")
    assert r.n_cut > 0 and r.n_events < full.n_events
    for user, (text, n_events, n_tokens) in cut.items():
        assert n_tokens == len(tok(text, add_special_tokens=False)["input_ids"]) <= 300
        lines, all_lines = text.split("\n"), whole[user][0].split("\n")
        assert lines[0] == all_lines[0] and lines[1:] == all_lines[len(all_lines) - n_events:]
        # The cut is as late as it can be: one more (older) event would not fit.
        if n_events < len(all_lines) - 1:
            longer = "\n".join([all_lines[0], *all_lines[len(all_lines) - n_events - 1:]])
            assert len(tok(longer, add_special_tokens=False)["input_ids"]) > 300


def test_same_output_on_every_run(home, grouplens, tok):
    ready(home, "movielens-100k", grouplens)
    serialize(home, "movielens-100k", SerializeConfig(model="tiny", max_tokens=250), tokenizer=tok)
    first = texts(home, "movielens_100k")
    serialize(home, "movielens-100k", SerializeConfig(model="tiny", max_tokens=250), tokenizer=tok)
    assert texts(home, "movielens_100k") == first


def test_codes_become_descriptions_and_amounts_two_decimals(home, tmp_path, tok):
    folder = write_gender(tmp_path / "gender")
    ready(home, "gender", folder)
    serialize(home, "gender", SerializeConfig(model="tiny", max_tokens=0), tokenizer=tok)
    got = texts(home, "gender")
    assert all(t.startswith("Date | MCC category | Transaction type | Amount\n") for t, _, _ in got.values())
    body = "\n".join(t for t, _, _ in got.values())
    assert "Grocery Stores, Supermarkets" in body and ", 5411," not in body
    amounts = [line.rsplit(", ", 1)[1] for t, _, _ in got.values() for line in t.split("\n")[1:]]
    assert all(a.lstrip("-").replace(".", "", 1).isdigit() and len(a.split(".")[1]) == 2 for a in amounts)


def test_day_index_is_the_papers_raw_format(home, tmp_path, tok):
    folder = write_gender(tmp_path / "gender")
    ready(home, "gender", folder)
    serialize(home, "gender", SerializeConfig(model="tiny", max_tokens=0, time_format="day-index"), tokenizer=tok)
    con = duckdb.connect(str(home.warehouse_path), read_only=True)
    user, first_day = con.execute("SELECT user_id, datediff('day', DATE '2019-01-01', min(event_time)) "
                                  "FROM gender.events GROUP BY 1 ORDER BY 1 LIMIT 1").fetchone()
    text = con.execute("SELECT text FROM gender.texts WHERE user_id = ?", [user]).fetchone()[0]
    assert text.split("\n")[1].split(", ")[0] == str(first_day)


def test_refuses_unvalidated_data_and_a_budget_below_the_header(home, grouplens, tok):
    ingest(home, load_builtin("movielens-100k"), IngestConfig(source=grouplens))
    with pytest.raises(ValidationGateError, match="validate"):
        serialize(home, "movielens-100k", SerializeConfig(model="tiny"), tokenizer=tok)
    assert validate(home, "movielens-100k", ValidateConfig(data_docs=False)).success
    with pytest.raises(SerializeError, match="header"):
        serialize(home, "movielens-100k", SerializeConfig(model="tiny", max_tokens=3), tokenizer=tok)


def test_fit_is_exact_when_merges_cross_line_breaks():
    """A tokenizer with no pre-tokenizer merges across newlines: offsets alone would miscount."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    lines = [f"2020-01-{d:02d}, shop {d % 3}, {d * 7}.5" for d in range(1, 29)]
    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.train_from_iterator(["\n".join(lines)] * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                                                              show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    header = "Date | Shop | Amount"
    for budget in (20, 45, 80, 120):
        (fitted,) = fit_texts(tok, header, ["\n".join(lines)], budget)
        assert fitted.n_tokens == count_tokens(tok, [fitted.text])[0] <= budget
        assert fitted.text.split("\n")[1:] == (lines[len(lines) - fitted.n_events:] if fitted.n_events else [])


def _smollm2_or_skip():
    from producers.stores.cache import default_cache_dir

    try:
        from producers.shared.models import DEFAULT_MODEL, load_tokenizer, resolve_model

        return load_tokenizer(resolve_model(DEFAULT_MODEL, cache_dir=default_cache_dir()))
    except Exception as e:  # noqa: BLE001 - not cached here: the byte-level fixture tokenizer still runs
        pytest.skip(f"SmolLM2 tokenizer not available: {e}")


@pytest.mark.parametrize("which", ["fixture", "smollm2"])
def test_line_counting_gives_the_texts_and_counts_of_whole_text_counting(tok, which):
    """The fast path (lines counted from the newest back) against tokenizing every text whole
    with offsets: the same texts, the same counts, for every budget."""
    import random

    from producers.serialize.budget import _fit_by_offsets, line_counts, splits_at_line_breaks

    tokenizer = tok if which == "fixture" else _smollm2_or_skip()
    assert splits_at_line_breaks(tokenizer)
    rng = random.Random(0)
    words = ["Toy Story", "Heroes", "Grocery Stores, Supermarkets", "  spaced", "café", "日本", "x\ty", "1995",
             "-2245.92", "", "a  b", "<td>", "'s", "e\u00a0", "!!"]
    bodies = []
    for n in (1, 2, 5, 30, 120):
        for _ in range(6):
            lines = [f"2019-01-{rng.randrange(1, 29):02d} {rng.randrange(24):02d}:00, "
                     + ", ".join(rng.choice(words) for _ in range(rng.randrange(1, 4))) for _ in range(n)]
            bodies.append("\n".join(lines))
    bodies += ["", "last ends in a space \nnext", "2019-01-01, 5"]
    header = "Date | Title | Year | Genres | Rating"
    plain = [b.split("\n") for b in bodies if b and "space \n" not in b and "\u00a0" not in b]
    whole = count_tokens(tokenizer, ["\n" + "\n".join(x) for x in plain])
    assert [sum(c) for c in line_counts(tokenizer, plain)] == whole
    for budget in (12, 40, 100, 400, 5000):
        fast = fit_texts(tokenizer, header, bodies, budget)
        assert fast == _fit_by_offsets(tokenizer, header, bodies, budget), budget
        assert [f.n_tokens for f in fast] == count_tokens(tokenizer, [f.text for f in fast])
