"""Appending a day's events against re-ingesting everything (issue 14's benchmark dataset).

    python benchmarks/append_delta.py --visitors 10000 --mean-sessions 11.5 --delta-share 0.01

Generates the bank-clickstream dataset (producers/synthetic: 10,000 visitors, about 1M clicks
over a year) and a follow-up delta: new sessions, a week after the base ends, for 1% of the
visitors (their ids remapped onto base visitors, so they are existing users with new events).
Then times, on the same machine:
- a full ingest of the base (the state before the day)
- `ingest --append` of the delta, and `changed_users` since the base's last event
- the alternative: a full re-ingest of base + delta into a fresh warehouse
and checks the appended warehouse equals the re-ingested one (same events), and that
`changed_users` returns exactly the delta's visitors. `--validate` also times the GX data gate
(it always runs on the whole table). Prints the figures and the machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.machine import describe, peak_rss_mib, timed  # noqa: E402
from producers.datasets.definition import load_builtin  # noqa: E402
from producers.ingest import IngestConfig, ingest  # noqa: E402
from producers.ingest.append import append  # noqa: E402
from producers.ingest.delta import changed_users  # noqa: E402
from producers.stores.warehouse import Home  # noqa: E402
from producers.synthetic.clickstream import ClickstreamConfig, generate_clickstream, write_clickstream  # noqa: E402

DATASET = "bank-clickstream"


def write_delta(folder: Path, base: ClickstreamConfig, share: float, days: int, seed: int) -> list[int]:
    """clicks.csv of new sessions for `share` of the base visitors, starting the week after the base ends."""
    n = max(1, round(base.visitors * share))
    cfg = replace(base, visitors=n, seed=seed, start=base.start + timedelta(days=base.days + 7), days=days,
                  mean_sessions=2.0)
    data = generate_clickstream(cfg)
    chosen = np.sort(np.random.default_rng(seed).choice(np.arange(1, base.visitors + 1), n, replace=False))
    clicks = data.clicks.copy()
    clicks["visitor_id"] = chosen[clicks["visitor_id"].to_numpy() - 1]
    clicks["session_id"] = "d" + clicks["session_id"]  # session ids of another day's export
    folder.mkdir(parents=True, exist_ok=True)
    clicks.to_csv(folder / "clicks.csv", float_format="%.1f", lineterminator="\n", index=False)
    return sorted({int(v) for v in clicks["visitor_id"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--visitors", type=int, default=10_000)
    ap.add_argument("--mean-sessions", type=float, default=11.5)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--delta-share", type=float, default=0.01)
    ap.add_argument("--delta-days", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="timings are the median of this many runs")
    ap.add_argument("--validate", action="store_true", help="also time the GX data gate after the append")
    ap.add_argument("--gate-dim", type=int, default=768,
                    help="also time the snapshot gate on a random snapshot of --visitors users "
                         "x this dimension (0: skip)")
    ap.add_argument("--keep", type=Path, help="generate into this folder and keep it (default: a temp folder)")
    args = ap.parse_args()
    print(describe())
    print(f"load average before: {os.getloadavg()[0]:.1f} (1 min)")
    definition = load_builtin(DATASET)
    with tempfile.TemporaryDirectory(prefix="llm4es-bench-append-") as tmp:
        root = args.keep or Path(tmp)
        base_cfg = ClickstreamConfig(visitors=args.visitors, seed=args.seed, days=args.days,
                                     mean_sessions=args.mean_sessions, start=date(2024, 1, 1))
        gen, dt = timed(lambda: write_clickstream(root / "base", base_cfg))
        print(f"generated base: {gen.n_visitors:,} visitors, {gen.n_events:,} clicks in {dt:.1f}s")
        delta_users = write_delta(root / "delta", base_cfg, args.delta_share, args.delta_days, args.seed + 1)
        n_delta = len((root / "delta" / "clicks.csv").read_text().splitlines()) - 1
        print(f"generated delta: {n_delta:,} clicks for {len(delta_users):,} visitors "
              f"({len(delta_users) / args.visitors:.1%})")
        # The full re-ingest's source: base and delta in one file.
        (root / "full").mkdir(exist_ok=True)
        delta_rows = (root / "delta" / "clicks.csv").read_text().splitlines(keepends=True)[1:]
        (root / "full" / "clicks.csv").write_text((root / "base" / "clicks.csv").read_text() + "".join(delta_rows))
        (root / "full" / "visitors.csv").write_bytes((root / "base" / "visitors.csv").read_bytes())

        home = Home.resolve(root / "home")
        r, t_base = timed(lambda: ingest(home, definition, IngestConfig(root / "base")))
        print(f"full ingest of the base:       {t_base:7.2f}s ({r.n_events:,} events)")
        con = home.connect(read_only=True)
        since = con.execute('SELECT max(event_time) FROM "bank_clickstream".events').fetchall()[0][0]
        con.close()

        # Each append runs on its own copy of the base warehouse, each re-ingest into a fresh one.
        homes = []
        for i in range(args.repeat):
            shutil.copytree(home.root, root / f"home-{i}")
            homes.append(Home.resolve(root / f"home-{i}"))
        runs = [timed(lambda h=h: append(h, definition, IngestConfig(root / "delta"))) for h in homes]
        a, t_append = runs[0][0], statistics.median(t for _, t in runs)
        home = homes[0]
        print(f"ingest --append of the delta:  {t_append:7.2f}s (median of {args.repeat}: "
              f"{', '.join(f'{t:.2f}' for _, t in runs)}; +{a.rows_added:,} events, {a.duplicates_skipped:,} "
              f"duplicates, {a.users_touched:,} users, {a.min_event_time} .. {a.max_event_time})")
        changed = [timed(lambda: changed_users(home, definition.schema, since)) for _ in range(args.repeat)]
        users, t_changed = changed[0][0], statistics.median(t for _, t in changed)
        print(f"changed_users since {since}: {t_changed:7.3f}s ({len(users):,} users; "
              f"{'exactly the delta visitors' if users == delta_users else 'NOT the delta visitors'})")
        again, t_again = timed(lambda: append(home, definition, IngestConfig(root / "delta")))
        print(f"re-append of the same delta:   {t_again:7.2f}s ({again.rows_added} added, "
              f"{again.duplicates_skipped:,} duplicates skipped)")

        fulls = [timed(lambda i=i: ingest(Home.resolve(root / f"home-full-{i}"), definition,
                                                  IngestConfig(root / "full"))) for i in range(args.repeat)]
        f, t_full = fulls[0][0], statistics.median(t for _, t in fulls)
        full_home = Home.resolve(root / "home-full-0")
        print(f"full re-ingest, base + delta:  {t_full:7.2f}s (median of {args.repeat}: "
              f"{', '.join(f'{t:.2f}' for _, t in fulls)}; {f.n_events:,} events)")
        same = _same_events(home, full_home, definition.schema)
        print(f"appended warehouse == re-ingested warehouse (events, users): {same}")
        print(f"append + changed_users / full re-ingest: {(t_append + t_changed) / t_full:.1%} "
              f"(target of issue 14 for a refresh: <= 5%)")
        if args.validate:
            from validation.run import ValidateConfig, validate

            rep, t_val = timed(lambda: validate(home, DATASET, ValidateConfig(data_docs=False)))
            print(f"GX data gate on the appended table: {t_val:7.1f}s ({'passed' if rep.success else 'FAILED'})")
        if args.gate_dim:
            _time_gate(args.visitors, args.gate_dim, delta_users)
        print(f"peak RSS: {peak_rss_mib():,.0f} MiB; load average after: {os.getloadavg()[0]:.1f} (1 min)")


def _time_gate(n: int, dim: int, changed: list[int]) -> None:
    """The snapshot gate on a refresh of `changed` users (new draws) against the previous full snapshot."""
    import pyarrow as pa

    from producers.stores.warehouse import float32_lists
    from validation.snapshot_gate import check_snapshot

    rng = np.random.default_rng(0)
    old = rng.standard_normal((n, dim)) * np.linspace(2.0, 0.2, dim)
    new = old.copy()
    rows = np.asarray(changed) - 1
    new[rows] = rng.standard_normal((len(rows), dim)) * np.linspace(2.0, 0.2, dim)
    users = np.arange(1, n + 1)
    unchanged = np.setdiff1d(users, changed)
    snap = lambda m: pa.table({"user_id": users, "vector": float32_lists(m)})  # noqa: E731
    report, dt = timed(lambda: check_snapshot(snap(new), snap(old), unchanged_users=unchanged))
    print(f"snapshot gate, {n:,} users x {dim} dims against the previous snapshot: {dt:6.2f}s "
          f"({len(report.checks)} checks, {'passed' if report.success else 'FAILED'})")


def _same_events(a: Home, b: Home, schema: str) -> bool:
    import duckdb

    con = duckdb.connect()
    try:
        con.execute(f"ATTACH '{a.warehouse_path}' AS a (READ_ONLY)")
        con.execute(f"ATTACH '{b.warehouse_path}' AS b (READ_ONLY)")
        for table in ("events", "users"):
            diff = con.execute(f'SELECT count(*) FROM ((SELECT * FROM a."{schema}".{table} EXCEPT ALL '
                               f'SELECT * FROM b."{schema}".{table}) UNION ALL (SELECT * FROM b."{schema}".{table} '
                               f'EXCEPT ALL SELECT * FROM a."{schema}".{table}))').fetchall()[0][0]
            if diff:
                return False
        return True
    finally:
        con.close()


if __name__ == "__main__":
    main()
