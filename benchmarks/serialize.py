"""Serialization throughput: DuckDB SQL against a straightforward pandas groupby-apply, same output.

    python benchmarks/serialize.py                    # MovieLens-100k and 10M generated events
    python benchmarks/serialize.py --events 1000000   # a smaller generated table

Both versions start from the warehouse tables already in memory (pandas is not charged for
loading them), render every event the same way (codes to descriptions, dates, 2-decimal
amounts), order events by time then line, and join them under the header. The outputs must be
identical, text for text. The token budget (an exact count with the SmolLM2 tokenizer) is timed
separately: it is tokenizer work, not serialization.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.machine import describe  # noqa: E402
from producers.datasets.definition import DatasetDefinition, parse_definition  # noqa: E402
from producers.stores.warehouse import sql_str  # noqa: E402
from producers.serialize.render import HEADER_SEP, VALUE_SEP, header, user_bodies_sql  # noqa: E402

GENERATED = """
name: bench
tables: {tx: {file: tx.csv}}
events:
  table: tx
  user: client
  user_dtype: BIGINT
  time: {column: ts, display: "%Y-%m-%d %H:%M"}
  fields:
    - {name: mcc, label: MCC category, kind: categorical, column: mcc, codes: mcc}
    - {name: amount, label: Amount, kind: numeric, column: amount, dtype: DOUBLE}
    - {name: channel, label: Channel, kind: categorical, column: channel}
codes: {mcc: {sources: [{iso18245: true}], pad: 4}}
"""
MCCS = ["5411", "5812", "6011", "4829", "5999", "5912", "5541", "0742", "5814", "4814"]


def generate(con: duckdb.DuckDBPyConnection, n_events: int, n_users: int) -> DatasetDefinition:
    from producers.ingest.codes import build_codes

    d = parse_definition(GENERATED, "benchmark")
    mccs = "[" + ", ".join(f"'{m}'" for m in MCCS) + "]"
    con.execute("CREATE SCHEMA bench")
    con.execute(f"""CREATE TABLE bench.events AS
        SELECT (i % {n_users})::BIGINT AS user_id,
               TIMESTAMP '2020-01-01' + to_seconds((hash(i) % 31536000)::BIGINT) AS event_time,
               {mccs}[1 + (hash(i * 7) % {len(MCCS)})::BIGINT] AS mcc,
               round(((hash(i * 13) % 2000000)::DOUBLE - 500000) / 100, 2) AS amount,
               (['web', 'pos', 'atm'])[1 + (hash(i * 3) % 3)::BIGINT] AS channel
        FROM range({n_events}) t(i) ORDER BY user_id, event_time""")
    build_codes(con, "bench.codes", d.codes, {})
    return d


def movielens(con: duckdb.DuckDBPyConnection, home: Path) -> DatasetDefinition:
    from producers.stores.cache import default_cache_dir
    from producers.ingest.default_sources import fetch_default_source
    from producers.datasets.definition import load_builtin
    from producers.ingest import IngestConfig, ingest
    from producers.stores.warehouse import Home

    d = load_builtin("movielens-100k")
    h = Home.resolve(home)
    ingest(h, d, IngestConfig(source=fetch_default_source(d.name, default_cache_dir())))
    con.execute(f"ATTACH '{h.warehouse_path}' AS wh (READ_ONLY)")
    con.execute(f"CREATE SCHEMA {d.schema}")
    for table in ("events", "codes"):
        con.execute(f"CREATE TABLE {d.schema}.{table} AS SELECT * FROM wh.{d.schema}.{table}")
    con.execute("DETACH wh")
    return d


def serialize_sql(con: duckdb.DuckDBPyConnection, d: DatasetDefinition) -> dict:
    head = header(d)
    rows = con.execute(f"SELECT user_id, {sql_str(head)} || chr(10) || body FROM ({user_bodies_sql(d)})").fetchall()
    return dict(rows)


def serialize_pandas(events: pd.DataFrame, codes: pd.DataFrame, d: DatasetDefinition) -> dict:
    """The same output, written the way one would in pandas: vectorized rendering, groupby-apply join."""
    df = events.copy()
    parts = [df["event_time"].dt.strftime(d.events.time.display)]
    for f in d.serialized_fields:
        col = df[f.name]
        if f.codes:
            table = codes[codes["code_table"] == f.codes].set_index("code")["description"]
            text = col.astype("string").map(table).fillna(col.astype("string"))
        elif f.dtype.upper() == "DOUBLE":
            text = col.map(lambda v, places=f.decimals: "" if pd.isna(v) else f"{v:.{places}f}")
        elif f.dtype.upper() == "VARCHAR":
            text = col.astype("string").str.replace("\r", " ").str.replace("\n", " ")
        else:
            text = col.astype("string")
        parts.append(text.fillna(""))
    df["line"] = parts[0].str.cat(parts[1:], sep=VALUE_SEP)
    head = HEADER_SEP.join([d.events.time.label, *(f.display for f in d.serialized_fields)])
    df = df.sort_values(["user_id", "event_time", "line"])
    return df.groupby("user_id")["line"].apply(lambda lines: head + "\n" + "\n".join(lines)).to_dict()


def run(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, name: str, budget_tokenizer) -> None:
    n = con.execute(f"SELECT count(*) FROM {d.schema}.events").fetchone()[0]
    t = time.perf_counter()
    sql_out = serialize_sql(con, d)
    t_sql = time.perf_counter() - t
    events = con.execute(f"SELECT * FROM {d.schema}.events").df()
    codes = con.execute(f"SELECT * FROM {d.schema}.codes").df()
    t = time.perf_counter()
    pd_out = serialize_pandas(events, codes, d)
    t_pd = time.perf_counter() - t
    same = sql_out == pd_out
    print(f"{name}: {n:,} events, {len(sql_out):,} users")
    print(f"  DuckDB SQL : {t_sql:7.2f}s  {n / t_sql:12,.0f} events/s")
    print(f"  pandas     : {t_pd:7.2f}s  {n / t_pd:12,.0f} events/s")
    print(f"  speed-up   : {t_pd / t_sql:.1f}x   outputs identical: {same}")
    if not same:
        diff = [u for u in sql_out if sql_out[u] != pd_out.get(u)][:3]
        for u in diff:
            print(f"  user {u}:\n    sql   {sql_out[u][:200]!r}\n    pandas {pd_out.get(u, '')[:200]!r}")
    if budget_tokenizer is not None:
        from producers.serialize.budget import fit_texts

        bodies = [t.split("\n", 1)[1] for t in sql_out.values()]
        t = time.perf_counter()
        fitted = fit_texts(budget_tokenizer, header(d), bodies, 2048)
        t_fit = time.perf_counter() - t
        tokens = sum(f.n_tokens for f in fitted)
        print(f"  exact 2048-token budget (SmolLM2 tokenizer): {t_fit:.2f}s for {len(fitted):,} texts "
              f"({n / t_fit:,.0f} events/s; {tokens:,} tokens kept)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--skip-movielens", action="store_true")
    ap.add_argument("--no-budget", action="store_true", help="Skip timing the token budget.")
    args = ap.parse_args()
    print(describe(), f"DuckDB {duckdb.__version__}, pandas {pd.__version__}")
    tok = None
    if not args.no_budget:
        from producers.shared.models import load_tokenizer, resolve_model

        tok = load_tokenizer(resolve_model("smollm2-135m"))
    con = duckdb.connect()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_movielens:
            run(con, movielens(con, Path(tmp)), "MovieLens-100k", tok)
        t = time.perf_counter()
        d = generate(con, args.events, args.users)
        print(f"(generated {args.events:,} events in {time.perf_counter() - t:.1f}s)")
        run(con, d, f"generated {args.events // 1_000_000}M", tok)


if __name__ == "__main__":
    main()
