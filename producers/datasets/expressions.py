"""What a mapping's `sql:` entry may be: one DuckDB expression over the declared tables' columns.

Mappings are shared, so an expression is treated as untrusted text. It is parsed (not run) as
the single item of `SELECT (<expr>)`; anything else is refused before any data is read:
several statements, a `FROM`, a subquery, or a table function (`read_csv`, `read_text`, ...).
This check is the first of two guards: the ingest also evaluates expressions on a connection
that has no file or network access (`producers.ingest.sandbox`), so a case missed here still
cannot reach the machine.
"""
from __future__ import annotations

import json
from functools import lru_cache

import duckdb

# Clauses of the wrapping SELECT that an expression must leave empty.
_CLAUSES = ("where_clause", "having", "qualify", "sample")


@lru_cache(maxsize=1)
def _table_functions() -> frozenset[str]:
    """Every table function and table macro DuckDB knows (they read files, URLs, catalogs)."""
    con = _parser().cursor()
    rows = con.execute("SELECT DISTINCT lower(function_name) FROM duckdb_functions() "
                       "WHERE function_type IN ('table', 'table_macro')").fetchall()
    con.close()
    return frozenset(r[0] for r in rows)


@lru_cache(maxsize=1)
def _parser() -> duckdb.DuckDBPyConnection:
    """One in-memory DuckDB for parsing (use a cursor of it per call: cursors may run in any thread).

    It only parses; it has no file or network access either way, in case a future DuckDB
    evaluates something while parsing."""
    return duckdb.connect(config={"enable_external_access": False, "lock_configuration": True})


def check_expression(sql: str) -> None:
    """Raise ValueError saying why `sql` is not one plain expression."""
    problem = _problem(sql)
    if problem:
        raise ValueError(problem)


@lru_cache(maxsize=1024)  # a stored definition is re-read by every stage: parse each text once
def _problem(sql: str) -> str | None:
    try:
        _check(sql)
    except ValueError as e:
        return str(e)
    return None


def _check(sql: str) -> None:
    wrapped = f"SELECT (\n{sql}\n) AS v"
    try:
        statements = duckdb.extract_statements(wrapped)
    except duckdb.Error as e:
        raise ValueError(f"not a valid SQL expression ({_first_line(e)})") from None
    if len(statements) != 1:
        raise ValueError("must be one SQL expression; it holds several statements")
    con = _parser().cursor()
    try:
        (blob,) = con.execute("SELECT json_serialize_sql(?::VARCHAR)", [wrapped]).fetchone()
    finally:
        con.close()
    tree = json.loads(blob)
    if tree.get("error"):
        raise ValueError(f"not a valid SQL expression ({tree.get('error_message', 'unparsable')})")
    node = tree["statements"][0]["node"]
    if (node.get("type") != "SELECT_NODE" or len(node.get("select_list", [])) != 1
            or node.get("from_table", {}).get("type") != "EMPTY" or node.get("group_expressions")
            or node.get("modifiers") or node.get("cte_map", {}).get("map") or any(node.get(c) for c in _CLAUSES)):
        raise ValueError("must be one SQL expression over the declared tables' columns (no FROM, WHERE, "
                         "GROUP BY or other clauses)")
    _check_tree(node["select_list"][0])


def _check_tree(item) -> None:
    if isinstance(item, dict):
        if item.get("class") == "SUBQUERY" or item.get("type") in ("SUBQUERY", "TABLE_FUNCTION"):
            raise ValueError("must not hold a subquery: an expression reads only the declared tables' columns")
        if item.get("class") == "FUNCTION" and str(item.get("function_name", "")).lower() in _table_functions():
            raise ValueError(f"must not call the table function {item['function_name']}(): an expression may not "
                             "read files, URLs or other tables")
        for value in item.values():
            _check_tree(value)
    elif isinstance(item, list):
        for value in item:
            _check_tree(value)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
