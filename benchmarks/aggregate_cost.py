"""The aggregate stage alone, full run and refresh, on a home kept by `benchmarks/refresh.py --workdir DIR`.

    python benchmarks/refresh.py --visitors 10000 --workdir /tmp/w10k     # once
    python benchmarks/aggregate_cost.py /tmp/w10k --reps 12                # this code
    git show 9868e3b:producers/aggregate.py > /tmp/agg_old.py
    python benchmarks/aggregate_cost.py /tmp/w10k --reps 12 --against /tmp/agg_old.py   # and another version

Each repetition copies DIR/home.before-refresh (the home just before the benchmark's refresh: the delta
appended and validated) and runs `aggregate` on the copy: `refresh` recomputes the users with events after the
served snapshot (the benchmark's 1%) with its columns, as `llm4es refresh` does; `full` recomputes everyone.
`--against` runs another version of producers/aggregate.py too, interleaved, and checks both give the same
rows (integers equal, floats within 1e-12 relative, NULLs alike). Prints the minimum and median seconds of
the call (`total`: with the connection's open and close) and of the stage's own work (`inner`: _refresh or
_aggregate). Other processes on the machine make single runs noisy: compare minimums.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe  # noqa: E402
from benchmarks.refresh import DATASET  # noqa: E402
from producers.stores.warehouse import Home  # noqa: E402


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"aggregate_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run(module, home: Home, mode: str) -> tuple[float, float, object]:
    """(total, inner seconds, the rows written) of one aggregate call on `home`."""
    con = home.connect(read_only=True)
    try:
        schema = con.execute("SELECT schema_name FROM duckdb_tables() WHERE table_name = 'agg_features_meta'"
                             ).fetchall()[0][0]
        categories, served_as_of, config = con.execute(
            f'SELECT categories, as_of, config FROM "{schema}".agg_features_meta').fetchall()[0]
        as_of = con.execute(f'SELECT max(event_time) FROM "{schema}".events').fetchall()[0][0]
        users = [u for (u,) in con.execute(f'SELECT user_id FROM "{schema}".events GROUP BY 1 '
                                           "HAVING max(event_time) > ? ORDER BY 1", [served_as_of]).fetchall()]
    finally:
        con.close()
    config = json.loads(config)
    common = dict(top_n=config["top_n"], max_text_values=config["max_text_values"],
                  amount_field=config["amount_field"])
    if mode == "refresh":
        cfg = module.AggregateConfig(**common, as_of=as_of, users=tuple(users), categories=json.loads(categories))
    else:
        cfg = module.AggregateConfig(**common)
    name = "_refresh" if mode == "refresh" else "_aggregate"
    inner, timed = [], getattr(module, name)

    def timing(*args, **kwargs):
        started = time.perf_counter()
        try:
            return timed(*args, **kwargs)
        finally:
            inner.append(time.perf_counter() - started)

    setattr(module, name, timing)
    try:
        started = time.perf_counter()
        result = module.aggregate(home, DATASET, cfg)
        total = time.perf_counter() - started
    finally:
        setattr(module, name, timed)
    import pyarrow.parquet as pq

    return total, inner[0], pq.read_table(result.parquet_path)


def same(a, b) -> float:
    """The largest relative difference of two row sets' floats; raises when they differ otherwise."""
    import numpy as np
    import pyarrow as pa

    if a.schema.remove_metadata() != b.schema.remove_metadata() or a.num_rows != b.num_rows:
        raise SystemExit(f"the versions write other columns or rows: {a.schema} vs {b.schema}")
    worst = 0.0
    for name in a.column_names:
        x, y = a.column(name), b.column(name)
        if x.is_null().to_pylist() != y.is_null().to_pylist():
            raise SystemExit(f"{name}: NULLs differ")
        if pa.types.is_floating(x.type):
            xv, yv = (c.to_numpy(zero_copy_only=False) for c in (x, y))
            diff = np.abs(xv - yv)[xv != yv] / np.maximum(np.abs(xv[xv != yv]), 1e-300)
            diff = diff[~np.isnan(diff)]
            worst = max(worst, float(diff.max()) if diff.size else 0.0)
        elif x.to_pylist() != y.to_pylist():
            raise SystemExit(f"{name}: values differ")
    if worst > 1e-12:
        raise SystemExit(f"floats differ by up to {worst:.2e} (relative)")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--modes", default="refresh,full")
    ap.add_argument("--against", type=Path, default=None, help="another producers/aggregate.py to time too")
    args = ap.parse_args()
    before = args.workdir / "home.before-refresh"
    if not before.is_dir():
        sys.exit(f"{before} is missing: run benchmarks/refresh.py --workdir {args.workdir} first")
    import producers.aggregate as this

    versions = {"this": this, **({"against": load(args.against)} if args.against else {})}
    print(describe())
    with tempfile.TemporaryDirectory(prefix="llm4es-aggcost-") as tmp:
        for mode in args.modes.split(","):
            seconds = {v: ([], []) for v in versions}
            rows = {}
            for rep in range(args.reps):
                order = list(versions) if rep % 2 == 0 else list(reversed(versions))
                for v in order:
                    home_dir = Path(tmp) / "home"
                    shutil.rmtree(home_dir, ignore_errors=True)
                    shutil.copytree(before, home_dir, symlinks=True)
                    total, inner, rows[v] = run(versions[v], Home.resolve(home_dir), mode)
                    seconds[v][0].append(total)
                    seconds[v][1].append(inner)
            for v, (total, inner) in seconds.items():
                print(f"{mode} {v}: total min {min(total):.3f}s median {statistics.median(total):.3f}s; "
                      f"inner min {min(inner):.3f}s median {statistics.median(inner):.3f}s ({args.reps} runs)")
            if "against" in rows:
                print(f"{mode}: same rows ({rows['this'].num_rows:,} x {rows['this'].num_columns}), floats within "
                      f"{same(rows['against'], rows['this']):.1e} relative")


if __name__ == "__main__":
    main()
