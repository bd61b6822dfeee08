"""The compact serialization format: a date per day, numbers after a bare comma, runs collapsed."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from producers.datasets.definition import parse_definition
from producers.ingest import IngestConfig, ingest
from producers.serialize.render import ITEMS_PER_LINE
from producers.serialize.run import SerializeConfig, SerializeError, serialize
from tests.producers.test_serialize import ready, texts, tok  # noqa: F401 (module fixture)
from validation.run import ValidateConfig, validate

DAY = re.compile(r"^(\d{4}-\d{2}-)?(\d{2}): ")
STATES = """
name: states
tables: {months: {file: months.csv, delimiter: ","}}
events:
  table: months
  user: person
  user_dtype: BIGINT
  time: {column: month, format: "%Y-%m-%d", display: "%Y-%m-%d"}
  fields:
    - {name: state, label: State, kind: categorical, column: state}
    - {name: hours, label: Hours, kind: numeric, column: hours, dtype: INTEGER}
"""


def test_movielens_compact_keeps_every_event_in_fewer_tokens(home, grouplens, tok):  # noqa: F811
    ready(home, "movielens-100k", grouplens)
    paper = serialize(home, "movielens-100k", SerializeConfig(model="tiny", max_tokens=0), tokenizer=tok)
    paper_texts = texts(home, "movielens_100k")
    compact = serialize(home, "movielens-100k", SerializeConfig(model="tiny", max_tokens=0, format="compact"),
                        tokenizer=tok)
    got = texts(home, "movielens_100k")
    assert compact.n_events == paper.n_events == compact.n_events_total  # every event, counted as events
    for user, (text, n_events, n_tokens) in got.items():
        lines = text.split("\n")
        assert lines[0] == "Date | Title | Year | Genres | Rating"
        assert n_events == paper_texts[user][1]
        assert n_tokens < paper_texts[user][2]
        # each day once, in order (the day of the month alone within the month of the previous day line);
        # at most ITEMS_PER_LINE events a line
        days, month = [], None
        for line in lines[1:]:
            found = DAY.match(line)
            if found:
                month = found.group(1) or month
                days.append(f"{month}{found.group(2)}")
        assert days == sorted(days) and len(days) == len(set(days)) and lines[1].startswith("1997-")
        assert all(line.count("; ") < ITEMS_PER_LINE for line in lines[1:])
        # the paper's lines without the time, numbers after a bare comma, are all there, in order
        paper_events = [line[18:] for line in paper_texts[user][0].split("\n")[1:]]
        flat = "; ".join(DAY.sub("", line) for line in lines[1:])
        assert flat.replace(",", ", ").replace(",  ", ", ") == "; ".join(paper_events)


def test_budget_counts_events_not_lines(home, grouplens, tok):  # noqa: F811
    ready(home, "movielens-100k", grouplens)
    full = serialize(home, "movielens-100k", SerializeConfig(model="tiny", max_tokens=0, format="compact"),
                     tokenizer=tok)
    r = serialize(home, "movielens-100k", SerializeConfig(model="tiny", max_tokens=200, format="compact"),
                  tokenizer=tok)
    assert r.n_cut > 0 and r.n_events < full.n_events
    for text, n_events, n_tokens in texts(home, "movielens_100k").values():
        assert n_tokens <= 200
        body = text.split("\n")[1:]
        assert n_events == sum(line.count("; ") + 1 for line in body)  # no runs among distinct movies


def test_runs_of_the_same_state_collapse_with_their_span(home, tmp_path, tok):  # noqa: F811
    rows = ["person,month,state,hours"]
    months = [f"{2021 + (m - 1) // 12}-{(m - 1) % 12 + 1:02d}-01" for m in range(1, 17)]
    states = ["Employed"] * 12 + ["Unemployed"] * 2 + ["Employed"] * 2
    rows += [f"1,{m},{s},{40 if s == 'Employed' else 0}" for m, s in zip(months, states)]
    rows += ["2,2021-05-03,Student,10", "2,2021-05-03,Student,10", "2,2021-05-03,Student,12"]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "months.csv").write_text("\n".join(rows) + "\n")
    ingest(home, parse_definition(STATES, "test"), IngestConfig(source=tmp_path / "src"))
    assert validate(home, "states", ValidateConfig(data_docs=False)).success
    r = serialize(home, "states", SerializeConfig(model="tiny", max_tokens=0, format="compact"), tokenizer=tok)
    got = texts(home, "states")
    assert r.n_events == 19 and got[1][1] == 16 and got[2][1] == 3
    assert got[1][0].split("\n") == ["Date | State | Hours",
                                     "2021-01-01 to 2021-12-01: Employed,40 x12",
                                     "2022-01-01 to 2022-02-01: Unemployed,0 x2",
                                     "2022-03-01 to 2022-04-01: Employed,40 x2"]
    # within one day: a run is one item with its count
    assert got[2][0].split("\n")[1] == "2021-05-03: Student,10 x2; Student,12"
    assert Counter(t.count("\n") for t, *_ in got.values()) == Counter({3: 1, 1: 1})


def test_an_unknown_format_is_refused(home, grouplens, tok):  # noqa: F811
    ready(home, "movielens-100k", grouplens)
    with pytest.raises(SerializeError, match="format must be one of paper, compact"):
        serialize(home, "movielens-100k", SerializeConfig(model="tiny", format="yaml"), tokenizer=tok)
