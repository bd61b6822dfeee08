"""Load one raw file into a staging table of VARCHAR columns, keeping each row's line number.

Every value is read as text so that a malformed value becomes a reject with a reason instead
of failing the whole load. DuckDB's CSV reader records structural errors (wrong column count,
invalid encoding, unterminated quotes) with their line numbers in a rejects table; we keep
those as rejects too. Line numbers assume one record per line (no newlines inside quotes).
"""
from __future__ import annotations

from dataclasses import dataclass

import duckdb

from producers.datasets.definition import TableSource
from producers.ingest.source_files import SourceFile


@dataclass(frozen=True)
class RawTable:
    table: str  # staging table with `_line` and the raw columns
    rejects: str | None  # staging table (source, row_number, raw_record, reason) or None
    columns: list[str]
    rows_read: int  # data rows in the file, rejected ones included


def sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def load_raw(con: duckdb.DuckDBPyConnection, schema: str, src: SourceFile, spec: TableSource) -> RawTable:
    target = f'"{schema}"."raw_{src.table}__staging"'
    if src.is_parquet:
        return _load_parquet(con, target, src)
    return _load_csv(con, schema, target, src, spec)


def _load_parquet(con: duckdb.DuckDBPyConnection, target: str, src: SourceFile) -> RawTable:
    con.execute(
        f"CREATE OR REPLACE TABLE {target} AS "
        f"SELECT file_row_number + 1 AS _line, COLUMNS(* EXCLUDE (file_row_number))::VARCHAR "
        f"FROM read_parquet({sql_str(str(src.path))}, file_row_number = true)"
    )
    return RawTable(target, None, _columns(con, target), _count(con, target))


def _load_csv(con: duckdb.DuckDBPyConnection, schema: str, target: str, src: SourceFile,
              spec: TableSource) -> RawTable:
    options = [
        "all_varchar = true",
        f"header = {str(spec.header).lower()}",
        "store_rejects = true",
        f"rejects_table = 'rejects_{src.table}'",
        f"rejects_scan = 'reject_scans_{src.table}'",
        f"encoding = {sql_str(spec.encoding)}",
        "auto_detect = true",
    ]
    if spec.delimiter is not None:
        options.append(f"delim = {sql_str(spec.delimiter)}")
    options.append(f"quote = {sql_str(spec.quote or '')}")
    if spec.columns:
        options.append("names = [" + ", ".join(sql_str(c) for c in spec.columns) + "]")
    reader = f"read_csv({sql_str(str(src.path))}, {', '.join(options)})"
    # A CREATE TABLE AS keeps the file's row order, so rowid is the index among accepted rows.
    body = f'"{schema}"."body_{src.table}__staging"'
    con.execute(f"CREATE OR REPLACE TABLE {body} AS SELECT * FROM {reader}")
    rejects = f'"{schema}"."csvrej_{src.table}__staging"'
    con.execute(
        f"CREATE OR REPLACE TABLE {rejects} AS "
        f"SELECT {sql_str(src.path.name)} AS source, line AS row_number, "
        f"any_value(csv_line) AS raw_record, string_agg(reason, '; ' ORDER BY reason) AS reason "
        # DuckDB reports a short line once per missing column: keep one message per kind of error.
        f"FROM (SELECT line, any_value(csv_line) AS csv_line, min(error_type || ': ' || error_message) AS reason "
        f"      FROM rejects_{src.table} GROUP BY line, error_type) GROUP BY line"
    )
    header_lines = 1 if spec.header else 0
    # The k-th accepted row sits at line k + header + (rejected lines before it). g = accepted
    # rows before the j-th rejected line; an ASOF join finds how many rejected lines precede.
    con.execute(
        f"CREATE OR REPLACE TABLE {target} AS "
        f"WITH r AS (SELECT row_number - {header_lines} - row_number() OVER (ORDER BY row_number) AS g, "
        f"                  row_number() OVER (ORDER BY row_number) AS j FROM {rejects}), "
        f"     b AS (SELECT rowid + 1 AS _k, * FROM {body}) "
        f"SELECT (b._k + {header_lines} + coalesce(r.j, 0))::BIGINT AS _line, b.* EXCLUDE (_k) "
        f"FROM b ASOF LEFT JOIN r ON b._k > r.g ORDER BY _line"
    )
    con.execute(f"DROP TABLE {body}")
    n_rejected = _count(con, rejects)
    return RawTable(target, rejects, _columns(con, target), _count(con, target) + n_rejected)


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    cols = [d[0] for d in con.execute(f"SELECT * FROM {table} LIMIT 0").description]
    return [c for c in cols if c != "_line"]


def _count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
