"""Token efficiency of the serialization formats: events per 1,000 tokens, and events a budget holds.

    python benchmarks/tokens.py                   # MovieLens-100k (from the cache), bank fixtures, states
    python benchmarks/tokens.py --users 200       # bank fixtures and the state sequences with 200 users

Three shapes of data, each ingested, validated and serialized in every format with the default
model's tokenizer (SmolLM2-135M): MovieLens-100k ratings (the real dataset; skipped when it is
not in the cache), the three bank layouts of tests/fixtures/bank_files.py (Rosbank, age group,
gender card transactions), and generated monthly activity states (a person's state repeated month
after month, the long-runs case). Events per 1,000 tokens are over whole texts without a budget
(headers included); "events in 256 / 2048 tokens" are the mean events per user a budget keeps.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe  # noqa: E402
from producers.datasets.definition import load_builtin, parse_definition  # noqa: E402
from producers.ingest import IngestConfig, ingest  # noqa: E402
from producers.serialize.render import FORMATS  # noqa: E402
from producers.serialize.run import SerializeConfig, serialize  # noqa: E402
from producers.stores.warehouse import Home  # noqa: E402
from validation.run import ValidateConfig, validate  # noqa: E402

STATES_MAPPING = """
name: states
event_noun: monthly activity states
tables: {months: {file: months.csv, delimiter: ","}}
events:
  table: months
  user: person
  user_dtype: BIGINT
  time: {column: month, format: "%Y-%m-%d", display: "%Y-%m-%d"}
  fields:
    - {name: state, label: State, kind: categorical, column: state}
    - {name: region, label: Region, kind: categorical, column: region}
"""
STATES = ["Employed", "Unemployed", "In education", "Self-employed", "Inactive"]


def write_states(folder: Path, n_people: int, seed: int = 0) -> Path:
    """Monthly states for 4-8 years per person: a state lasts 12 months on average."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["person,month,state,region"]
    for p in range(n_people):
        state, region = rng.choice(STATES), rng.choice(["north", "south", "east", "west"])
        year, month = rng.randint(2010, 2014), rng.randint(1, 12)
        for _ in range(rng.randint(48, 96)):
            if rng.random() < 1 / 12:
                state = rng.choice(STATES)
            rows.append(f"{p},{year}-{month:02d}-01,{state},{region}")
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    (folder / "months.csv").write_text("\n".join(rows) + "\n")
    return folder


def measure(home: Home, dataset: str, tokenizer) -> dict[str, dict[str, float]]:
    out = {}
    for fmt in FORMATS:
        row = {}
        for budget in (0, 256, 2048):
            r = serialize(home, dataset, SerializeConfig(max_tokens=budget, format=fmt), tokenizer=tokenizer)
            con = home.connect(read_only=True)
            schema = dataset.replace("-", "_")
            tokens = con.execute(f"SELECT sum(n_tokens) FROM {schema}.texts WHERE kind = 'serialized'").fetchone()[0]
            con.close()
            if budget == 0:
                row["events_per_1k_tokens"] = 1000 * r.n_events / tokens
            else:
                row[f"events_in_{budget}"] = r.n_events / r.n_texts
        out[fmt] = row
    return out


def main() -> None:
    from tests.fixtures.bank_files import write_age_group, write_gender, write_rosbank
    from producers.shared.models import load_tokenizer, resolve_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=300, help="users of the bank fixtures and people of the states")
    ap.add_argument("--only", default=None, help="comma-separated data names (default: all)")
    args = ap.parse_args()
    print(describe())
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = []
        from producers.stores.cache import default_cache_dir
        from producers.ingest.default_sources import fetch_default_source

        cases.append(("movielens-100k", load_builtin("movielens-100k"), None))  # the real data, from the cache
        cases += [("rosbank", load_builtin("rosbank"), write_rosbank(root / "rosbank", n_users=args.users)),
                  ("age-group", load_builtin("age-group"), write_age_group(root / "age", n_users=args.users)),
                  ("gender", load_builtin("gender"), write_gender(root / "gender", n_users=args.users)),
                  ("states", parse_definition(STATES_MAPPING, "benchmark"),
                   write_states(root / "states", args.users))]
        only = set(args.only.split(",")) if args.only else None
        for name, definition, source in cases:
            if only and name not in only:
                continue
            home = Home.resolve(root / f"home-{name}")
            if source is None:
                source = fetch_default_source(name, default_cache_dir())
            ingest(home, definition, IngestConfig(source=source))
            validate(home, name, ValidateConfig(data_docs=False))
            results[name] = measure(home, name, tokenizer)
    print("\n| data | format | events per 1,000 tokens | events in 256 tokens | events in 2,048 tokens |")
    print("|---|---|---|---|---|")
    for name, by_format in results.items():
        base = by_format["paper"]["events_per_1k_tokens"]
        for fmt, row in by_format.items():
            ratio = row["events_per_1k_tokens"] / base
            print(f"| {name} | {fmt} | {row['events_per_1k_tokens']:.1f} ({ratio:.2f}x) | {row['events_in_256']:.1f} "
                  f"| {row['events_in_2048']:.1f} |")


if __name__ == "__main__":
    main()
