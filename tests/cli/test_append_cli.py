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


def test_own_data_appends_with_the_stored_mapping(llm4es, tmp_path):
    from tests.fixtures.clicks_files import write_clicks

    src = write_clicks(tmp_path / "clicks", visitors=5)
    assert llm4es("ingest", "clicks", "--mapping", src / "clicks.yaml").exit_code == 0
    (tmp_path / "day2").mkdir()
    (tmp_path / "day2" / "clicks.csv").write_text(
        "visitor,visit,ts,page,price,query\n"
        "2,v2-9,2024-04-01 10:00:00,books/atlas,8.0,\n"
        "9,v9-1,2024-04-01 11:00:00,garden/rose,20.0,garden rose\n"
        + (src / "clicks.csv").read_text().splitlines()[1] + "\n")  # one already stored
    r = llm4es("ingest", "clicks", "--append", "--source", tmp_path / "day2")  # no --mapping: the stored one
    assert r.exit_code == 0, r.output
    assert "+2 events for 2 users (1 new), 1 duplicates skipped" in r.output
    assert "declares no events.key: duplicates were rows equal in every column" in r.output


def test_validate_delta_checks_the_appended_users(llm4es, grouplens, tmp_path):
    assert llm4es("ingest", "movielens-100k", "--source", grouplens).exit_code == 0
    assert llm4es("validate", "movielens-100k", "--no-data-docs").exit_code == 0
    delta = write_delta(tmp_path / "d1", new_ratings(grouplens, [3, 8]))
    assert llm4es("ingest", "movielens-100k", "--append", "--source", delta).exit_code == 0
    r = llm4es("validate", "movielens-100k", "--no-data-docs", "--delta")
    assert r.exit_code == 0, r.output
    assert ": 2 users)" in r.output and "passed" in r.output
