"""Time a full `sessions build` on a copy of a benchmark home's warehouse (`benchmarks/refresh.py --workdir DIR`).

    python benchmarks/sessions_build.py /tmp/w10k [--runs 3]

Copies DIR/home.before-refresh/data/warehouse.duckdb to a temporary home and builds every user's sessions
`--runs` times in this process (GX imported first, as the CLI has it); prints wall and CPU seconds per run.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    warehouse = args.workdir / "home.before-refresh" / "data" / "warehouse.duckdb"
    if not warehouse.is_file():
        sys.exit(f"{warehouse} is missing: run benchmarks/refresh.py --workdir {args.workdir} first")
    import great_expectations  # noqa: F401

    from benchmarks.refresh import DATASET
    from producers.sessions import SessionsConfig, build_sessions
    from producers.stores.warehouse import Home

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "data").mkdir()
        shutil.copy(warehouse, Path(tmp) / "data" / "warehouse.duckdb")
        for run in range(args.runs):
            wall, cpu = time.perf_counter(), time.process_time()
            result = build_sessions(Home.resolve(Path(tmp)), DATASET, SessionsConfig())
            print(f"run {run + 1}: {time.perf_counter() - wall:.2f}s wall, {time.process_time() - cpu:.2f}s CPU, "
                  f"{result.n_sessions:,} sessions")


if __name__ == "__main__":
    main()
