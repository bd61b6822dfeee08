"""Session intents: taxonomy from an LLM, LLM labels (cached, resumable), a classifier distilled from them.

The LLM is a fake that behaves like a competent one: it reads the ratings in the session text and
answers summaries, taxonomies and labels from them (with the markup real models add). Sessions are
cut by hand from the MovieLens fixture (3 ratings each); their embeddings carry the mean rating's
class plus noise, so a distilled classifier can recover the LLM's labels.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from datetime import datetime

import numpy as np
import pyarrow.parquet as pq
import pytest

from producers.datasets.definition import load_builtin
from producers.enrich.backends import GenerationError, LocalBackend
from producers.enrich.options import LLMOptions
from producers.ingest import IngestConfig, ingest
from producers.intents import (
    DistillConfig,
    IntentsError,
    LabelConfig,
    TaxonomyConfig,
    build_taxonomy,
    distill_intents,
    label_sessions,
    parse_label,
    parse_taxonomy,
    read_provenance,
    read_session_texts,
)
from producers.intents.session_text import SessionEvent, SessionHead, format_offset, format_session
from producers.stores.warehouse import Home, stored_definition
from tests.fixtures.movielens_files import write_grouplens

DATASET, SCHEMA = "movielens-100k", "movielens_100k"
PER_SESSION = 3
CLASSES = ["enthusiast", "critic", "mixed_feelings"]


def planted(ratings: list[int]) -> str:
    mean = sum(ratings) / len(ratings)
    return "enthusiast" if mean >= 3.5 else "critic" if mean <= 2.5 else "mixed_feelings"


class FakeLLM:
    """Answers the intent prompts from the `Rating: N` values in them, like a competent model would."""

    name = "fake"
    model = "fake-llm"

    def __init__(self, batch_size: int = 4, die_after: int | None = None, junk: bool = False,
                 junk_refine: bool = False, unparsable_critic: bool = False):
        self.batch_size, self.die_after, self.junk = batch_size, die_after, junk
        self.junk_refine, self.unparsable_critic = junk_refine, unparsable_critic
        self.calls = self.prompts = 0

    def prompt_tokenizer(self):
        return None

    def generate(self, prompts, seeds):
        self.calls += 1
        if self.die_after is not None and self.calls > self.die_after:
            raise KeyboardInterrupt("killed")
        self.prompts += len(prompts)
        return [self.answer(p[-1]["content"]) for p in prompts]

    def answer(self, text: str) -> str:
        if self.junk:
            return "I'm sorry, I cannot help with that."
        if text.startswith("Intent labels"):
            session = text.split("Here is one session", 1)[1]
            label = planted([int(x) for x in re.findall(r"Rating: (\d)", session)])
            if label == "critic" and self.unparsable_critic:
                return "Hard to say."
            return {"enthusiast": "**Enthusiast**.", "critic": "The label is: critic",
                    "mixed_feelings": "mixed feelings"}[label]
        if "Revise the taxonomy" in text:
            if self.junk_refine:
                return "Sure! Let me think about it."
            return ("Revised taxonomy:\n\n| Label | Description |\n|---|---|\n"
                    "| enthusiast | Rates movies they loved |\n| critic | Pans movies they disliked |\n"
                    "| mixed_feelings | Gives both high and low ratings |")
        if "Propose a taxonomy" in text:
            lines = ["Here is the taxonomy:", ""]
            if "loved" in text:
                lines.append("1. **Enthusiast**: rates movies they loved")
            if "disliked" in text:
                lines.append("2. Critic - pans movies they disliked")
            if "mixed" in text:
                lines.append("- `mixed_feelings` — gives both high and low ratings")
            return "\n".join(lines)
        if text.startswith("Here is one session"):
            label = planted([int(x) for x in re.findall(r"Rating: (\d)", text)])
            return {"enthusiast": "The visitor rated movies they loved.\nMore text.",
                    "critic": "The visitor panned movies they disliked.",
                    "mixed_feelings": "The visitor gave mixed ratings."}[label]
        raise AssertionError(f"unexpected prompt: {text[:80]}")


class Raising(FakeLLM):
    def generate(self, prompts, seeds):
        out = super().generate(prompts, seeds)
        return [GenerationError("server down") if i == 0 else a for i, a in enumerate(out)]


def build_session_tables(home: Home, embeddings: bool = True) -> None:
    con = home.connect()
    try:
        s = f'"{SCHEMA}"'
        con.execute(f"""CREATE TABLE {s}.session_events AS
            WITH e AS (SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY event_time, movie_id) - 1 AS rn
                       FROM {s}.events)
            SELECT CAST(user_id AS VARCHAR) || '#' || (rn // {PER_SESSION} + 1) AS session_id, user_id,
                   CAST(rn % {PER_SESSION} + 1 AS INTEGER) AS position, event_time,
                   coalesce(epoch(event_time) - epoch(lag(event_time) OVER (PARTITION BY user_id, rn // {PER_SESSION}
                            ORDER BY rn)), 0) AS gap_s,
                   movie_id, title, year, genres, rating
            FROM e""")
        con.execute(f"""CREATE TABLE {s}.sessions AS
            SELECT session_id, any_value(user_id) AS user_id,
                   CAST(split_part(session_id, '#', 2) AS INTEGER) AS session_index,
                   min(event_time) AS start_time, max(event_time) AS end_time, CAST(count(*) AS INTEGER) AS n_events,
                   epoch(max(event_time)) - epoch(min(event_time)) AS duration_s
            FROM {s}.session_events GROUP BY session_id""")
        if embeddings:
            rows = con.execute("SELECT session_id, any_value(user_id), max(event_time), "
                               "list(rating ORDER BY position) "
                               f"FROM {s}.session_events GROUP BY session_id ORDER BY session_id").fetchall()
            rng = np.random.default_rng(0)
            vecs = []
            for _, _, _, ratings in rows:
                v = rng.normal(0, 0.4, 8)
                v[CLASSES.index(planted(ratings))] += 2.0
                vecs.append(v.astype(np.float32).tolist())
            con.execute(f"CREATE TABLE {s}.session_embeddings (session_id VARCHAR, user_id BIGINT, "
                        "session_end TIMESTAMP, embedding FLOAT[])")
            con.executemany(f"INSERT INTO {s}.session_embeddings VALUES (?, ?, ?, ?)",
                            [(r[0], r[1], r[2], v) for r, v in zip(rows, vecs)])
    finally:
        con.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("intents")
    source = write_grouplens(root / "ml-100k")
    home = Home.resolve(root / "home")
    ingest(home, load_builtin(DATASET), IngestConfig(source=source))
    build_session_tables(home)
    return home


@pytest.fixture
def home(base, tmp_path):
    """A private copy of the prepared home: tests write taxonomies and labels."""
    shutil.copytree(base.root, tmp_path / "home")
    return Home.resolve(tmp_path / "home")


def sessions_of(home: Home) -> dict[str, list[int]]:
    con = home.connect(read_only=True)
    try:
        rows = con.execute(f'SELECT session_id, list(rating ORDER BY position) FROM "{SCHEMA}".session_events '
                           "GROUP BY session_id").fetchall()
    finally:
        con.close()
    return dict(rows)


TAX = TaxonomyConfig(sample_size=12, rounds=3, max_labels=5, seed=1, progress=False)


# ---------------------------------------------------------------------------------------------
# Parsers and session text
# ---------------------------------------------------------------------------------------------


def test_parse_taxonomy_takes_messy_answers():
    text = """Sure! Here is the taxonomy:

**Intents:**
1. **Card Activation**: Activating a newly received card.
2) `loan_inquiry` - Looking at loan offers
- Browse Offers — comparing products without a goal
* **compare_rates:** checks interest rates
label_name: one-line description
Card activation: a duplicate, dropped
This line is a long sentence that happens to contain a colon: and is prose, not a label
| Label | Description |
|---|---|
| fraud_report | Reporting a suspicious payment |
just_a_name
"""
    labels = parse_taxonomy(text, max_labels=10)
    assert [(lb.name, lb.description) for lb in labels] == [
        ("card_activation", "Activating a newly received card"),
        ("loan_inquiry", "Looking at loan offers"),
        ("browse_offers", "comparing products without a goal"),
        ("compare_rates", "checks interest rates"),
        ("fraud_report", "Reporting a suspicious payment"),
        ("just_a_name", ""),
    ]
    assert [lb.name for lb in parse_taxonomy(text, max_labels=2)] == ["card_activation", "loan_inquiry"]
    assert parse_taxonomy("I cannot do that.", 8) == [] and parse_taxonomy("", 8) == []


def test_parse_label_is_case_and_punctuation_insensitive():
    names = ["card", "card_payment", "browse_offers"]
    assert parse_label("card_payment", names) == "card_payment"
    assert parse_label("**Card Payment**.", names) == "card_payment"
    assert parse_label("Label: browse offers (maybe card)", names) == "browse_offers"
    assert parse_label("I'd say card, or browse_offers", names) == "card"
    assert parse_label("cardholder stuff", names) is None and parse_label("", names) is None


def test_format_session_is_compact_and_cut():
    head = SessionHead("u#1", datetime(2024, 3, 2, 10, 0), 240.0, 7)
    events = [SessionEvent(0, [("Page type", "home")]),
              SessionEvent(35, [("Page type", "product"), ("Page", "cards/cashback"), ("Dwell", "42.0")])]
    events += [SessionEvent(60 + i, [("Page", "x" * 20)]) for i in range(5)]
    text = format_session(head, events, "website clicks", max_events=3)
    assert text.splitlines() == ["Session of 7 website clicks on 2024-03-02, 4 min", "+0s | Page type: home",
                                 "+35s | Page type: product | Page: cards/cashback | Dwell: 42.0",
                                 "+1m00s | Page: xxxxxxxxxxxxxxxxxxxx", "... (4 more)"]
    short = format_session(head, events, "website clicks", max_events=30, max_chars=120)
    assert len(short) <= 140 and short.endswith("more)")
    assert format_offset(3 * 3600 + 120) == "+3h02m" and format_offset(2 * 86400 + 3600) == "+2d01h"


def test_read_session_texts_from_the_warehouse(base):
    con = base.connect(read_only=True)
    try:
        d = stored_definition(con, DATASET)
        (sid,) = con.execute(f'SELECT session_id FROM "{SCHEMA}".sessions ORDER BY session_id LIMIT 1').fetchone()
        texts = read_session_texts(con, d, [sid, "nope#1"])
    finally:
        con.close()
    assert list(texts) == [sid]
    lines = texts[sid].splitlines()
    assert re.fullmatch(r"Session of 3 movie ratings on \d{4}-\d\d-\d\d, .+", lines[0])
    assert len(lines) == 4 and lines[1].startswith("+0s | Title: ")
    assert all("Movie ID" not in ln for ln in lines)  # serialize: false
    assert all(re.search(r"\| Genres: .+ \| Rating: [1-5]$", ln) for ln in lines[1:])


# ---------------------------------------------------------------------------------------------
# Taxonomy
# ---------------------------------------------------------------------------------------------


def test_build_taxonomy_stores_versions_and_markdown(home):
    llm = FakeLLM()
    first = build_taxonomy(home, DATASET, TAX, backend=llm)
    assert first.version == 1 and [x["name"] for x in first.labels] == CLASSES
    assert [r["kind"] for r in first.rounds] == ["propose", "refine", "refine"]
    sampled = [s for r in first.rounds for s in r["sessions"]]
    assert len(sampled) == len(set(sampled)) == 36  # rounds sample different sessions
    assert llm.prompts == 36 + 3
    md = first.report_path.read_text()
    assert first.report_path == home.root / "reports" / "intents" / SCHEMA / "taxonomy-v1.md"
    assert "| 1 | `enthusiast` | Rates movies they loved |" in md and "fake-llm" in md
    again = build_taxonomy(home, DATASET, TAX, backend=FakeLLM())
    assert again.version == 2
    assert [r["sessions"] for r in again.rounds] == [r["sessions"] for r in first.rounds]  # same seed, same sample
    con = home.connect(read_only=True)
    try:
        rows = con.execute('SELECT version, model, prompt_version, labels, sample_seed '
                           f'FROM "{SCHEMA}".intent_taxonomies ORDER BY version').fetchall()
    finally:
        con.close()
    assert [r[0] for r in rows] == [1, 2] and rows[0][1] == "fake-llm" and rows[0][2] == "intents/v1"
    assert [x["name"] for x in json.loads(rows[1][3])] == CLASSES and rows[1][4] == 1


def test_a_junk_round_keeps_the_previous_taxonomy(home):
    result = build_taxonomy(home, DATASET, TAX, backend=FakeLLM(junk_refine=True))
    assert [x["name"] for x in result.labels] == CLASSES
    assert [r["kept_previous"] for r in result.rounds] == [False, True, True]
    assert result.rounds[1]["raw"].startswith("Sure!")
    assert "kept the previous taxonomy" in result.report_path.read_text()


def test_build_taxonomy_errors(home, tmp_path):
    with pytest.raises(IntentsError, match="no taxonomy of at least 2 labels"):
        build_taxonomy(home, DATASET, TAX, backend=FakeLLM(junk=True))
    with pytest.raises(IntentsError, match="max_labels"):
        build_taxonomy(home, DATASET, replace(TAX, max_labels=1), backend=FakeLLM())
    bare = Home.resolve(tmp_path / "bare")
    shutil.copytree(home.root, bare.root)
    con = bare.connect()
    con.execute(f'DROP TABLE "{SCHEMA}".sessions')
    con.close()
    with pytest.raises(IntentsError, match=f"run `llm4es sessions build {DATASET}`"):
        build_taxonomy(bare, DATASET, TAX, backend=FakeLLM())


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


def stored_labels(home: Home) -> dict[str, tuple]:
    con = home.connect(read_only=True)
    try:
        rows = con.execute(
            f'SELECT session_id, label, raw, mode, latency_s FROM "{SCHEMA}".intent_llm_labels').fetchall()
    finally:
        con.close()
    return {r[0]: r[1:] for r in rows}


def test_label_parses_answers_and_resumes_a_killed_run(home):
    with pytest.raises(IntentsError, match="intents build"):
        label_sessions(home, DATASET, LabelConfig(progress=False), backend=FakeLLM())
    build_taxonomy(home, DATASET, TAX, backend=FakeLLM())
    truth = sessions_of(home)
    config = LabelConfig(sample_size=30, seed=3, progress=False)
    with pytest.raises(KeyboardInterrupt):
        label_sessions(home, DATASET, config, backend=FakeLLM(batch_size=4, die_after=3))
    assert len(stored_labels(home)) == 12  # three batches of 4 were written before the kill
    llm = FakeLLM(batch_size=4)
    result = label_sessions(home, DATASET, config, backend=llm)
    assert (result.sampled, result.from_cache, result.generated, llm.prompts) == (30, 12, 18, 18)
    assert result.labelled == 30 and result.unparsable == 0 and sum(result.distribution.values()) == 30
    stored = stored_labels(home)
    assert len(stored) == 30 and all(label == planted(truth[s]) for s, (label, *_) in stored.items())
    assert all(mode == "generate" and latency >= 0 for _, _, mode, latency in stored.values())
    rerun = label_sessions(home, DATASET, config, backend=FakeLLM())
    assert (rerun.from_cache, rerun.generated) == (30, 0)
    bigger = label_sessions(home, DATASET, replace(config, sample_size=40), backend=FakeLLM())
    assert (bigger.from_cache, bigger.generated) == (30, 10)  # a larger sample extends the smaller one


def test_unparsable_answers_are_kept_as_null_and_failures_retried(home):
    build_taxonomy(home, DATASET, TAX, backend=FakeLLM())
    result = label_sessions(home, DATASET, LabelConfig(sample_size=20, progress=False),
                            backend=FakeLLM(unparsable_critic=True))
    stored = stored_labels(home)
    nulls = {s: raw for s, (label, raw, *_) in stored.items() if label is None}
    assert result.unparsable == len(nulls) > 0 and result.distribution["<unparsable>"] == len(nulls)
    assert set(nulls.values()) == {"Hard to say."}
    assert result.labelled + result.unparsable == 20
    again = label_sessions(home, DATASET, LabelConfig(sample_size=25, progress=False), backend=Raising(batch_size=5))
    assert again.failed == 1 and again.from_cache == 20 and len(stored_labels(home)) == 24


# ---------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------


def test_distill_recovers_planted_labels_and_writes_session_intents(home):
    with pytest.raises(IntentsError, match="intents label"):
        distill_intents(home, DATASET, DistillConfig(progress=False), backend=FakeLLM())
    build_taxonomy(home, DATASET, TAX, backend=FakeLLM())
    label_sessions(home, DATASET, LabelConfig(sample_size=0, progress=False), backend=FakeLLM(batch_size=8))
    llm = FakeLLM()
    result = distill_intents(home, DATASET, DistillConfig(llm_latency_sessions=4, progress=False), backend=llm)
    n = len(sessions_of(home))
    assert result.trained_labels == CLASSES and result.n_labelled == n
    assert result.n_test == pytest.approx(n * 0.25, abs=1)
    assert result.macro_f1 > 0.8 and result.micro_f1 > 0.8  # chance is ~0.33
    assert sum(map(sum, result.confusion)) == result.n_test
    assert result.llm_sessions == 4 and llm.prompts == 5 and result.llm_seconds_per_session is not None
    assert result.classifier_seconds_per_session > 0 and result.llm_cached_seconds_per_session is not None
    con = home.connect(read_only=True)
    try:
        rows = con.execute(f'SELECT session_id, label, probabilities, taxonomy_version, user_id, session_end '
                           f'FROM "{SCHEMA}".session_intents').fetchall()
        meta = json.loads(con.execute(f'SELECT provenance FROM "{SCHEMA}".session_intents_meta').fetchone()[0])
    finally:
        con.close()
    assert len(rows) == n == result.n_predicted
    for _, label, probs, version, user, end in rows:
        assert len(probs) == 3 and sum(probs) == pytest.approx(1, abs=1e-5) and version == 1
        assert label == CLASSES[int(np.argmax(probs))] and user is not None and end is not None
    truth = sessions_of(home)
    agree = np.mean([label == planted(truth[s]) for s, label, *_ in rows])
    assert agree > 0.85
    prov = read_provenance(result.parquet_path)
    assert prov["taxonomy_version"] == 1 and prov["llm_models"] == ["fake-llm (generate)"]
    assert prov["labels"] == CLASSES and meta["classifier"] == prov["classifier"] and "code_version" in prov
    assert pq.read_table(result.parquet_path).num_rows == n
    assert json.loads(result.report_json.read_text())["metrics"]["macro_f1"] == pytest.approx(result.macro_f1)
    md = result.report_md.read_text()
    assert "macro F1" in md and "Confusion matrix" in md and "`mixed_feelings`" in md


def test_distill_needs_embeddings_and_two_labels(home):
    build_taxonomy(home, DATASET, TAX, backend=FakeLLM())
    label_sessions(home, DATASET, LabelConfig(sample_size=2, progress=False), backend=FakeLLM())
    with pytest.raises(IntentsError, match="a classifier needs 2 labels or more"):
        distill_intents(home, DATASET, DistillConfig(progress=False), backend=FakeLLM())
    con = home.connect()
    con.execute(f'DROP TABLE "{SCHEMA}".session_embeddings')
    con.close()
    with pytest.raises(IntentsError, match=f"run `llm4es sessions embed {DATASET}`"):
        distill_intents(home, DATASET, DistillConfig(progress=False), backend=FakeLLM())


# ---------------------------------------------------------------------------------------------
# Score mode with a real (tiny, random) local model
# ---------------------------------------------------------------------------------------------


def test_score_mode_with_a_tiny_local_model_always_gives_a_label(home, tmp_path):
    from tests.fixtures.tiny_model import save_tiny_model

    build_taxonomy(home, DATASET, TAX, backend=FakeLLM())
    folder = save_tiny_model(tmp_path / "tiny", max_positions=4096)
    options = LLMOptions(model=str(folder), batch_size=3)
    config = LabelConfig(sample_size=6, mode="score", llm=options, progress=False)
    result = label_sessions(home, DATASET, config, backend=LocalBackend(options))
    assert result.labelled == 6 and result.unparsable == 0 and result.mode == "score"
    stored = stored_labels(home)
    assert all(label in CLASSES and mode == "score" for label, _, mode, _ in stored.values())
    scores = json.loads(next(iter(stored.values()))[1])
    assert set(scores) == set(CLASSES) and all(v < 0 for v in scores.values())
    with pytest.raises(IntentsError, match="local back end"):
        label_sessions(home, DATASET, replace(config, llm=replace(options, backend="openai")))
    with pytest.raises(IntentsError, match="scores choices"):
        label_sessions(home, DATASET, config, backend=FakeLLM())


# ---------------------------------------------------------------------------------------------
# A person's taxonomy, the word-overlap labeller, one labeller per distillation
# ---------------------------------------------------------------------------------------------


def test_a_reviewed_taxonomy_file_goes_back_in_as_the_next_version(home, tmp_path):
    from producers.intents import import_taxonomy

    built = build_taxonomy(home, DATASET, TAX, backend=FakeLLM())
    edited = built.report_path.read_text().replace("mixed_feelings", "lukewarm")  # a person renames one label
    path = tmp_path / "reviewed.md"
    path.write_text(edited)
    imported = import_taxonomy(home, DATASET, path)
    assert imported.version == built.version + 1 and imported.backend == "person"
    assert [lb["name"] for lb in imported.labels] == ["enthusiast", "critic", "lukewarm"]
    assert [lb["description"] for lb in imported.labels] == [lb["description"] for lb in built.labels]
    assert import_taxonomy(home, DATASET, path).version == imported.version  # the same file: the same version
    (tmp_path / "one.txt").write_text("only_one: a single label\n")
    with pytest.raises(IntentsError, match="at least 2 lines"):
        import_taxonomy(home, DATASET, tmp_path / "one.txt")


def test_the_word_overlap_labeller_picks_the_label_sharing_the_most_words():
    from producers.intents.lexical import LexicalBackend, best_label, words
    from producers.intents.prompts import Label, label_prompt, summarise_prompt

    assert words("Mortgages/refinance_rates") == ["mortgage", "refinance", "rate"]
    labels = [("home_loans", "mortgages, mortgage rates"), ("cards", "credit cards, rewards, rates")]
    assert best_label(labels, "Page: mortgage/30-year-fixed | Page: rates/mortgage") == "home_loans"
    assert best_label(labels, "Page: cards/cashback | Query: best rewards card") == "cards"
    assert best_label(labels, "Page: careers") is None  # no shared word: no label rather than a guess
    backend = LexicalBackend()
    prompt = label_prompt("website clicks", [Label(*lb) for lb in labels], "Page: cards/travel-rewards")
    answer, refused = backend.generate([prompt, summarise_prompt("website clicks", "Page: cards")], [0, 0])
    assert answer == "cards" and isinstance(refused, GenerationError)


def test_distill_learns_one_labellers_labels(home):
    build_taxonomy(home, DATASET, TAX, backend=FakeLLM())
    label_sessions(home, DATASET, LabelConfig(sample_size=0, progress=False), backend=FakeLLM(batch_size=8))

    class Contrarian(FakeLLM):  # another model, labelling every session "critic"
        model = "contrarian"

        def answer(self, text):
            return "critic" if text.startswith("Intent labels") else super().answer(text)

    label_sessions(home, DATASET, LabelConfig(sample_size=0, progress=False), backend=Contrarian())
    result = distill_intents(home, DATASET, DistillConfig(llm_latency_sessions=0, progress=False), backend=FakeLLM())
    assert result.macro_f1 > 0.8 and result.trained_labels == CLASSES  # fake-llm's labels, not the contrarian's

    class Nobody(FakeLLM):
        model = "nobody"

    with pytest.raises(IntentsError, match="no parsed intent label by nobody"):
        distill_intents(home, DATASET, DistillConfig(progress=False), backend=Nobody())


def test_storing_a_batch_of_labels_is_one_insert_not_one_per_row(tmp_path):
    """executemany ran one INSERT per row (~1 s per 64-row batch: 112 of 139 s when the lexical labeller labelled
    every bank-clickstream session); a repeated key still ends as its last row, NULL labels stay NULL."""
    import duckdb

    from producers.intents.store import store_labels

    class Counting:  # the connection, counting the statements sent (speed itself belongs in benchmarks)
        def __init__(self, con):
            self.con, self.statements = con, 0

        def execute(self, *args, **kwargs):
            self.statements += 1
            return self.con.execute(*args, **kwargs)

        def executemany(self, sql, rows):
            self.statements += len(rows)
            return self.con.executemany(sql, rows)

        def __getattr__(self, name):
            return getattr(self.con, name)

    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    con.execute("CREATE SCHEMA s")
    now = datetime(2025, 1, 1)
    rows = [(f"s{i:05d}", 1, None if i % 7 == 0 else "a", "raw", "lexical", "m", "generate", "h", 0.001, now)
            for i in range(3000)]
    counting = Counting(con)
    store_labels(counting, "s", rows)
    assert counting.statements <= 3  # the table's DDL and one INSERT, not one statement per row
    store_labels(con, "s", [("s00001", 1, "b", "again", "lexical", "m", "generate", "h", None, now),
                            ("s00001", 1, "c", "last", "lexical", "m", "generate", "h", 0.5, now)])
    assert con.execute("SELECT count(*), count(label) FROM s.intent_llm_labels").fetchall() == [(3000, 3000 - 429)]
    assert con.execute("SELECT label, raw, latency_s FROM s.intent_llm_labels WHERE session_id = 's00001'"
                       ).fetchall() == [("c", "last", 0.5)]


def test_the_label_cache_table_has_label_rows_columns_and_key(tmp_path):
    """LABEL_COLUMNS is the one statement of the cache's columns: the DDL, LabelRow and the Arrow insert
    follow it, and a repeated key keeps the last answer."""
    import duckdb

    from producers.intents.store import LABEL_COLUMNS, LABELS, LabelRow, store_labels

    assert LabelRow._fields == tuple(LABEL_COLUMNS)
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    con.execute('CREATE SCHEMA "s"')
    at = datetime(2026, 11, 29, 1, 2, 3)
    row = LabelRow("s1", 1, "browse", "raw", "lexical", "m", "generate", "h", 0.5, at)
    store_labels(con, "s", [row, row._replace(label="buy"), row._replace(session_id="s2", latency_s=None)])
    described = con.execute(f'DESCRIBE "s".{LABELS}').fetchall()
    assert {name: sql_type for name, sql_type, *_ in described} == LABEL_COLUMNS
    stored = con.execute(f'SELECT * FROM "s".{LABELS} ORDER BY session_id').fetchall()
    assert [LabelRow(*r) for r in stored] == [row._replace(label="buy"), row._replace(session_id="s2", latency_s=None)]
