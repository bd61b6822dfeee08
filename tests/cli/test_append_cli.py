"""`llm4es ingest --append` prints the delta and refuses options that mean a full ingest."""
from __future__ import annotations

from tests.producers.test_append import new_ratings, write_delta


def test_append_prints_the_delta(llm4es, grouplens, tmp_path):
    invoke = llm4es
    assert invoke("ingest", "movielens-100k", "--source", grouplens).exit_code == 0
    delta = write_delta(tmp_path / "d1", new_ratings(grouplens, [3, 8]))
    r = invoke("ingest", "movielens-100k", "--append", "--source", delta)
    assert r.exit_code == 0, r.output
    assert "+6 events for 2 users (0 new), 0 duplicates skipped, 0 rejected rows" in r.output
    assert "table movies read from the earlier source" in r.output and "ingest_delta" in r.output
    r = invoke("ingest", "movielens-100k", "--append", "--source", delta)
    assert r.exit_code == 0 and "nothing new (6 events already stored)" in r.output
    r = invoke("ingest", "movielens-100k", "--append")
    assert r.exit_code == 2 and "--append needs --source" in r.output
