"""Code tables: the text description of each code (MCC 5411 -> "Grocery Stores, Supermarkets")."""
from __future__ import annotations

from importlib import resources

import duckdb

from producers.datasets.definition import CodeSource, CodeTable
from producers.stores.warehouse import sql_ident, sql_str
from producers.ingest.typed_sql import RawColumns, pad_code

# Card-network lists first: their wording is what people see on statements. Ranges last, so
# a code missing from every list still gets its ISO 18245 range ("Airlines", "Lodging", ...).
RANGE_PRIORITY = 1_000_000
ISO18245_LISTS = ["mastercard_list", "visa_list", "iso18245_official_list", "amex_list",
                  "usda_list", "stripe_list", "alipay_list"]


def iso18245_sql() -> str:
    """SQL for (code, description, priority) from the iso18245 package's CSV tables."""
    data = resources.files("iso18245").joinpath("data")
    parts = []
    for rank, name in enumerate(ISO18245_LISTS):
        path = sql_str(str(data.joinpath(f"{name}.csv")))
        parts.append(f"SELECT MCC AS code, DESCRIPTION AS description, {rank} AS priority "
                     f"FROM read_csv({path}, all_varchar = true, header = true)")
    ranges = []
    for rank, name in enumerate(["private_ranges", "iso18245_ranges"], start=len(ISO18245_LISTS)):
        path = sql_str(str(data.joinpath(f"{name}.csv")))
        ranges.append(f"SELECT \"MCC START\"::INTEGER AS lo, \"MCC END\"::INTEGER AS hi, DESCRIPTION AS d, "
                      f"{rank} AS priority FROM read_csv({path}, all_varchar = true, header = true)")
    # Expand ranges into single codes so one equality join serves both kinds. A range is only a
    # fallback: RANGE_PRIORITY puts it after every source of the table, the dataset's own too.
    parts.append(f"SELECT lpad(c::VARCHAR, 4, '0') AS code, d AS description, {RANGE_PRIORITY} + priority AS priority "
                 f"FROM ({' UNION ALL '.join(ranges)}) r, range(r.lo, r.hi + 1) t(c) WHERE d <> 'Reserved'")
    return " UNION ALL ".join(parts)


def _source_sql(src: CodeSource, rank: int, raw_tables: dict[str, str], cols: RawColumns) -> str:
    base = rank * 100  # keeps each source's internal priorities below the next source's
    if src.iso18245:
        return (f"SELECT code, description, if(priority >= {RANGE_PRIORITY}, priority, {base} + priority) AS priority "
                f"FROM ({iso18245_sql()})")
    if src.values is not None:
        rows = ", ".join(f"({sql_str(str(k))}, {sql_str(str(v))})" for k, v in src.values.items()) or "(NULL, NULL)"
        return f"SELECT code, description, {base} AS priority FROM (VALUES {rows}) v(code, description)"
    table = raw_tables[src.table]
    return (f"SELECT {cols.sql(src.code, src.table)} AS code, {cols.sql(src.description, src.table)} AS description, "
            f"{base} AS priority FROM {table} AS {sql_ident(src.table)}")


def code_table_sql(name: str, table: CodeTable, raw_tables: dict[str, str], cols: RawColumns) -> str:
    """(code_table, code, description): one description per code, the highest-priority source's."""
    union = " UNION ALL ".join(_source_sql(s, i, raw_tables, cols) for i, s in enumerate(table.sources))
    code = "trim(code)" if table.pad is None else pad_code("trim(code)", table.pad)
    return (f"SELECT {sql_str(name)} AS code_table, {code} AS code, "
            f"arg_min(trim(regexp_replace(description, '\\s+', ' ', 'g')), priority) AS description "
            f"FROM ({union}) WHERE nullif(trim(code), '') IS NOT NULL AND nullif(trim(description), '') IS NOT NULL "
            f"GROUP BY ALL")


def build_codes(con: duckdb.DuckDBPyConnection, target: str, tables: dict[str, CodeTable],
                raw_tables: dict[str, str], cols: RawColumns | None = None) -> None:
    """Code tables hold no `sql:` expressions: they are built on the warehouse connection."""
    cols = cols or RawColumns({})
    selects = [code_table_sql(n, t, raw_tables, cols) for n, t in tables.items()]
    if not selects:
        selects = ["SELECT NULL::VARCHAR AS code_table, NULL::VARCHAR AS code, NULL::VARCHAR AS description "
                   "WHERE false"]
    con.execute(f"CREATE OR REPLACE TABLE {target} AS {' UNION ALL '.join(selects)} ORDER BY code_table, code")
