"""Where a mapping's `sql:` expressions are evaluated: a DuckDB with no way out.

The raw files are read on the warehouse connection first (reading files needs external
access). The typing step, the only one that runs a mapping's expressions, then runs here: an
in-memory DuckDB opened with external access disabled and its configuration locked, holding
nothing but the declared tables' raw columns (handed over as Arrow tables). Even an expression
that slipped past `check_expression` cannot read or write a file, load an extension, attach a
database or see another table of the warehouse. Results go back to the warehouse as Arrow.
"""
from __future__ import annotations

import duckdb
import pyarrow as pa

from producers.ingest.raw_load import RawTable
from producers.stores.warehouse import sql_ident

LOCKED = {
    "enable_external_access": False,  # no files, URLs, ATTACH, extensions
    "python_enable_replacements": False,  # no reaching Python variables by name
    "lock_configuration": True,  # and no SET to undo the above
}


class Sandbox:
    """The declared tables, under their declared names, on a locked in-memory connection."""

    def __init__(self, warehouse: duckdb.DuckDBPyConnection, raw: dict[str, RawTable]):
        self.con = duckdb.connect(":memory:", config=LOCKED)
        self._tables: list[pa.Table] = []
        reader = warehouse.cursor()  # its own result stream: the warehouse connection stays free
        try:
            for name, table in raw.items():
                cols = ", ".join(sql_ident(c) for c in [table.line, *table.columns])
                arrow = reader.sql(f"SELECT {cols} FROM {table.table}").to_arrow_table()
                self._tables.append(arrow)  # registered tables are views: keep the data alive
                self.con.register(name, arrow)
        finally:
            reader.close()

    def to_arrow(self, sql: str) -> pa.Table:
        return self.con.sql(sql).to_arrow_table()

    def execute(self, sql: str) -> list[tuple]:
        return self.con.execute(sql).fetchall()

    def close(self) -> None:
        self.con.close()
        self._tables.clear()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
