"""Ingest and validation throughput on a generated transaction table.

    python benchmarks/ingest_validate.py --events 10000000 --users 100000
    python benchmarks/ingest_validate.py --events 2000000 --variant decimal-comma --skip-validate

Writes a CSV in a bank-like layout (user, time, MCC, amount, channel) plus a label file, then
times `ingest` (CSV -> typed warehouse tables, with rejects) and `validate` (GX, chunked by
user hash) on it, and prints events/s and peak memory with the machine.

`--variant` writes the same rows as a European or joined export: `decimal-comma` (amounts 123,45,
the field declared `decimal: ","`), `mixed-endings` (the first half of the lines CRLF, the rest LF:
read from a copy with LF endings).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb  # noqa: E402

from benchmarks.machine import describe, peak_rss_mib  # noqa: E402
from producers.datasets.definition import parse_definition  # noqa: E402
from producers.ingest import IngestConfig, ingest  # noqa: E402
from producers.stores.warehouse import Home  # noqa: E402
from validation.run import ValidateConfig, validate  # noqa: E402

MAPPING = """
name: bench
tables:
  tx: {file: tx.csv}
  labels: {file: labels.csv}
events:
  table: tx
  user: client
  user_dtype: BIGINT
  time: {column: ts, format: "%Y-%m-%d %H:%M:%S", window: ["2020-01-01", "2022-01-01"]}
  fields:
    - {name: mcc, label: MCC, kind: categorical, column: mcc, codes: mcc}
    - {name: amount, label: Amount, kind: numeric, column: amount, dtype: DOUBLE, min: -1000000, max: 1000000}
    - {name: channel, label: Channel, kind: categorical, column: channel, values: [web, pos, atm]}
users:
  table: labels
  user: client
  labels:
    - {name: target, task: binary, column: target, dtype: INTEGER, values: [0, 1]}
codes:
  mcc: {sources: [{iso18245: true}], pad: 4}
"""


def generate(folder: Path, n_events: int, n_users: int, variant: str = "plain") -> None:
    con = duckdb.connect()
    amount = "round(((hash(i * 13) % 200000)::DOUBLE - 50000) / 100, 2)"
    if variant == "decimal-comma":
        amount = f"replace(CAST({amount} AS VARCHAR), '.', ',')"
    con.execute(f"""COPY (
        SELECT (i % {n_users}) AS client,
               strftime(TIMESTAMP '2020-01-01' + to_seconds((hash(i) % 31536000)::BIGINT), '%Y-%m-%d %H:%M:%S') AS ts,
               ([5411, 5812, 6011, 4829, 5999, 5912, 5541, 742])[1 + (hash(i * 7) % 8)::BIGINT] AS mcc,
               {amount} AS amount,
               (['web', 'pos', 'atm'])[1 + (hash(i * 3) % 3)::BIGINT] AS channel
        FROM range({n_events}) t(i)) TO '{folder / "tx.csv"}' (HEADER)""")
    if variant == "mixed-endings":  # two exports joined: the first written on Windows
        data = (folder / "tx.csv").read_bytes()
        half = data.index(b"\n", len(data) // 2) + 1
        (folder / "tx.csv").write_bytes(data[:half].replace(b"\n", b"\r\n") + data[half:])
    con.execute(f"COPY (SELECT i AS client, i % 2 AS target FROM range({n_users}) t(i)) "
                f"TO '{folder / 'labels.csv'}' (HEADER)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--chunk-rows", type=int, default=2_000_000)
    ap.add_argument("--variant", choices=["plain", "decimal-comma", "mixed-endings"], default="plain")
    ap.add_argument("--skip-validate", action="store_true")
    args = ap.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "src"
        folder.mkdir()
        t = time.perf_counter()
        generate(folder, args.events, args.users, args.variant)
        print(f"generated {args.events:,} events for {args.users:,} users in {time.perf_counter() - t:.1f}s "
              f"({(folder / 'tx.csv').stat().st_size / 2**20:.0f} MiB CSV)")
        home = Home.resolve(Path(tmp) / "home")
        mapping = MAPPING
        if args.variant == "decimal-comma":
            mapping = mapping.replace("dtype: DOUBLE, min:", 'dtype: DOUBLE, decimal: ",", min:')
        definition = parse_definition(mapping, "benchmark mapping")
        t = time.perf_counter()
        r = ingest(home, definition, IngestConfig(source=folder))
        dt = time.perf_counter() - t
        print(f"ingest:   {dt:7.1f}s  {r.n_events / dt:12,.0f} events/s  "
              f"({r.n_events:,} events, {r.n_rejects} rejects)")
        if args.skip_validate:
            print(f"peak RSS: {peak_rss_mib():,.0f} MiB")
            return
        t = time.perf_counter()
        report = validate(home, "bench", ValidateConfig(chunk_rows=args.chunk_rows, data_docs=False))
        dt = time.perf_counter() - t
        print(f"validate: {dt:7.1f}s  {r.n_events / dt:12,.0f} events/s  ({len(report.results)} checks, "
              f"{'passed' if report.success else 'FAILED'}; chunks of {args.chunk_rows:,} rows)")
        print(f"peak RSS: {peak_rss_mib():,.0f} MiB")


if __name__ == "__main__":
    main()
