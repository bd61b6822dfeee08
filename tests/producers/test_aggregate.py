"""Aggregate features: checked against hand computations in plain Python from the fixture files."""
from __future__ import annotations

import csv
import json
import statistics
from collections import Counter, defaultdict
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest

from producers.aggregate import ACTIVITY, AggregateConfig, AggregateError, aggregate, slugify
from producers.datasets.definition import load_builtin
from producers.ingest import IngestConfig, ingest
from producers.stores.warehouse import Home, last_ingest
from tests.fixtures.bank_files import write_gender
from tests.fixtures.movielens_files import GENRES, read_ratings
from validation.gate import ValidationGateError
from validation.run import ValidateConfig, validate

SCHEMA = "movielens_100k"


def utc(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc).replace(tzinfo=None)


@pytest.fixture(scope="module")
def ml(validated_grouplens):
    """A validated grouplens fixture (ingest + validate once per module) and its raw ratings."""
    home, source = validated_grouplens
    # (user, movie, rating, unix time, year) per rating; genres per movie
    return home, read_ratings(source), movie_genres(source)


def rows(home: Home, table: str = "agg_features") -> tuple[list[str], dict[int, dict]]:
    con = home.connect(read_only=True)
    try:
        cur = con.execute(f"SELECT * FROM {SCHEMA}.{table} ORDER BY user_id")
        columns = [d[0] for d in cur.description]
        return columns, {r[0]: dict(zip(columns, r)) for r in cur.fetchall()}
    finally:
        con.close()


def top_movies(ratings, n: int) -> list[int]:
    counts = Counter(m for _, m, *_ in ratings)
    return sorted(counts, key=lambda m: (-counts[m], m))[:n]


def stats(values: list[float]) -> dict:
    return {"count": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "sum": sum(values)}


def movie_genres(folder) -> dict[int, list[str]]:
    """Each fixture movie's genres, as the built-in definition names them (from u.item's flags)."""
    out = {}
    for line in (folder / "u.item").read_text(encoding="latin-1").splitlines():
        cells = line.split("|")
        out[int(cells[0])] = [g for g, flag in zip(GENRES, cells[5:]) if flag == "1"]
    return out


def top_values(counts: Counter, n: int) -> list:
    return sorted(counts, key=lambda v: (-counts[v], v))[:n]


def per_value(rs, field: str, top: list, value_of) -> dict:
    """count, share and per-value means of year and rating for the user's ratings `rs`."""
    f = {}
    for v in top:
        hits = [r for r in rs if v in value_of(r)]
        f[f"{field}__{slugify(v)}_count"] = len(hits)
        f[f"{field}__{slugify(v)}_share"] = len(hits) / len(rs)
        f[f"{field}__{slugify(v)}_year_mean"] = statistics.fmean(r[4] for r in hits) if hits else None
        f[f"{field}__{slugify(v)}_rating_mean"] = statistics.fmean(r[2] for r in hits) if hits else None
    return f


def expected_features(ratings, genres, as_of: int, top_n: int = 20) -> dict[int, dict]:
    """Every feature of every user, computed in plain Python from the raw ratings."""
    seen = [r for r in ratings if r[3] <= as_of]
    top = top_movies(seen, top_n)
    top_genres = top_values(Counter(g for r in seen for g in genres[r[1]]), top_n)
    by_user = defaultdict(list)
    for r in seen:
        by_user[r[0]].append(r)
    out = {}
    for user, rs in by_user.items():
        times = [t for _, _, _, t, _ in rs]
        days = {utc(t).date() for t in times}
        f = {"user_id": user, "feature_timestamp": utc(as_of), "n_events": len(rs), "active_days": len(days),
             "span_days": (max(times) - min(times)) / 86400, "events_per_active_day": len(rs) / len(days),
             "recency_days": (as_of - max(times)) / 86400}
        for name, values in (("year", [y for *_, y in rs]), ("rating", [r for _, _, r, _, _ in rs])):
            f.update({f"{name}_{k}": v for k, v in stats(values).items()})
        movies = Counter(m for _, m, *_ in rs)
        f["movie_id_n_distinct"] = len(movies)
        f.update(per_value(rs, "movie_id", top, lambda r: (r[1],)))
        f["genres_n_distinct"] = len({g for r in rs for g in genres[r[1]]})
        f.update(per_value(rs, "genres", top_genres, lambda r: genres[r[1]]))
        out[user] = f
    return out


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)  # same columns, same order
    for k, v in want.items():
        if isinstance(v, float):
            assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-9), k
        else:
            assert got[k] == v, k


def test_every_feature_matches_a_hand_computation(ml):
    home, ratings, genres = ml
    # the fixture has 40 titles: a cap of 30 values makes the title free text, genres (18) stay
    result = aggregate(home, "movielens-100k", AggregateConfig(max_text_values=30))
    as_of = max(t for *_, t, _ in ratings)
    want = expected_features(ratings, genres, as_of)
    columns, got = rows(home)
    assert result.n_users == len(got) == len(want) == 12  # one row per user
    n_genres = len({g for gs in genres.values() for g in gs})
    assert result.as_of == utc(as_of)
    assert result.n_features == len(columns) - 2 == 17 + 1 + 20 * 4 + 1 + min(n_genres, 20) * 4
    assert columns == result.columns == list(next(iter(want.values())))
    assert columns[:2 + len(ACTIVITY)] == ["user_id", "feature_timestamp", *ACTIVITY]
    assert not any("title" in c for c in columns)  # free text is skipped
    assert any(c.startswith("genres__") and c.endswith("_rating_mean") for c in columns)  # mean rating per genre
    user = ratings[0][0]
    assert_same(got[user], want[user])
    for u in want:  # and the others too: it costs nothing
        assert_same(got[u], want[u])


def test_columns_are_stable_and_parquet_matches_the_table(ml):
    home, ratings, _ = ml
    first = aggregate(home, "movielens-100k")
    second = aggregate(home, "movielens-100k")
    assert first.columns == second.columns
    columns, got = rows(home)
    assert columns == second.columns
    table = pq.read_table(second.parquet_path)
    assert table.column_names == columns
    assert [tuple(r.values()) for r in table.to_pylist()] == [tuple(r.values()) for r in got.values()]
    assert not list(second.parquet_path.parent.glob("*.tmp"))
    # provenance: in the Parquet file and in the meta table, naming the ingest it was built from
    meta = json.loads(table.schema.metadata[b"llm4es"])
    con = home.connect(read_only=True)
    ingest_row = last_ingest(con, SCHEMA)
    (n, ingest_id, source_hash, config, cols, validated) = con.execute(
        f"SELECT count(*) OVER (), ingest_id, source_hash, config, columns, validation_passed "
        f"FROM {SCHEMA}.agg_features_meta").fetchone()
    con.close()
    assert n == 1 and ingest_id == meta["ingest_id"] == ingest_row["ingest_id"]
    assert source_hash == meta["source_hash"] == ingest_row["source_hash"]
    assert json.loads(cols) == meta["columns"] == columns and validated is True
    assert json.loads(config) == meta["config"] == {"top_n": 20, "max_text_values": 50,
                                                    "as_of": utc(max(r[3] for r in ratings)).isoformat(),
                                                    "amount_field": None, "force": False}
    assert meta["code_version"] and meta["produced_at"]


def test_top_n_categories_are_the_most_frequent(ml):
    home, ratings, _ = ml
    result = aggregate(home, "movielens-100k", AggregateConfig(top_n=3))
    top = top_movies(ratings, 3)
    assert [c for c in result.columns if c.startswith("movie_id__")] == [
        f"movie_id__{m}_{stat}" for m in top for stat in ("count", "share", "year_mean", "rating_mean")]
    assert [e["value"] for e in result.provenance["categories"]["movie_id"]] == top
    counts = Counter(m for _, m, *_ in ratings)
    _, got = rows(home)
    for m in top:
        assert sum(r[f"movie_id__{m}_count"] for r in got.values()) == counts[m]
    # nothing outside the top 3 is more frequent than the third
    assert all(counts[m] <= counts[top[-1]] for m in counts if m not in top)
    none = aggregate(home, "movielens-100k", AggregateConfig(top_n=0))
    assert "movie_id_n_distinct" in none.columns and not any(c.startswith("movie_id__") for c in none.columns)


def test_as_of_excludes_later_events(ml):
    home, ratings, genres = ml
    firsts = sorted({min(t for u2, _, _, t, _ in ratings if u2 == u) for u, *_ in ratings})
    cut = firsts[5]  # users whose first rating is later are absent
    result = aggregate(home, "movielens-100k", AggregateConfig(as_of=utc(cut), max_text_values=30))
    want = expected_features(ratings, genres, cut)
    columns, got = rows(home)
    assert result.as_of == utc(cut) and set(got) == set(want) and len(got) == 6
    assert {r["feature_timestamp"] for r in got.values()} == {utc(cut)}
    assert any(t > cut for *_, t, _ in ratings)
    for u in want:
        assert_same(got[u], want[u])
    # an aware as_of means the same instant
    aware = aggregate(home, "movielens-100k", AggregateConfig(as_of=datetime.fromtimestamp(cut, timezone.utc),
                                                              max_text_values=30))
    assert aware.as_of == utc(cut) and aware.n_users == 6
    with pytest.raises(AggregateError, match="no events at or before"):
        aggregate(home, "movielens-100k", AggregateConfig(as_of=datetime(1990, 1, 1)))


def test_unknown_amount_field_is_refused(ml):
    home, *_ = ml
    with pytest.raises(AggregateError, match="'price' is not a numeric event field"):
        aggregate(home, "movielens-100k", AggregateConfig(amount_field="price"))
    # an explicit numeric field works as the amount
    r = aggregate(home, "movielens-100k", AggregateConfig(top_n=2, amount_field="rating"))
    assert [c for c in r.columns if c.startswith("movie_id__")][2] == f"movie_id__{top_movies(ml[1], 1)[0]}_rating_sum"


def test_low_cardinality_text_counts_and_free_text_does_not(ml):
    home, ratings, _ = ml
    titles = aggregate(home, "movielens-100k", AggregateConfig(top_n=2))  # 40 fixture titles <= 50
    assert "title_n_distinct" in titles.columns and titles.provenance["config"]["max_text_values"] == 50
    assert len(titles.provenance["categories"]["title"]) == 2
    skipped: list[str] = []
    free = aggregate(home, "movielens-100k", AggregateConfig(top_n=2, max_text_values=39), skipped.append)
    assert not any(c.startswith("title") for c in free.columns) and "title" not in free.provenance["categories"]
    assert any("skipping text field title: 40 distinct values" in line for line in skipped)


def test_the_gate_refuses_unvalidated_data_unless_forced(home, grouplens):
    ingest(home, load_builtin("movielens-100k"), IngestConfig(source=grouplens))
    with pytest.raises(ValidationGateError, match="has not been validated"):
        aggregate(home, "movielens-100k")
    con = home.connect(read_only=True)
    assert con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name LIKE 'agg_features%'"
                       ).fetchone()[0] == 0
    con.close()
    forced = aggregate(home, "movielens-100k", AggregateConfig(force=True))
    assert forced.n_users == 12 and forced.provenance["validation_passed"] is None


def test_slugs_are_safe_identifiers():
    assert slugify("Sci-Fi") == "sci_fi" and slugify("0742") == "0742" and slugify(True) == "true"
    assert slugify("Переводы") == "value" and len(slugify("x" * 100)) == 40


def test_bank_amount_sums_per_mcc(home, tmp_path):
    source = write_gender(tmp_path / "gender")
    ingest(home, load_builtin("gender"), IngestConfig(source=source))
    assert validate(home, "gender", ValidateConfig(data_docs=False)).success
    result = aggregate(home, "gender")
    with open(source / "transactions.csv", encoding="utf-8") as f:
        txns = [(int(r["customer_id"]), r["mcc_code"].zfill(4), float(r["amount"])) for r in csv.DictReader(f)]
    counts = Counter(mcc for _, mcc, _ in txns)
    top = sorted(counts, key=lambda c: (-counts[c], c))[:20]
    mcc_cols = [c for c in result.columns if c.startswith("mcc__")]
    assert mcc_cols == [name for c in top for name in
                        (f"mcc__{c}_count", f"mcc__{c}_share", f"mcc__{c}_amount_sum", f"mcc__{c}_amount_mean")]
    sums, n = defaultdict(float), Counter()
    for user, mcc, amount in txns:
        sums[user, mcc] += amount
        n[user, mcc] += 1
    con = home.connect(read_only=True)
    cur = con.execute("SELECT * FROM gender.agg_features")
    cols = [d[0] for d in cur.description]
    got = {r[0]: dict(zip(cols, r)) for r in cur.fetchall()}
    con.close()
    assert set(got) == {u for u, _, _ in txns}
    for user, row in got.items():
        assert row["amount_sum"] == pytest.approx(sum(a for u, _, a in txns if u == user))
        assert row["mcc_n_distinct"] == len({m for u, m, _ in txns if u == user})
        for c in top:
            assert row[f"mcc__{c}_count"] == n[user, c]
            assert row[f"mcc__{c}_amount_sum"] == pytest.approx(sums[user, c], abs=1e-6)
            assert row[f"mcc__{c}_share"] == pytest.approx(n[user, c] / sum(1 for u, *_ in txns if u == user))
            mean = row[f"mcc__{c}_amount_mean"]
            assert mean is None if n[user, c] == 0 else mean == pytest.approx(sums[user, c] / n[user, c])


def test_a_refresh_reads_only_its_users_and_equals_a_full_run_for_them(validated_grouplens, tmp_path, monkeypatch):
    """A refresh of a few users: their rows equal a full run's at the same as-of and columns, the others'
    rows are untouched, and only the refreshed users' rows are written to the snapshot file."""
    import shutil

    import producers.aggregate as A
    from producers.ingest.append import append
    from tests.producers.test_append import new_ratings, write_delta

    home, source = validated_grouplens
    h = Home.resolve(tmp_path / "home")
    shutil.copytree(home.root, h.root)
    served = aggregate(h, "movielens-100k", AggregateConfig(top_n=5))
    full_file = served.parquet_path.read_bytes()
    _, before = rows(h)
    changed = [2, 5, 7]
    delta = write_delta(tmp_path / "delta", new_ratings(source, changed))
    append(h, load_builtin("movielens-100k"), IngestConfig(delta))
    assert validate(h, "movielens-100k", ValidateConfig(data_docs=False)).success
    as_of = scalar(h, f"SELECT max(event_time) FROM {SCHEMA}.events")

    def no_scan(*a, **k):
        raise AssertionError("a refresh must not scan every event to pick the grouping fields again")

    monkeypatch.setattr(A, "_grouping_fields", no_scan)
    config = AggregateConfig(top_n=5, as_of=as_of, users=tuple(changed), categories=served.provenance["categories"])
    refreshed = aggregate(h, "movielens-100k", config)
    monkeypatch.undo()

    file = pq.read_table(refreshed.parquet_path)
    assert file.column("user_id").to_pylist() == changed  # the snapshot holds the refreshed users only
    assert refreshed.parquet_path != served.parquet_path
    assert served.parquet_path.read_bytes() == full_file  # the full run's copy is not rewritten
    assert scalar(h, f"SELECT n_users FROM {SCHEMA}.agg_features_meta") == len(before)
    _, after = rows(h)
    assert {u: r for u, r in after.items() if u not in changed} == \
        {u: r for u, r in before.items() if u not in changed}
    assert all(after[u]["n_events"] == before[u]["n_events"] + 3 for u in changed)
    # a full run at the same as-of and columns computes the same rows for them
    aggregate(h, "movielens-100k", AggregateConfig(top_n=5, as_of=as_of, categories=served.provenance["categories"]))
    _, full = rows(h)
    for u in changed:
        assert after[u].keys() == full[u].keys()
        for k, v in full[u].items():
            assert after[u][k] == (pytest.approx(v) if isinstance(v, float) else v), (u, k)
    assert file.column("n_events").to_pylist() == [full[u]["n_events"] for u in changed]


def scalar(home: Home, sql: str):
    con = home.connect(read_only=True)
    try:
        return con.execute(sql).fetchone()[0]
    finally:
        con.close()


def test_the_sql_planned_does_not_grow_with_the_top_values(ml, monkeypatch):
    """The per-value columns (count, share, means per top value) are counted long, one row per user and value,
    and spread into columns afterwards: the engine plans a few aggregates, not three or four per value (planning
    a SELECT of a few hundred aggregates cost a refresh of 100 users more than running it)."""
    import re

    home, *_ = ml
    original = Home.connect

    def aggregates_per_statement(top_n: int) -> int:
        """The most aggregate calls in one statement an aggregate run sends (the full run and then a refresh)."""
        sent: list[str] = []

        class Recording:
            def __init__(self, con):
                self._con = con

            def execute(self, sql, *args, **kwargs):
                sent.append(sql)
                return self._con.execute(sql, *args, **kwargs)

            def sql(self, sql, *args, **kwargs):
                sent.append(sql)
                return self._con.sql(sql, *args, **kwargs)

            def __getattr__(self, name):
                return getattr(self._con, name)

        monkeypatch.setattr(Home, "connect", lambda self, *a, **k: Recording(original(self, *a, **k)))
        full = aggregate(home, "movielens-100k", AggregateConfig(top_n=top_n))
        refreshed = aggregate(home, "movielens-100k", AggregateConfig(
            top_n=top_n, users=(1, 2), categories=full.provenance["categories"]))
        monkeypatch.setattr(Home, "connect", original)
        assert refreshed.n_users == 2 and len(full.columns) > 4 * top_n
        return max(len(re.findall(r"\b(?:count|avg|sum|min|max|stddev_samp)\(", s, re.I)) for s in sent)

    few, many = aggregates_per_statement(2), aggregates_per_statement(20)
    assert few == many < 40
