"""`validate` and `aggregate` on a full disk: a message naming the home, not a traceback (issue 11,
point 9). The full disk is simulated where each stage writes: GX's JSON result (Python's
OSError ENOSPC) and DuckDB's staging tables (DuckDB's IOException)."""
from __future__ import annotations

import errno

import duckdb
import pytest

import producers.aggregate
import validation.run
from tests.cli.conftest import assert_clean_exit_1


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "latest.tmp")


def duckdb_full(*args, **kwargs):
    raise duckdb.IOException('IO Error: Could not write file "/x/warehouse.duckdb.wal": No space left on device')


@pytest.fixture
def ingested(llm4es, grouplens):
    assert llm4es("ingest", "movielens-100k", "--source", grouplens).exit_code == 0
    return llm4es


def assert_disk_full_message(result, tmp_path):
    assert_clean_exit_1(result)
    assert "no space left on the device holding" in result.output
    assert str(tmp_path / "home") in result.output.replace("\n", "")


def test_validate_on_a_full_disk(ingested, tmp_path, monkeypatch):
    monkeypatch.setattr(validation.run, "_write_json", enospc)
    assert_disk_full_message(ingested("validate", "movielens-100k", "--no-data-docs"), tmp_path)


def test_aggregate_on_a_full_disk(ingested, tmp_path, monkeypatch):
    assert ingested("validate", "movielens-100k", "--no-data-docs").exit_code == 0
    monkeypatch.setattr(producers.aggregate, "_aggregate", duckdb_full)
    result = ingested("aggregate", "movielens-100k")
    assert_disk_full_message(result, tmp_path)
    assert "IOException" in result.output


def test_other_errors_are_not_taken_for_a_full_disk(ingested, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(validation.run, "_write_json", broken)
    result = ingested("validate", "movielens-100k", "--no-data-docs")
    assert result.exit_code == 1 and isinstance(result.exception, PermissionError)
