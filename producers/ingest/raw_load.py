"""Load one raw file into a staging table of VARCHAR columns, keeping each row's line number.

Every value is read as text so that a malformed value becomes a reject with a reason instead
of failing the whole load. DuckDB's CSV reader records structural errors (wrong column count,
invalid encoding, unterminated quotes, a line over the size limit) with their line numbers in a
rejects table; we keep those as rejects too. Line numbers assume one record per line (no
newlines inside quotes).

Column names come from the file and may hold any text (quotes, dots, SQL): they are only ever
quoted as identifiers (`sql_ident`), and every literal is escaped (`sql_str`).

What the definition declares wins over DuckDB's sniffer: with `columns` given, the file is read
with exactly those columns (and the declared or sniffed delimiter), so a garbled first line is
one rejected row instead of changing how the whole file is parsed.
"""
from __future__ import annotations

import dataclasses
import gzip
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import duckdb

from producers.datasets.definition import TableSource
from producers.ingest.source_files import SourceFile
from producers.stores.warehouse import sql_ident, sql_str


class RawLoadError(ValueError):
    """A raw file cannot be read at all (empty, a line over the size limit, a broken dialect)."""


@dataclass(frozen=True)
class RawTable:
    table: str  # staging table with the line-number column and the raw columns
    rejects: str | None  # staging table (source, row_number, raw_record, reason) or None
    columns: list[str]  # the raw columns, as the file names them
    rows_read: int  # data rows in the file, rejected ones included
    line: str = "_line"  # the line-number column: a name no raw column has


def unused_name(base: str, taken: list[str]) -> str:
    """`base`, or `base` with more leading underscores, so that it differs from every name in `taken`."""
    lowered = {t.lower() for t in taken}  # DuckDB identifiers are case-insensitive
    name = base
    while name.lower() in lowered:
        name = "_" + name
    return name


def load_raw(con: duckdb.DuckDBPyConnection, schema: str, src: SourceFile, spec: TableSource,
             max_line_size: int | None = None) -> RawTable:
    target = f"{sql_ident(schema)}.{sql_ident(f'raw_{src.table}__staging')}"
    if _is_empty(src.path):
        raise RawLoadError(f"{src.path.name}: file is empty (table {src.table!r})")
    if src.is_parquet:
        return _load_parquet(con, target, src)
    try:
        return _load_csv(con, schema, target, src, spec, max_line_size)
    except duckdb.Error as e:
        if not _mixed_line_endings(src.path):
            raise RawLoadError(_csv_error(src, spec, e, max_line_size)) from None
    # Exports joined together (one written on Windows): DuckDB's reader takes one newline for the whole file.
    # Read a copy with every CRLF made LF: each line keeps its number, so rejects still point into the original.
    with tempfile.TemporaryDirectory(prefix="llm4es-lf-") as tmp:
        copy = Path(tmp) / src.path.name
        _copy_with_lf(src.path, copy)
        try:
            return _load_csv(con, schema, target, dataclasses.replace(src, path=copy), spec, max_line_size)
        except duckdb.Error as e:
            raise RawLoadError(f"{_csv_error(src, spec, e, max_line_size)} (read with its CRLF line endings "
                               "made LF, as the file mixes both)") from None


def _load_parquet(con: duckdb.DuckDBPyConnection, target: str, src: SourceFile) -> RawTable:
    reader = f"read_parquet({sql_str(str(src.path))}, file_row_number = true)"
    names = _column_names(con, reader)
    columns = [n for n in names if n != "file_row_number"]
    line = unused_name("_line", columns)
    casts = ", ".join(f"{sql_ident(c)}::VARCHAR AS {sql_ident(c)}" for c in columns)
    con.execute(f"CREATE OR REPLACE TABLE {target} AS "
                f"SELECT file_row_number + 1 AS {sql_ident(line)}, {casts} FROM {reader}")
    return RawTable(target, None, columns, _count(con, target), line)


def _csv_options(con: duckdb.DuckDBPyConnection, src: SourceFile, spec: TableSource,
                 max_line_size: int | None) -> list[str]:
    """read_csv options that fix the dialect and the columns: the full read sniffs nothing."""
    options = [
        "all_varchar = true",
        f"header = {str(spec.header).lower()}",
        f"quote = {sql_str(spec.quote or '')}",
    ]
    if spec.columns and spec.delimiter is not None:
        delimiter, names = spec.delimiter, list(spec.columns)  # declared: nothing to sniff
    else:
        delimiter, sniffed = _sniff(con, src, spec, options)
        names = list(spec.columns) if spec.columns else sniffed
    columns = ", ".join(f"{sql_str(c)}: 'VARCHAR'" for c in names)
    options += [f"encoding = {sql_str(spec.encoding)}", "auto_detect = false", f"delim = {sql_str(delimiter)}",
                f"columns = {{{columns}}}"]
    if max_line_size:
        options.append(f"max_line_size = {int(max_line_size)}")
    return options


SNIFF_BYTES = 1 << 20
LONG_LINE_HINT = " (raise the limit with `llm4es ingest ... --max-line-size BYTES`)"


def _sniff(con: duckdb.DuckDBPyConnection, src: SourceFile, spec: TableSource,
           options: list[str]) -> tuple[str, list[str]]:
    """The delimiter (declared or sniffed) and the header's column names, as DuckDB names them.

    DuckDB's sniffer reads the file's first complete lines, up to 1 MiB, re-encoded as UTF-8:
    its time grows with the square of a line's length, so a very long line is left to the full
    read (where it is one rejected row, or fits under --max-line-size).
    """
    with tempfile.TemporaryDirectory(prefix="llm4es-sniff-") as tmp:
        sample = Path(tmp) / "head.csv"
        sample.write_bytes(_head(src.path, spec.encoding))
        known = [o for o in options if not o.startswith("all_varchar")] + ["encoding = 'utf-8'"]
        if spec.delimiter is not None:
            known.append(f"delim = {sql_str(spec.delimiter)}")
        rows = con.execute(f"SELECT Delimiter, Columns FROM sniff_csv({sql_str(str(sample))}, {', '.join(known)})"
                           ).fetchall()
    delimiter, columns = rows[0]
    return delimiter, [c["name"] for c in columns]


def _open_raw(path: Path, mode: str = "rb") -> BinaryIO:
    """A raw file's bytes, through gzip when its name ends in .gz (as DuckDB's reader decides); written
    gzip is level 1: a temporary copy, read once."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, mode, compresslevel=1)  # type: ignore[return-value]
    return open(path, mode)


def _head(path: Path, encoding: str) -> bytes:
    with _open_raw(path) as f:
        raw = f.read(SNIFF_BYTES + 1)
    text = raw.decode(encoding, errors="replace")
    if len(raw) > SNIFF_BYTES:
        lines = text.splitlines(keepends=True)
        text = "".join(lines[:-1]) if len(lines) > 1 else text  # drop the cut last line
    return text.encode("utf-8")


def _load_csv(con: duckdb.DuckDBPyConnection, schema: str, target: str, src: SourceFile,
              spec: TableSource, max_line_size: int | None) -> RawTable:
    # DuckDB keeps the reader's rejects in temporary tables named by these options.
    errors, scans = f"rejects_{src.table}", f"reject_scans_{src.table}"
    options = _csv_options(con, src, spec, max_line_size) + [
        "store_rejects = true", f"rejects_table = {sql_str(errors)}", f"rejects_scan = {sql_str(scans)}"]
    reader = f"read_csv({sql_str(str(src.path))}, {', '.join(options)})"
    # A CREATE TABLE AS keeps the file's row order, so rowid is the index among accepted rows.
    body = f"{sql_ident(schema)}.{sql_ident(f'body_{src.table}__staging')}"
    con.execute(f"CREATE OR REPLACE TABLE {body} AS SELECT * FROM {reader}")
    columns = _column_names(con, body)
    # A raw column named rowid would hide the row index: rename it for the line count.
    hidden = {c: unused_name("rowid", columns) for c in columns if c.lower() == "rowid"}
    for c, name in hidden.items():
        con.execute(f"ALTER TABLE {body} RENAME COLUMN {sql_ident(c)} TO {sql_ident(name)}")
    rejects = f"{sql_ident(schema)}.{sql_ident(f'csvrej_{src.table}__staging')}"
    con.execute(
        f"CREATE OR REPLACE TABLE {rejects} AS "
        f"SELECT {sql_str(src.path.name)} AS source, line AS row_number, "
        f"any_value(csv_line) AS raw_record, string_agg(reason, '; ' ORDER BY reason) AS reason "
        # DuckDB reports a short line once per missing column: keep one message per kind of error.
        f"FROM (SELECT line, any_value(csv_line) AS csv_line, min(error_type || ': ' || error_message || "
        f"  if(error_type = 'LINE SIZE OVER MAXIMUM', {sql_str(LONG_LINE_HINT)}, '')) AS reason "
        f"      FROM {sql_ident(errors)} GROUP BY line, error_type) GROUP BY line"
    )
    header_lines = 1 if spec.header else 0
    line, k = unused_name("_line", columns), unused_name("_k", columns)
    raw_cols = ", ".join(f"b.{sql_ident(hidden.get(c, c))} AS {sql_ident(c)}" for c in columns)
    # The k-th accepted row sits at line k + header + (rejected lines before it). g = accepted
    # rows before the j-th rejected line; an ASOF join finds how many rejected lines precede.
    con.execute(
        f"CREATE OR REPLACE TABLE {target} AS "
        f"WITH r AS (SELECT row_number - {header_lines} - row_number() OVER (ORDER BY row_number) AS g, "
        f"                  row_number() OVER (ORDER BY row_number) AS j FROM {rejects}), "
        f"     b AS (SELECT rowid + 1 AS {sql_ident(k)}, * FROM {body}) "
        f"SELECT (b.{sql_ident(k)} + {header_lines} + coalesce(r.j, 0))::BIGINT AS {sql_ident(line)}, {raw_cols} "
        f"FROM b ASOF LEFT JOIN r ON b.{sql_ident(k)} > r.g ORDER BY 1"
    )
    con.execute(f"DROP TABLE {body}")
    n_rejected = _count(con, rejects)
    return RawTable(target, rejects, columns, _count(con, target) + n_rejected, line)


def _is_empty(path: Path) -> bool:
    """No data at all: zero bytes, or (CSV) nothing but whitespace and a byte-order mark."""
    if path.stat().st_size == 0:
        return True
    try:
        with _open_raw(path) as f:
            head = f.read(4096)
    except OSError:
        return False  # not our business to decide here: the reader names what is wrong
    return len(head) < 4096 and not head.strip(b" \t\r\n\x00\xef\xbb\xbf\xff\xfe")


LINE_SIZE = re.compile(r"Maximum line size of (\d+) bytes exceeded\. Actual Size:\s*(\d+) bytes")


def _csv_error(src: SourceFile, spec: TableSource, error: duckdb.Error, max_line_size: int | None) -> str:
    """DuckDB's reason in one line (its first line only says "CSV Error on Line: 1")."""
    text = str(error)
    too_long = LINE_SIZE.search(text)
    if too_long:
        limit, actual = (int(x) for x in too_long.groups())
        return (f"{src.path.name}: a line is {actual:,} bytes long, over the CSV reader's limit of {limit:,} bytes "
                f"(DuckDB: Maximum line size of {limit} bytes exceeded); raise the limit with "
                f"`llm4es ingest ... --max-line-size {max(actual + 1024, 2 * (max_line_size or limit))}`")
    return (f"{src.path.name}: cannot be read ({duckdb_message(error)}); check its delimiter, quote and "
            f"encoding in the definition of table {src.table!r}")


def _mixed_line_endings(path: Path) -> bool:
    """Both CRLF and a bare LF anywhere in the file (read in blocks: asked only once a read failed)."""
    crlf = lf = 0
    last = b""
    try:
        with _open_raw(path) as f:
            while block := f.read(COPY_BYTES):
                crlf += block.count(b"\r\n") + (last == b"\r" and block[:1] == b"\n")
                lf += block.count(b"\n")
                last = block[-1:]
                if 0 < crlf < lf:
                    return True
    except OSError:
        return False
    return 0 < crlf < lf


COPY_BYTES = 8 << 20


def _copy_with_lf(path: Path, copy: Path) -> None:
    """`path` written to `copy` with every CRLF made LF, block by block (a file of any size); gzip stays gzip."""
    with _open_raw(path) as f, _open_raw(copy, "wb") as out:  # `copy` has `path`'s name: gzip stays gzip
        held = b""  # a block's last byte when it is a CR: its LF may open the next block
        while block := f.read(COPY_BYTES):
            block = held + block
            held = b"\r" if block.endswith(b"\r") else b""
            out.write(block[:len(block) - len(held)].replace(b"\r\n", b"\n"))
        out.write(held)


def duckdb_message(error: BaseException, width: int = 300) -> str:
    """DuckDB's error without the echoed query and with long lines (a 30 MB CSV line) cut."""
    lines = []
    for line in str(error).strip().splitlines():
        if line.startswith("LINE ") or line.startswith("  file = "):
            break
        if line.strip():
            lines.append(line.strip() if len(line) <= width else line.strip()[:width] + " ...")
    return " ".join(lines[:4])


def _column_names(con: duckdb.DuckDBPyConnection, relation: str) -> list[str]:
    cur = con.execute(f"SELECT * FROM {relation} LIMIT 0")
    names = [d[0] for d in cur.description]
    cur.fetchall()  # DuckDB 2 refuses new work while a result is unread
    return names


def _count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    return con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
