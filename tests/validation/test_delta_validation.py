"""`validate --delta` after `ingest --append`: the same checks on the appended users only, exact for them."""
from __future__ import annotations

from producers.datasets.definition import load_builtin
from producers.ingest import IngestConfig, ingest
from producers.ingest.append import append
from tests.producers.test_append import new_ratings, write_delta
from validation.gate import require_valid
from validation.run import ValidateConfig, validate

ML = load_builtin("movielens-100k")
CHANGED = [2, 5, 7]


def events_checked(report) -> int:
    (r,) = [r for r in report.results if r.check == "every event has a user"]
    return r.checked


def n_events(home, users=None) -> int:
    con = home.connect(read_only=True)
    try:
        where = f" WHERE user_id IN ({', '.join(map(str, users))})" if users else ""
        return con.execute(f"SELECT count(*) FROM {ML.schema}.events{where}").fetchall()[0][0]
    finally:
        con.close()


def test_delta_checks_only_the_appended_users_and_opens_the_gate(home, grouplens, tmp_path):
    ingest(home, ML, IngestConfig(grouplens))
    assert validate(home, ML.name, ValidateConfig(data_docs=False)).success
    append(home, ML, IngestConfig(write_delta(tmp_path / "d1", new_ratings(grouplens, CHANGED))))
    report = validate(home, ML.name, ValidateConfig(data_docs=False, delta=True))
    assert report.success and report.scope.endswith(": 3 users")
    # every event of the appended users (the 9 new ones among them), not the whole table
    assert events_checked(report) == n_events(home, CHANGED) < n_events(home)
    assert not [r for r in report.results if "identifies an event" in r.check]  # unique by the append's anti-join
    con = home.connect(read_only=True)
    try:
        require_valid(con, ML.name)  # the stages run on the appended data
    finally:
        con.close()


def test_a_bad_appended_row_fails_the_delta_validation_with_its_row(home, grouplens, tmp_path):
    ingest(home, ML, IngestConfig(grouplens))
    assert validate(home, ML.name, ValidateConfig(data_docs=False)).success
    rows = new_ratings(grouplens, CHANGED)
    u, m, _, t = rows[0].split("\t")
    rows[0] = "\t".join([u, m, "9", t])  # outside the definition's 1..5
    append(home, ML, IngestConfig(write_delta(tmp_path / "d1", rows)))
    report = validate(home, ML.name, ValidateConfig(data_docs=False, delta=True))
    assert not report.success
    assert {r.check for r in report.failed} == {"rating in [1, 2, 3, 4, 5]", "rating between 1 and 5"}
    assert all(r.failed == 1 and r.where[0]["user_id"] == int(u) and r.where[0]["rating"] == 9 for r in report.failed)


def test_without_a_passed_validation_before_the_append_every_row_is_checked(home, grouplens, tmp_path):
    ingest(home, ML, IngestConfig(grouplens))  # never validated
    append(home, ML, IngestConfig(write_delta(tmp_path / "d1", new_ratings(grouplens, CHANGED))))
    report = validate(home, ML.name, ValidateConfig(data_docs=False, delta=True))
    assert report.success and report.scope == "all"
    assert events_checked(report) == n_events(home)


def test_validating_the_delta_again_still_checks_only_the_delta(home, grouplens, tmp_path):
    """A second `validate --delta` (a cron job re-run) said "the data before the last append has not passed its own
    validation" and checked every row: it looked at the latest validation, which was the delta's own."""
    ingest(home, ML, IngestConfig(grouplens))
    assert validate(home, ML.name, ValidateConfig(data_docs=False)).success
    append(home, ML, IngestConfig(write_delta(tmp_path / "d1", new_ratings(grouplens, CHANGED))))
    assert validate(home, ML.name, ValidateConfig(data_docs=False, delta=True)).scope.endswith(": 3 users")
    again = validate(home, ML.name, ValidateConfig(data_docs=False, delta=True))
    assert again.success and again.scope.endswith(": 3 users")
    assert events_checked(again) == n_events(home, CHANGED)
