"""The synthetic bank clickstream: deterministic, well-formed, intents planted so they can be recovered."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from producers.cli import cli
from producers.ingest.default_sources import GENERATED_MARKER, fetch_default_source
from producers.datasets.definition import load_builtin
from producers.ingest import IngestConfig, ingest
from producers.synthetic.clickstream import (
    CLICKS_COLUMNS,
    FILES,
    INTENT_PAGES,
    NOISE_PAGES,
    PAGE_TYPES,
    PLANTED_INTENTS,
    ClickstreamConfig,
    ClickstreamError,
    generate_clickstream,
    write_clickstream,
)
from validation.run import ValidateConfig, validate

SMALL = ClickstreamConfig(visitors=60, seed=11)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("clicks")
    result = write_clickstream(out, SMALL)
    return result, {name: pd.read_csv(out / name, keep_default_na=False) for name in FILES if name.endswith(".csv")}


def test_same_seed_same_bytes_other_seed_differs(tmp_path, small):
    first, _ = small
    again = write_clickstream(tmp_path / "again", SMALL)
    other = write_clickstream(tmp_path / "other", ClickstreamConfig(visitors=SMALL.visitors, seed=SMALL.seed + 1))
    for name in FILES:
        assert (again.out_dir / name).read_bytes() == (first.out_dir / name).read_bytes(), name
    assert (other.out_dir / "clicks.csv").read_bytes() != (first.out_dir / "clicks.csv").read_bytes()
    assert not list(first.out_dir.glob(".*tmp")), "temporary files left behind"


def test_files_and_columns(small):
    result, t = small
    clicks, visitors, intents = t["clicks.csv"], t["visitors.csv"], t["planted_intents.csv"]
    assert list(clicks.columns) == CLICKS_COLUMNS
    assert list(visitors.columns) == ["visitor_id", "opened_product", "segment", "region"]
    assert list(intents.columns) == ["session_id", "intent"]
    assert (result.n_visitors, result.n_sessions, result.n_events) == (len(visitors), len(intents), len(clicks))
    assert sorted(visitors.visitor_id) == list(range(1, SMALL.visitors + 1))
    assert set(visitors.opened_product) <= {0, 1}
    assert set(clicks.page_type) <= set(PAGE_TYPES)
    assert set(clicks.device) <= {"desktop", "mobile", "tablet"}
    assert clicks.dwell_s.between(1, 1500).all()
    pd.to_datetime(clicks.ts, format="%Y-%m-%dT%H:%M:%S")  # every ts parses
    # Queries only on search events, and (nearly) every search has one.
    searches = clicks.page_type == "search"
    assert (clicks.loc[~searches, "query"] == "").all()
    assert (clicks.loc[searches, "query"] != "").all() and searches.any()
    readme = (result.out_dir / "README.txt").read_text()
    assert all(name in readme for name in PLANTED_INTENTS)
    assert f"{result.n_events:,} clicks" in readme


def test_sessions_belong_to_one_visitor_and_have_a_planted_intent(small):
    _, t = small
    clicks, intents = t["clicks.csv"], t["planted_intents.csv"]
    assert (clicks.groupby("session_id").visitor_id.nunique() == 1).all()
    assert intents.session_id.is_unique
    assert set(intents.session_id) == set(clicks.session_id)
    assert set(intents.intent) == set(PLANTED_INTENTS)  # 60 visitors meet every intent
    sizes = clicks.groupby("session_id").size()
    assert sizes.min() >= SMALL.min_events and sizes.max() <= SMALL.max_events
    # Clicks of a session are under 30 minutes apart; a visitor's sessions at least an hour apart.
    ts = pd.to_datetime(clicks.ts)
    within = ts.groupby(clicks.session_id).diff().dropna()
    assert within.min() >= pd.Timedelta(seconds=2) and within.max() < pd.Timedelta(minutes=30)
    spans = pd.DataFrame({"visitor": clicks.visitor_id, "session": clicks.session_id, "ts": ts}).groupby(
        ["visitor", "session"]).ts.agg(["min", "max"]).sort_values(["visitor", "min"]).reset_index()
    same_visitor = spans.visitor.eq(spans.visitor.shift())
    gaps = (spans["min"] - spans["max"].shift())[same_visitor]
    assert gaps.min() >= pd.Timedelta(hours=1)


def test_planted_intents_are_recoverable_from_pages():
    """A nearest-centroid classifier on page shares recovers the intent far above chance (1/6)."""
    data = generate_clickstream(ClickstreamConfig(visitors=150, seed=3))
    counts = pd.crosstab(data.clicks.session_id, data.clicks.page)
    x = (counts.T / counts.sum(axis=1)).T.to_numpy()
    y = data.intents.set_index("session_id").intent.loc[counts.index].to_numpy()
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[: len(y) // 2], order[len(y) // 2:]
    labels = sorted(PLANTED_INTENTS)
    centroids = np.stack([x[train][y[train] == label].mean(axis=0) for label in labels])
    predicted = np.array(labels)[((x[test][:, None, :] - centroids[None]) ** 2).sum(-1).argmin(axis=1)]
    accuracy = (predicted == y[test]).mean()
    assert accuracy > 0.8, accuracy
    # ... but not from one click: noise pages appear in every intent's sessions.
    noise = {p for _, p, _ in NOISE_PAGES}
    per_intent = data.clicks.merge(data.intents, on="session_id").groupby("intent").page.agg(set)
    assert all(noise & pages for pages in per_intent)
    assert 0.1 < data.noise_share < 0.3


def test_intent_page_tables_are_consistent():
    assert set(INTENT_PAGES) == set(PLANTED_INTENTS)
    for pages in [*INTENT_PAGES.values(), NOISE_PAGES]:
        assert all(t in PAGE_TYPES and w > 0 for t, _, w in pages)


def test_opened_product_follows_applications():
    data = generate_clickstream(ClickstreamConfig(visitors=400, seed=5))
    submitted = data.clicks[data.clicks.page.str.endswith("/submitted")].visitor_id.unique()
    opened = data.visitors.set_index("visitor_id").opened_product
    assert opened.loc[submitted].mean() > 2 * opened.drop(submitted).mean()


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ClickstreamError, match="visitors"):
        write_clickstream(tmp_path, ClickstreamConfig(visitors=0))
    with pytest.raises(ClickstreamError, match="noise_share"):
        generate_clickstream(ClickstreamConfig(noise_share=1.5))


def test_ingest_and_validate_through_the_builtin_definition(small, home):
    result, _ = small
    definition = load_builtin("bank-clickstream")
    assert definition.events.sessions.column == "session_id"
    assert "planted_intents" not in json.dumps(definition.model_dump(mode="json"))  # the answer stays aside
    r = ingest(home, definition, IngestConfig(source=result.out_dir))
    assert (r.n_events, r.n_users, r.n_rejects) == (result.n_events, result.n_visitors, 0)
    report = validate(home, "bank-clickstream", ValidateConfig(data_docs=False))
    assert report.success, [(c.check, c.examples, c.error) for c in report.failed]


def test_default_source_is_generated_once_and_regenerated_on_a_changed_marker(tmp_path, monkeypatch):
    import producers.synthetic.clickstream as clickstream

    calls = []
    real = clickstream.write_clickstream

    def small_write(out_dir, config):  # the default config, written small to stay fast
        calls.append(config)
        return real(out_dir, ClickstreamConfig(visitors=5))

    monkeypatch.setattr(clickstream, "write_clickstream", small_write)
    folder = fetch_default_source("bank-clickstream", tmp_path)
    assert folder == tmp_path / "datasets" / "bank-clickstream"
    assert all((folder / name).is_file() for name in FILES)
    assert len(calls) == 1 and calls[0] == ClickstreamConfig()  # the default config, seed 0
    assert fetch_default_source("bank-clickstream", tmp_path) == folder and len(calls) == 1  # cached
    (folder / GENERATED_MARKER).write_text(json.dumps({"generator_version": 0}))
    fetch_default_source("bank-clickstream", tmp_path)
    assert len(calls) == 2


def test_cli_writes_the_files(tmp_path):
    out = tmp_path / "synth"
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "--cache", str(tmp_path / "cache"),
                                      "synth-clicks", str(out), "--visitors", "20", "--seed", "4", "--days", "10"])
    assert result.exit_code == 0, result.output
    assert all((out / name).is_file() for name in FILES)
    assert "20 visitors" in result.output
    assert f"llm4es ingest bank-clickstream --source {out}" in result.output
    clicks = pd.read_csv(out / "clicks.csv")
    assert pd.to_datetime(clicks.ts).max() < pd.Timestamp("2024-01-11 06:00")
    # The CLI's defaults are the library's.
    params = {p.name: p.default for p in cli.commands["synth-clicks"].params}
    config = ClickstreamConfig()
    assert (params["visitors"], params["seed"], params["days"]) == (config.visitors, config.seed, config.days)
