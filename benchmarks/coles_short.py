"""CoLES cost on short histories: tens of thousands of customers with about two purchases each.

    python benchmarks/coles_short.py                       # 20,000 customers, ~2 events each, 10 epochs
    python benchmarks/coles_short.py --epochs 2
    PYTHONPATH=/path/to/other/checkout python benchmarks/coles_short.py   # the same data, other code

Generates the purchases (Poisson(2) events per customer, at least one; a category, an amount),
ingests them, and runs `llm4es coles` with its defaults (except --epochs) on the CPU, printing
the machine, what the stage said (warnings, the training plan), the epochs' batch counts and
the wall-clock time of the stage.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

try:  # the code on PYTHONPATH (or installed) if any, so another checkout can be measured on the same data
    import producers  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.machine import describe  # noqa: E402

MAPPING = """
name: shortbench
tables: {purchases: {file: purchases.csv}}
events:
  table: purchases
  user: customer
  user_dtype: BIGINT
  time: {column: ts, format: "%Y-%m-%d %H:%M:%S"}
  fields:
    - {name: category, label: Category, kind: categorical, column: category}
    - {name: amount, label: Amount, kind: numeric, column: amount, dtype: DOUBLE}
"""


def write_source(folder: Path, customers: int, mean_events: float, seed: int) -> int:
    rng = np.random.default_rng(seed)
    counts = np.maximum(1, rng.poisson(mean_events, customers))
    n = int(counts.sum())
    customer = np.repeat(np.arange(1, customers + 1), counts)
    ts = np.datetime64("2021-01-01T00:00:00") + rng.integers(0, 365 * 86400, n).astype("timedelta64[s]")
    category = rng.choice([f"c{i}" for i in range(40)], n)
    amount = np.round(np.exp(rng.normal(3, 1, n)), 2)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "purchases.csv", "w") as f:
        f.write("customer,ts,category,amount\n")
        for row in zip(customer, ts.astype(str), category, amount):
            f.write(",".join(map(str, row)).replace("T", " ") + "\n")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=20_000)
    ap.add_argument("--mean-events", type=float, default=2.0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import producers
    from producers.coles import ColesConfig, coles
    from producers.datasets.definition import parse_definition
    from producers.ingest import IngestConfig, ingest
    from producers.stores.warehouse import Home

    print(describe())
    print(f"code: {Path(producers.__file__).resolve().parents[1]}")
    with tempfile.TemporaryDirectory() as tmp:
        n = write_source(Path(tmp) / "src", args.customers, args.mean_events, seed=0)
        print(f"{args.customers:,} customers, {n:,} events ({n / args.customers:.2f} per customer)")
        home = Home.resolve(Path(tmp) / "home")
        ingest(home, parse_definition(MAPPING, "shortbench.yaml"), IngestConfig(source=Path(tmp) / "src"))
        t = time.perf_counter()
        r = coles(home, "shortbench", ColesConfig(epochs=args.epochs, device="cpu", threads=args.threads,
                                                  force=True, progress=False),
                  log=lambda m: print(f"  · {m}", flush=True))
        print(f"coles: {time.perf_counter() - t:.0f}s for {args.epochs} epochs ({r.train_seconds:.0f}s training), "
              f"{r.n_users:,} vectors, final loss {r.final_loss:.4f}")


if __name__ == "__main__":
    main()
