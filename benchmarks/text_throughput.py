"""Text stages throughput: `serialize` + `enrich` (template, 7 variants) in users per second.

    python benchmarks/text_throughput.py                          # 1,000 users x ~300 events
    python benchmarks/text_throughput.py --users 2000 --events-per-user 400 --max-tokens 2048
    PYTHONPATH=/path/to/other/checkout python benchmarks/text_throughput.py   # the same data, other code

A generated bank-like table (MCC codes with descriptions, a signed amount, a channel) goes
through the product's own stages: ingest, serialize (exact token budget), enrich with the
template enricher (7 formats, each cut to the budget). Validation is skipped (`force`): it is
not a text stage. Printed: the machine, seconds per stage, users/s for serialize + enrich, and,
with --profile, where enrich spends its time (cProfile, top functions by cumulative time).
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import pstats
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
name: textbench
tables: {tx: {file: tx.csv}}
event_noun: card transactions
events:
  table: tx
  user: client
  user_dtype: BIGINT
  time: {column: ts, display: "%Y-%m-%d %H:%M"}
  fields:
    - {name: mcc, label: MCC category, kind: categorical, column: mcc, codes: mcc}
    - {name: amount, label: Amount, kind: numeric, column: amount, dtype: DOUBLE}
    - {name: channel, label: Channel, kind: categorical, column: channel}
  summary: {group_by: mcc, measures: [amount], stat: sum}
codes: {mcc: {sources: [{iso18245: true}], pad: 4}}
"""
MCCS = ["5411", "5812", "6011", "4829", "5999", "5912", "5541", "0742", "5814", "4814", "5311", "5691"]


def write_source(folder: Path, users: int, per_user: int, seed: int) -> Path:
    """tx.csv: `per_user` events per user on average (Poisson), spread over a year."""
    rng = np.random.default_rng(seed)
    counts = np.maximum(1, rng.poisson(per_user, users))
    n = int(counts.sum())
    client = np.repeat(np.arange(1, users + 1), counts)
    ts = np.datetime64("2020-01-01T00:00") + rng.integers(0, 365 * 24 * 60, n).astype("timedelta64[m]")
    mcc = rng.choice(MCCS, n, p=np.linspace(2, 0.2, len(MCCS)) / np.linspace(2, 0.2, len(MCCS)).sum())
    amount = np.round(-np.exp(rng.normal(6, 1.2, n)), 2)
    channel = rng.choice(["pos", "web", "atm"], n)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "tx.csv", "w") as f:
        f.write("client,ts,mcc,amount,channel\n")
        for row in zip(client, ts.astype(str), mcc, amount, channel):
            f.write(",".join(map(str, row)) + "\n")
    (folder / "mapping.yaml").write_text(MAPPING)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--events-per-user", type=int, default=300)
    ap.add_argument("--variants", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="cProfile the enrich stage and print the top functions")
    args = ap.parse_args()

    from producers.datasets.definition import parse_definition
    from producers.enrich.run import EnrichConfig, enrich
    from producers.ingest import IngestConfig, ingest
    from producers.serialize.run import SerializeConfig, serialize
    from producers.stores.warehouse import Home
    from producers.shared.models import load_tokenizer, resolve_model

    import producers

    print(describe())
    print(f"code: {Path(producers.__file__).resolve().parents[1]}")
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    with tempfile.TemporaryDirectory() as tmp:
        source = write_source(Path(tmp) / "src", args.users, args.events_per_user, args.seed)
        definition = parse_definition(MAPPING, str(source / "mapping.yaml"))
        home = Home.resolve(Path(tmp) / "home")
        t = time.perf_counter()
        ingest(home, definition, IngestConfig(source=source))
        print(f"ingest: {time.perf_counter() - t:.1f}s (not counted)")

        t = time.perf_counter()
        s = serialize(home, definition.name, SerializeConfig(max_tokens=args.max_tokens, force=True),
                      tokenizer=tokenizer)
        t_serialize = time.perf_counter() - t
        print(f"serialize: {t_serialize:.2f}s for {s.n_texts:,} users ({s.n_events_total:,} events, "
              f"{s.n_events:,} kept within {args.max_tokens} tokens)")

        config = EnrichConfig(variants=args.variants, max_tokens=args.max_tokens, force=True)
        profiler = cProfile.Profile() if args.profile else None
        t = time.perf_counter()
        if profiler:
            profiler.enable()
        r = enrich(home, definition.name, config, tokenizer=tokenizer)
        if profiler:
            profiler.disable()
        t_enrich = time.perf_counter() - t
        con = home.connect(read_only=True)
        kept, tokens, over = con.execute(
            "SELECT avg(n_events), avg(n_tokens), count(*) FILTER (n_tokens > ?) FROM textbench.texts "
            "WHERE kind = 'template'", [args.max_tokens]).fetchone()
        # digests of every text and count, per kind and format: equal digests = the same output from two checkouts
        texts = con.execute("SELECT kind, format, list((user_id, variant, text, n_events, n_tokens) "
                            "ORDER BY user_id, variant) FROM textbench.texts GROUP BY ALL ORDER BY ALL").fetchall()
        con.close()
        digest = ", ".join(f"{kind}/{fmt} {hashlib.sha256(repr(rows).encode()).hexdigest()[:8]}"
                           for kind, fmt, rows in texts)
        print(f"enrich: {t_enrich:.2f}s for {r.users:,} users x {args.variants} variants "
              f"({r.users * args.variants / t_enrich:,.0f} texts/s; {kept:.0f} events and {tokens:.0f} tokens "
              f"per text on average; {over} over budget)")
        total = t_serialize + t_enrich
        print(f"serialize + enrich: {total:.2f}s, {s.n_texts / total:,.0f} users/s")
        print(f"texts digests: {digest}")
        if profiler:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
