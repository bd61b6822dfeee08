"""`llm4es aggregate`, driven through click's CliRunner (wide consoles: see test_cli.py)."""
from __future__ import annotations

import pyarrow.parquet as pq



def test_aggregate_after_validation(llm4es, grouplens, tmp_path):
    assert llm4es("ingest", "movielens-100k", "--source", grouplens).exit_code == 0
    assert llm4es("validate", "movielens-100k", "--no-data-docs").exit_code == 0
    result = llm4es("aggregate", "movielens-100k", "--top-n", "5")
    assert result.exit_code == 0, result.output
    parquet = tmp_path / "home" / "data" / "movielens_100k" / "agg_features.parquet"
    # 17 activity and numeric columns; movie id, genres and the fixture's 40 titles: 1 + 5 x 4 each
    assert "movielens-100k: 12 rows (users), 80 features as of 1998-" in result.stdout
    assert str(parquet) in result.stdout.replace("\n", "")
    assert pq.read_table(parquet).num_rows == 12

    early = llm4es("aggregate", "movielens-100k", "--as-of", "1997-10-01T00:00:00")
    assert early.exit_code == 0, early.output
    assert "as of 1997-10-01 00:00:00" in early.stdout

    bad = llm4es("aggregate", "movielens-100k", "--amount-field", "price")
    assert bad.exit_code == 1 and isinstance(bad.exception, SystemExit)
    assert "'price' is not a numeric event field" in bad.output


def test_aggregate_refuses_unvalidated_data(llm4es, grouplens):
    assert llm4es("ingest", "movielens-100k", "--source", grouplens).exit_code == 0
    result = llm4es("aggregate", "movielens-100k")
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert "movielens-100k has not been validated: run `llm4es validate movielens-100k`" in result.output
    forced = llm4es("aggregate", "movielens-100k", "--force")
    assert forced.exit_code == 0, forced.output
