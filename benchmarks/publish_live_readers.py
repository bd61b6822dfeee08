"""Online reads while `publish --materialize` re-publishes new data (issue 11, point 4).

    python benchmarks/publish_live_readers.py --home /tmp/live --users 943 --dim 576 --readers 4

Writes synthetic feature files in the shapes `llm4es aggregate` and `llm4es embed` write (agg features
and one LLM4ES set, `--users` users, vectors of `--dim`), publishes them as of 1998-01-01 with
materialization, then starts `--readers` threads calling Feast's `get_online_features` for every user in
a loop and publishes a second snapshot (1998-03-01, other values) with materialization. Prints, per
online store (SQLite; Redis at 127.0.0.1:6379 when it answers): the reads during the publish, the
failed reads, the values that were null or neither the old nor the new one, and the publish's seconds.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe  # noqa: E402

DATASET = "live-bench"
SCHEMA = "live_bench"


def write_snapshot(home, when: datetime, users: list[int], dim: int, seed: int) -> dict[str, dict]:
    """The two feature files of one as-of time; the values each user must then be served."""
    rng = np.random.default_rng(seed)
    folder = home.data_dir / SCHEMA
    (folder / "embeddings").mkdir(parents=True, exist_ok=True)
    n = len(users)
    n_events = rng.integers(1, 500, size=n)
    agg = pa.table({"user_id": pa.array(users, pa.int64()),
                    "feature_timestamp": pa.array([when] * n, pa.timestamp("us")),
                    "n_events": pa.array(n_events, pa.int64())})
    meta = {b"llm4es": json.dumps({"produced_at": datetime(2025, 1, when.month).isoformat()}).encode()}
    pq.write_table(agg.replace_schema_metadata(meta), folder / "agg_features.parquet")
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    vector = pa.ListArray.from_arrays(offsets, pa.array(vecs.reshape(-1)))
    emb = pa.table({"user_id": pa.array(users, pa.int64()), "vector": vector,
                    "model": ["smollm2-135m"] * n, "checkpoint": ["base"] * n, "layers": ["9:31"] * n,
                    "text_kind": ["serialized"] * n, "feature_timestamp": pa.array([when] * n, pa.timestamp("us")),
                    "produced_at": pa.array([datetime(2025, 1, when.month)] * n, pa.timestamp("us"))})
    pq.write_table(emb, folder / "embeddings" / "base.parquet")
    return {f"{SCHEMA}__agg_features__n_events": dict(zip(users, n_events.tolist())),
            f"{SCHEMA}__llm4es_embedding__vector": {u: vecs[i].tobytes() for i, u in enumerate(users)}}


def run(root: Path, online_store: str, users: list[int], dim: int, readers: int) -> dict:
    from producers.publish import PublishConfig, get_store, publish
    from producers.stores.warehouse import Home

    shutil.rmtree(root, ignore_errors=True)
    home = Home.resolve(root)
    config = PublishConfig(online_store=online_store, materialize=True)
    old = write_snapshot(home, datetime(1998, 1, 1), users, dim, seed=1)
    publish(home, DATASET, config)
    new = write_snapshot(home, datetime(1998, 3, 1), users, dim, seed=2)
    refs = [f"{SCHEMA}__agg_features:n_events", f"{SCHEMA}__llm4es_embedding:vector"]
    stop, publishing = threading.Event(), threading.Event()
    counts = {"reads": 0, "failed": 0, "null_or_wrong": 0, "reads_during": 0}
    errors: list[str] = []

    def loop() -> None:
        store = get_store(home, online_store)
        rows = [{"user_id": u} for u in users]
        while not stop.is_set():
            during = publishing.is_set()
            try:
                got = store.get_online_features(features=refs, entity_rows=rows, full_feature_names=True).to_dict()
            except Exception as e:  # noqa: BLE001 - counting what a reader would see
                counts["failed"] += 1
                errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            counts["reads"] += 1
            counts["reads_during"] += during
            for col, values in got.items():
                if col == "user_id":
                    continue
                for u, v in zip(users, values):
                    v = None if v is None else np.asarray(v, np.float32).tobytes() if col.endswith("vector") else v
                    if v is None or (v != old[col][u] and v != new[col][u]):
                        counts["null_or_wrong"] += 1

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(readers)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    publishing.set()
    started = time.perf_counter()
    publish(home, DATASET, config)
    seconds = time.perf_counter() - started
    publishing.clear()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    if online_store == "redis":  # leave nothing of this run in the shared Redis
        store = get_store(home, "redis")
        store.apply([], objects_to_delete=store.list_feature_views(), partial=False)
    return {**counts, "publish_s": round(seconds, 2), "first_errors": sorted(set(errors))[:3]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True, help="a scratch folder (emptied)")
    ap.add_argument("--users", type=int, default=943)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--readers", type=int, default=4)
    args = ap.parse_args(argv)
    print(describe())
    users = list(range(1, args.users + 1))
    stores = ["sqlite"]
    try:
        import redis

        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
        stores.append("redis")
    except Exception as e:  # noqa: BLE001
        print(f"redis: skipped ({e})")
    for store in stores:
        result = run(args.home / store, store, users, args.dim, args.readers)
        print(f"{store}: {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    main()
