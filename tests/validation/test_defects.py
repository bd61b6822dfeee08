"""Each defect planted in the raw MovieLens files is caught by its own check, with a useful report.

Every test starts from the clean GroupLens fixture (which passes), plants one defect in the raw
files, ingests (raising the reject threshold where the defect is a malformed row) and validates.
The assertions name the failing check's text, its failed count and the planted value among its
examples, and, where the defect should touch nothing else, that no other check fails.
"""
from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from producers.datasets.definition import load_builtin
from producers.ingest import IngestConfig, ingest
from tests.fixtures.movielens_files import append_lines, replace_lines, write_grouplens
from validation.gate import ValidationGateError, require_valid
from validation.run import CheckResult, ValidateConfig, validate
from validation.suites import dataset_checks

ML = load_builtin("movielens-100k")
NAME = "movielens-100k"
NO_DOCS = ValidateConfig(data_docs=False)

WINDOW = "event times within the plausible window 1997-01-01 .. 1999-01-01"
IN_USERS = "every event's user is in users"
ACTIVITY = "every user has at least 20 events"
REJECT_SHARE = "each file's rejected-row share is at most 1.00%"
RATING_SET = "rating in [1, 2, 3, 4, 5]"
RATING_RANGE = "rating between 1 and 5"


# ---------------------------------------------------------------- helpers


def run(home, source: Path, max_reject_share: float = 0.01, config: ValidateConfig = NO_DOCS, log=None):
    ingest(home, ML, IngestConfig(source, max_reject_share=max_reject_share, force=True))
    return validate(home, NAME, config, **({"log": log} if log else {}))


def failed(report) -> dict[str, CheckResult]:
    return {r.check: r for r in report.failed}


def result(report, check: str) -> CheckResult:
    matches = [r for r in report.results if r.check == check]
    assert len(matches) == 1, f"no single check {check!r} in {[r.check for r in report.results]}"
    return matches[0]


def ratings(src: Path) -> list[list[str]]:
    return [line.split("\t") for line in (src / "u.data").read_text().splitlines()]


def set_rating_field(src: Path, line: int, column: int, value: str) -> list[str]:
    """Overwrite one field (0: user, 1: movie, 2: rating, 3: unix time) of a 1-based u.data line."""
    fields = ratings(src)[line - 1]
    fields[column] = value
    replace_lines(src / "u.data", {line: "\t".join(fields).encode()})
    return fields


def user_lines(src: Path) -> list[list[str]]:
    return [line.split("|") for line in (src / "u.user").read_text().splitlines()]


def n_events_of(src: Path, user: int) -> int:
    return sum(1 for f in ratings(src) if f[0] == str(user))


def unrated_movie(src: Path, user: int) -> int:
    rated = {int(f[1]) for f in ratings(src) if f[0] == str(user)}
    return min(m for m in range(1, 41) if m not in rated)


# ---------------------------------------------------------------- the clean fixture


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The clean fixture, ingested and validated once with Data Docs on: (home, source, report)."""
    from producers.stores.warehouse import Home

    root = tmp_path_factory.mktemp("clean")
    source = write_grouplens(root / "ml-100k")
    home = Home.resolve(root / "home")
    report = run(home, source, config=ValidateConfig(data_docs=True))
    return home, source, report


def test_clean_fixture_passes_every_check(clean):
    _, source, report = clean
    assert report.success and report.failed == []
    assert [r.check for r in report.results] == [c.description for c in dataset_checks(ML)]
    assert all(r.error is None and r.failed == 0 and r.examples == [] for r in report.results)
    n_events = len(ratings(source))
    assert result(report, "every event has a user").checked == n_events
    assert result(report, "one row per user (a repeated id means conflicting labels)").checked == 12
    assert result(report, ACTIVITY).checked == 12
    assert result(report, REJECT_SHARE).checked == 3  # u.data, u.item, u.user


def test_json_result_is_written_and_parses(clean):
    _, _, report = clean
    assert report.json_path.parent.name == "movielens_100k" and report.json_path.name == f"{report.run_id}.json"
    payload = json.loads(report.json_path.read_text())
    assert payload["success"] is True and payload["run_id"] == report.run_id
    assert payload["ingest_id"] == report.ingest_id and payload["dataset"] == NAME
    assert [r["check"] for r in payload["results"]] == [r.check for r in report.results]
    assert {r["batch"] for r in payload["results"]} == {"schema", "events", "users", "activity", "rejects"}
    assert json.loads((report.json_path.parent / "latest.json").read_text()) == payload


def test_data_docs_index_is_built_when_enabled(clean):
    _, _, report = clean
    assert report.data_docs is not None and report.data_docs.name == "index.html"
    html = report.data_docs.read_text()
    for batch in ("schema", "events", "users", "activity", "rejects"):
        assert f"movielens_100k.{batch}" in html


def test_validation_log_row_is_written(clean):
    home, _, report = clean
    con = home.connect()
    try:
        rows = con.execute("SELECT run_id, ingest_id, success, n_checks, n_failed, report, code_version "
                           "FROM movielens_100k.validation_log").fetchall()
        (last_ingest_id,) = con.execute("SELECT ingest_id FROM movielens_100k.ingest_log").fetchone()
    finally:
        con.close()
    assert rows == [(report.run_id, last_ingest_id, True, len(report.results), 0, str(report.json_path),
                     report.code_version)]


# ---------------------------------------------------------------- defects in events


def test_null_user_id(home, grouplens):
    set_rating_field(grouplens, 1, 0, "")
    report = run(home, grouplens)
    res = failed(report)["every event has a user"]
    assert (res.checked, res.failed) == (len(ratings(grouplens)), 1)
    assert len(res.examples) == 1 and pd.isna(res.examples[0])
    assert res.lines == ["u.data line 1"]  # the table has no line numbers; ingest traced them


def test_empty_keys_are_traced_to_their_file_lines_by_ingest_and_validate(home, grouplens):
    """A NULL key is no reject (it loads, and the gate fails on it), so only ingest sees its line: it
    names them in its summary and the ingest log, and validation's failing checks name them too."""
    for line in (5, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20):
        set_rating_field(grouplens, line, 0, "")
    set_rating_field(grouplens, 7, 3, "")
    logs = []
    r = ingest(home, ML, IngestConfig(grouplens, force=True), log=logs.append)
    data = next(f for f in r.files if f.file == "u.data")
    assert data.null_keys == {"user_id": {"rows": 12, "lines": [5, 10, 11, 12, 13, 14, 15, 16, 17, 18]},
                              "event_time": {"rows": 1, "lines": [7]}}
    assert ("u.data: 12 rows without user_id (lines 5, 10, 11, 12, 13, 14, 15, 16, 17, 18 ...) and 1 row without "
            "event_time (line 7): loaded as NULL; validation fails on them") in logs
    assert all(not f.null_keys for f in r.files if f.file != "u.data")
    report = validate(home, NAME, NO_DOCS)
    saved = json.loads(report.json_path.read_text())  # the JSON result says it too
    assert {c["check"]: c["lines"] for c in saved["results"] if c["lines"]} == {
        "every event has a user": ["u.data lines 5, 10, 11, 12, 13, 14, 15, 16, 17, 18 ..."],
        "every event has a time": ["u.data line 7"]}


def test_null_user_id_is_not_also_a_user_with_too_few_events(home, grouplens):
    set_rating_field(grouplens, 1, 0, "")
    report = run(home, grouplens)
    assert set(failed(report)) == {"every event has a user"}


def test_null_event_time(home, grouplens):
    set_rating_field(grouplens, 1, 3, "")
    report = run(home, grouplens)
    assert set(failed(report)) == {"every event has a time"}
    res = failed(report)["every event has a time"]
    assert (res.checked, res.failed) == (len(ratings(grouplens)), 1)
    assert len(res.examples) == 1 and pd.isna(res.examples[0])


@pytest.mark.parametrize("rating", [9, -1])
def test_impossible_rating(home, grouplens, rating):
    set_rating_field(grouplens, 1, 2, str(rating))
    report = run(home, grouplens)
    assert set(failed(report)) == {RATING_SET, RATING_RANGE}
    for check in (RATING_SET, RATING_RANGE):
        res = failed(report)[check]
        assert (res.failed, res.examples) == (1, [rating])


@pytest.mark.parametrize("unix, when", [(-2208988800, datetime(1900, 1, 1)), (4102444800, datetime(2100, 1, 1))])
def test_event_time_outside_the_plausible_window(home, grouplens, unix, when):
    set_rating_field(grouplens, 1, 3, str(unix))
    report = run(home, grouplens)
    assert set(failed(report)) == {WINDOW}
    res = failed(report)[WINDOW]
    assert (res.checked, res.failed, res.examples) == (len(ratings(grouplens)), 1, [when])


def test_events_of_a_user_missing_from_users(home, grouplens):
    # 20 ratings, so the unknown user is not also a user with too few events
    append_lines(grouplens / "u.data", [f"9999\t{m}\t3\t880000000" for m in range(1, 21)])
    report = run(home, grouplens)
    assert set(failed(report)) == {IN_USERS}
    res = failed(report)[IN_USERS]
    assert (res.failed, res.examples) == (20, [9999] * 5)


def test_duplicate_event_key(home, grouplens):
    user, movie, _, _ = ratings(grouplens)[0]
    append_lines(grouplens / "u.data", [f"{user}\t{movie}\t5\t880000001"])
    report = run(home, grouplens)
    assert set(failed(report)) == {"(user_id, movie_id) identifies an event"}
    res = failed(report)["(user_id, movie_id) identifies an event"]
    assert res.failed == 2  # both rows of the repeated key
    assert res.examples == [{"user_id": int(user), "movie_id": int(movie)}] * 2


def test_user_with_fewer_than_20_ratings(home, grouplens):
    append_lines(grouplens / "u.user", ["13|30|M|writer|12345"])
    append_lines(grouplens / "u.data", [f"13\t{m}\t3\t880000000" for m in range(1, 6)])
    report = run(home, grouplens)
    assert set(failed(report)) == {ACTIVITY}
    res = failed(report)[ACTIVITY]
    assert (res.checked, res.failed, res.examples) == (13, 1, [5])


# ---------------------------------------------------------------- defects in users


@pytest.mark.parametrize("column, value, check, example", [
    (2, "X", "gender in ['M', 'F']", "X"),
    (1, "150", "age between 1 and 100", 150),
])
def test_label_out_of_domain(home, grouplens, column, value, check, example):
    fields = user_lines(grouplens)[2]
    fields[column] = value
    replace_lines(grouplens / "u.user", {3: "|".join(fields).encode()})
    report = run(home, grouplens)
    assert set(failed(report)) == {check}
    res = failed(report)[check]
    assert (res.checked, res.failed, res.examples) == (12, 1, [example])


# ---------------------------------------------------------------- malformed rows


def test_broken_rows_fail_the_reject_share_check(home, grouplens):
    n_good = len(ratings(grouplens))
    garbled = [f"garbled line {k}" for k in range(n_good // 9)]  # ~10% of the file
    append_lines(grouplens / "u.data", garbled)
    report = run(home, grouplens, max_reject_share=0.5)
    assert set(failed(report)) == {REJECT_SHARE}
    res = failed(report)[REJECT_SHARE]
    assert (res.checked, res.failed) == (3, 1)
    assert res.examples == [pytest.approx(len(garbled) / (n_good + len(garbled)))]
    # the same share passes when the threshold allows it
    lenient = validate(home, NAME, ValidateConfig(max_reject_share=0.2, data_docs=False))
    assert lenient.success


def test_wrong_encoding_rejects_users_and_orphans_their_events(home, grouplens):
    lines = user_lines(grouplens)
    planted = {5: b"caf\xe9 owner", 9: b"\xe9crivain"}  # latin-1 bytes in a UTF-8 file
    replace_lines(grouplens / "u.user", {
        u: "|".join(lines[u - 1][:3]).encode() + b"|" + occupation + b"|" + lines[u - 1][4].encode()
        for u, occupation in planted.items()})
    report = run(home, grouplens, max_reject_share=0.5)

    con = home.connect()
    try:
        rejects = con.execute("SELECT source, row_number, reason FROM movielens_100k.rejects ORDER BY 2").fetchall()
        users = {r[0] for r in con.execute("SELECT user_id FROM movielens_100k.users").fetchall()}
    finally:
        con.close()
    assert [(s, n) for s, n, _ in rejects] == [("u.user", 5), ("u.user", 9)]
    assert all("INVALID ENCODING" in reason for _, _, reason in rejects)
    assert users == set(range(1, 13)) - {5, 9}

    assert set(failed(report)) == {REJECT_SHARE, IN_USERS}
    share = failed(report)[REJECT_SHARE]
    assert (share.failed, share.examples) == (1, [pytest.approx(2 / 12)])
    orphans = failed(report)[IN_USERS]
    assert orphans.failed == n_events_of(grouplens, 5) + n_events_of(grouplens, 9)
    assert orphans.examples and set(orphans.examples) <= {5, 9}


# ---------------------------------------------------------------- schema


@pytest.fixture(scope="module")
def retyped(tmp_path_factory):
    """The clean fixture with events.rating turned into VARCHAR in the warehouse, validated."""
    from producers.stores.warehouse import Home

    root = tmp_path_factory.mktemp("retyped")
    home = Home.resolve(root / "home")
    ingest(home, ML, IngestConfig(write_grouplens(root / "ml-100k")))
    con = home.connect()
    con.execute("ALTER TABLE movielens_100k.events ALTER rating TYPE VARCHAR")
    con.close()
    return validate(home, NAME, NO_DOCS)


def test_column_with_the_wrong_type(retyped):
    res = failed(retyped)["events.rating is INTEGER"]
    assert (res.checked, res.failed, res.examples) == (1, 1, ["VARCHAR"])
    # every other column still has its type
    assert [r.check for r in retyped.failed if r.batch == "schema"] == ["events.rating is INTEGER"]
    # and the text values are no longer in the integer domain
    assert failed(retyped)[RATING_SET].failed == failed(retyped)[RATING_SET].checked > 0


def test_a_check_that_cannot_run_says_why(retyped):
    res = failed(retyped)[RATING_RANGE]  # comparing text with numbers raises inside GX
    assert res.error and "same type" in res.error


# ---------------------------------------------------------------- chunking


def test_chunked_validation_gives_the_same_verdicts_and_counts(tmp_path):
    from producers.stores.warehouse import Home

    source = write_grouplens(tmp_path / "ml-100k", n_users=100)  # ~2,500 events: 3 chunks of <= 1,000 rows
    user, movie, _, _ = ratings(source)[0]
    append_lines(source / "u.data", [f"{user}\t{movie}\t5\t880000001",  # a duplicate key
                                     f"{user}\t{unrated_movie(source, int(user))}\t9\t880000002"])  # a bad rating
    home = Home.resolve(tmp_path / "home")
    whole_log, chunked_log = [], []
    whole = run(home, source, log=whole_log.append)
    chunked = validate(home, NAME, ValidateConfig(chunk_rows=1000, data_docs=False), log=chunked_log.append)

    n_events = len(ratings(source))
    assert [m for m in whole_log if m.startswith("checking events")] == [f"checking events ({n_events:,} rows)"]
    sizes = [int(m.split("(")[1].split()[0].replace(",", "")) for m in chunked_log if m.startswith("checking events")]
    assert len(sizes) == math.ceil(n_events / 1000) and sum(sizes) == n_events

    def verdicts(report):
        return [(r.check, r.success, r.checked, r.failed, r.error) for r in report.results]

    assert verdicts(chunked) == verdicts(whole)
    assert set(failed(chunked)) == {"(user_id, movie_id) identifies an event", RATING_SET, RATING_RANGE}
    key = failed(chunked)["(user_id, movie_id) identifies an event"]
    assert key.failed == 2 and key.examples == [{"user_id": int(user), "movie_id": int(movie)}] * 2
    assert failed(chunked)[RATING_SET].examples == failed(whole)[RATING_SET].examples == [9]


# ---------------------------------------------------------------- the gate


def test_gate(home, grouplens):
    def gate(force=False):
        con = home.connect()
        try:
            require_valid(con, NAME, force=force)
        finally:
            con.close()

    original = ratings(grouplens)[0]
    set_rating_field(grouplens, 1, 2, "9")
    ingest(home, ML, IngestConfig(grouplens))
    with pytest.raises(ValidationGateError, match=r"has not been validated: run `llm4es validate movielens-100k`"):
        gate()
    gate(force=True)

    bad = validate(home, NAME, NO_DOCS)
    assert not bad.success and len(bad.failed) == 2
    with pytest.raises(ValidationGateError) as err:
        gate()
    assert "failed its last validation (2 checks failed" in str(err.value)
    assert str(bad.json_path) in str(err.value)
    gate(force=True)

    replace_lines(grouplens / "u.data", {1: "\t".join(original).encode()})  # fixed
    ingest(home, ML, IngestConfig(grouplens))
    with pytest.raises(ValidationGateError, match="re-ingested after its last validation"):
        gate()  # the failed validation belongs to the old data

    good = validate(home, NAME, NO_DOCS)
    assert good.success
    gate()
    assert ingest(home, ML, IngestConfig(grouplens)).skipped  # same source: still the validated data
    gate()

    append_lines(grouplens / "u.data", [f"1\t{unrated_movie(grouplens, 1)}\t4\t880000000"])
    ingest(home, ML, IngestConfig(grouplens))
    with pytest.raises(ValidationGateError, match="re-ingested after its last validation"):
        gate()
    gate(force=True)
