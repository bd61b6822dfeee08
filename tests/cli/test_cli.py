"""The `llm4es` command line, driven through click's CliRunner.

The CLI prints with rich Consoles created at import time. They write to whatever `sys.stdout` /
`sys.stderr` are at print time, so CliRunner captures them; they are replaced here by wide
consoles only so that rich does not wrap table cells at the 80 columns of a non-terminal.
"""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from producers.cli import cli
from producers.datasets.definition import builtin_names
from tests.cli.conftest import assert_clean_exit_1
from tests.fixtures.movielens_files import replace_lines


def n_ratings(source) -> int:
    return len((source / "u.data").read_text().splitlines())


def table_row(output: str, first_cell: str) -> list[str]:
    """The cells of the rich table row whose text contains `first_cell`."""
    lines = [line for line in output.splitlines() if first_cell in line]
    assert len(lines) == 1, f"expected one row with {first_cell!r} in:\n{output}"
    return [cell.strip() for cell in re.split(r"[│┃|]", lines[0]) if cell.strip()]


def test_help_lists_the_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    commands = result.output.split("Commands:")[1]
    # In the order a pipeline runs them, not alphabetically.
    names = [line.split()[0] for line in commands.strip().splitlines() if not line.startswith("    ")]
    assert names == ["datasets", "fetch", "synth-clicks", "ingest", "validate", "serialize", "aggregate", "enrich",
                     "finetune", "embed", "coles", "sessions", "intents", "publish", "refresh", "evaluate",
                     "evaluate-crosschannel", "demo"]


def test_datasets_lists_builtins_and_what_the_warehouse_holds(llm4es, grouplens):
    result = llm4es("datasets")
    assert result.exit_code == 0, result.output
    assert table_row(result.stdout, "movielens-100k")[:2] == ["movielens-100k", "built-in"]
    assert all(name in result.stdout for name in builtin_names())

    assert llm4es("ingest", "movielens-100k", "--source", grouplens).exit_code == 0
    row = table_row(llm4es("datasets").stdout, "movielens-100k")
    assert row[:3] == ["movielens-100k", "built-in", "yes"]


def test_ingest_then_validate_passes(llm4es, grouplens, tmp_path):
    result = llm4es("ingest", "movielens-100k", "--source", grouplens)
    assert result.exit_code == 0, result.output
    assert f"movielens-100k: {n_ratings(grouplens):,} events, 12 users, 0 rejected rows" in result.stdout
    assert table_row(result.stdout, "u.user") == ["u.user", "12", "0", "0.00%"]
    assert "· reading u.data (ratings)" in result.stderr  # progress goes to stderr

    result = llm4es("validate", "movielens-100k", "--no-data-docs")
    assert result.exit_code == 0, result.output
    reports = tmp_path / "home" / "reports" / "validation" / "movielens_100k"
    (json_path,) = reports.glob("2*.json")
    assert f"movielens-100k: passed; result {json_path}" in result.stdout
    assert table_row(result.stdout, "every user has at least 20 events") == [
        "✓", "every user has at least 20 events", "activity", "12"]
    assert "FAILED" not in result.stdout and "Data Docs" not in result.stdout


def test_validate_after_a_planted_defect_fails_and_names_the_check(llm4es, grouplens):
    assert llm4es("ingest", "movielens-100k", "--source", grouplens).exit_code == 0
    assert llm4es("validate", "movielens-100k", "--no-data-docs").exit_code == 0

    first = (grouplens / "u.data").read_text().splitlines()[0].split("\t")
    first[2] = "9"
    replace_lines(grouplens / "u.data", {1: "\t".join(first).encode()})
    assert llm4es("ingest", "movielens-100k", "--source", grouplens).exit_code == 0  # a changed source re-ingests

    result = llm4es("validate", "movielens-100k", "--no-data-docs")
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "movielens-100k: FAILED (2 checks)" in result.stdout
    n = f"{n_ratings(grouplens):,}"
    # The failing value comes with its row's key, so a person can find it.
    from datetime import datetime, timezone

    when = datetime.fromtimestamp(int(first[3]), timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    example = f"user_id={first[0]}, event_time={when}: 9"
    assert table_row(result.stdout, "rating in [1, 2, 3, 4, 5]") == ["✗", "rating in [1, 2, 3, 4, 5]", "events",
                                                                     n, "1", example]
    assert table_row(result.stdout, "rating between 1 and 5") == ["✗", "rating between 1 and 5", "events",
                                                                  n, "1", example]


def test_unknown_dataset_lists_the_builtins(llm4es):
    result = llm4es("ingest", "no-such-dataset")
    assert_clean_exit_1(result)
    assert "error: unknown dataset 'no-such-dataset': built-in datasets are " in result.stderr
    assert f"built-in datasets are {', '.join(builtin_names())};" in result.stderr
    assert "--mapping" in result.stderr


def test_validate_of_a_dataset_not_in_the_warehouse(llm4es):
    result = llm4es("validate", "movielens-100k")
    assert_clean_exit_1(result)
    assert "dataset 'movielens-100k' is not in the warehouse: run `llm4es ingest movielens-100k` first" in result.stderr


def test_ingest_with_too_many_garbled_lines_names_the_file(llm4es, grouplens):
    replace_lines(grouplens / "u.data", {n: b"garbage line" for n in range(5, 40)})
    result = llm4es("ingest", "movielens-100k", "--source", grouplens)
    assert_clean_exit_1(result)
    assert "too many malformed rows; the warehouse was left unchanged" in result.stderr
    assert f"u.data: 35 of {n_ratings(grouplens)} rows rejected" in result.stderr
    assert "--max-reject-share" in result.stderr
    assert result.stdout == ""  # nothing claims success

    # the same file passes with a threshold that allows it, and says where the rejects are
    result = llm4es("ingest", "movielens-100k", "--source", grouplens, "--max-reject-share", "0.5")
    assert result.exit_code == 0, result.output
    assert "35 rejected rows" in result.stdout
    assert "rejected rows are in table movielens_100k.rejects" in result.stdout


def test_ingest_without_a_default_source_asks_for_source(llm4es):
    if "rosbank" not in builtin_names():
        pytest.skip("no built-in rosbank dataset")
    result = llm4es("ingest", "rosbank")
    assert_clean_exit_1(result)
    assert "rosbank has no default source: pass --source" in result.stderr
