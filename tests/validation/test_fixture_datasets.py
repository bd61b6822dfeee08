"""The data-quality suites of every built-in dataset pass on its clean fixture, and fail on its garbled one."""
from __future__ import annotations

import pytest

from producers.datasets.definition import builtin_names, load_builtin
from producers.ingest import IngestConfig, ingest
from producers.synthetic.clickstream import ClickstreamConfig, write_clickstream
from tests.fixtures.bank_files import write_age_group, write_gender, write_rosbank
from tests.fixtures.movielens_files import write_grouplens
from validation.run import ValidateConfig, validate

WRITERS = {
    "movielens-100k": lambda folder, bad: write_grouplens(folder),
    "rosbank": lambda folder, bad: write_rosbank(folder, bad_rows=bad),
    "age-group": lambda folder, bad: write_age_group(folder, bad_rows=bad),
    "gender": lambda folder, bad: write_gender(folder, bad_rows=bad),
    "bank-clickstream": lambda folder, bad: write_clickstream(folder, ClickstreamConfig(visitors=30)).out_dir,
}


def test_every_builtin_dataset_has_a_fixture():
    assert sorted(WRITERS) == builtin_names()


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_clean_fixture_passes_every_check(name, home, tmp_path):
    ingest(home, load_builtin(name), IngestConfig(source=WRITERS[name](tmp_path / name, False)))
    report = validate(home, name, ValidateConfig(data_docs=False))
    assert report.success, [(r.check, r.examples, r.error) for r in report.failed]
    assert len(report.results) >= 10


@pytest.mark.parametrize("name", ["rosbank", "age-group", "gender"])
def test_garbled_fixture_fails_on_rejected_share(name, home, tmp_path):
    ingest(home, load_builtin(name), IngestConfig(source=WRITERS[name](tmp_path / name, True), max_reject_share=0.5))
    report = validate(home, name, ValidateConfig(data_docs=False))
    assert [r.check for r in report.failed] == ["each file's rejected-row share is at most 1.00%"]
