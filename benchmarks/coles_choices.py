"""Which CoLES settings: trained self-supervised on every user's events, compared on development users only.

    python benchmarks/coles_choices.py --home H --dataset movielens-100k \\
        --variant base --variant "lens:norm_skips_padding=true" --variant "b32:batch_size=32,epochs=20"

Each `--variant NAME[:key=value,...]` is a `ColesConfig` (its defaults, `device=cpu`, `--threads`,
`--seed`, then the overrides) run through the stage's own code: `records.read_records`,
`train.build_module` / `train.train` (checkpoints in a temporary folder) and `train.infer`, i.e.
what `llm4es coles` does minus the writes. Training uses no labels, so it sees every user.

The vectors are then read only for the *development* users: every labelled user except the paper
protocol's 10% test users of every target (seed 0, as `evaluate` draws them), so the users that
`evaluate --protocol paper` reports on never choose a setting. On them: 5-fold CV (stratified for
classification), evaluate's linear probe and LightGBM; ROC-AUC for binary targets, MAE for
regression, mean +- std over the folds; plus the training time (noisy on a shared machine).

`--poolings` reads the same trained encoder more ways (default: the variant's own `pooling`,
the vector the stage writes): `last`, the GRU state after the last kept event; `mean`, the GRU
states averaged over every kept event; `tail`, the state after the last `cnt_max` events only
(the longest sequence the encoder saw in training).

`--parquet FILE` (repeatable) scores vectors the stage already wrote (`coles_embeddings.parquet`)
on the same development users instead of training.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_variant(text: str) -> tuple[str, dict]:
    from producers.coles import ColesConfig

    name, _, spec = text.partition(":")
    types = {f.name: f.type for f in dataclasses.fields(ColesConfig)}
    overrides: dict = {}
    for item in filter(None, spec.split(",")):
        key, _, raw = item.partition("=")
        if key not in types:
            raise SystemExit(f"variant {name}: {key!r} is not a ColesConfig field")
        kind = str(types[key])
        if "bool" in kind:
            overrides[key] = raw.lower() in ("1", "true", "yes")
        elif "int" in kind:
            overrides[key] = int(raw)
        elif "float" in kind:
            overrides[key] = float(raw)
        else:
            overrides[key] = raw
    return name, overrides


def development_users(home, dataset: str) -> tuple[dict, set]:
    """{target: (user ids, encoded labels, task)} and the union of every target's paper-protocol test users."""
    from training.evaluate import EvaluateConfig
    from training.evaluate.protocol import encode_labels, paper_splits
    from training.evaluate.run import _labels

    config = EvaluateConfig()
    definition, labels, _ = _labels(home, dataset, config)
    out, held_out = {}, set()
    for spec in definition.users.labels:
        users, raw = labels[spec.name]
        y, _ = encode_labels(raw, spec.task, spec.values)
        test = paper_splits(y, spec.task, config.seed, config.test_share, config.folds)[0].score
        held_out.update(users[i] for i in test)
        out[spec.name] = (users, y, spec.task)
    return out, held_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", required=True)
    ap.add_argument("--dataset", default="movielens-100k")
    ap.add_argument("--variant", action="append", default=[], help="NAME[:key=value,...] (repeatable)")
    ap.add_argument("--parquet", action="append", default=[], help="score a written coles_embeddings.parquet")
    ap.add_argument("--seed", type=int, default=42, help="CoLES seed (the demo's: 42)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--poolings", default="", help="comma-separated: last, mean, tail (default: the config's)")
    ap.add_argument("--no-lightgbm", action="store_true", help="only the linear probe")
    args = ap.parse_args()

    import torch

    from benchmarks.machine import describe
    from producers.coles import ColesConfig
    from producers.coles import train as T
    from producers.coles.config import training_plan
    from producers.coles.records import read_records
    from producers.stores.warehouse import Home, stored_definition
    from training.evaluate.probe import LinearProbe
    from training.evaluate.protocol import LgbmParams, cv_splits, primary_metric, run_protocol

    print(describe())
    torch.set_num_threads(args.threads)
    home = Home.resolve(args.home)
    targets, held_out = development_users(home, args.dataset)
    dev = {}
    for t, (users, y, task) in targets.items():
        keep = np.array([u not in held_out for u in users])
        dev[t] = ([u for u, k in zip(users, keep) if k], y[keep], task)
    print(f"{args.dataset}: development users "
          f"{', '.join(f'{t} {len(v[0])}' for t, v in dev.items())} ({len(held_out)} test users left out); "
          f"CoLES seed {args.seed}, {args.threads} thread(s)")
    readers = [("linear", LinearProbe())] + ([] if args.no_lightgbm else [("lightgbm", LgbmParams())])

    def cells_for(vectors, row_of) -> list[str]:
        cells = []
        for t, (users, y, task) in dev.items():
            X = vectors[[row_of[u] for u in users]]
            metric = primary_metric(task)
            splits = cv_splits(y, task, seed=0, folds=5, repeats=1)
            for reader_name, reader in readers:
                r = run_protocol("cv", X, y, task, splits, reader, seed=0)
                cells.append(f"{t} {metric} {reader_name} {r.mean(metric):.3f} ± {r.std(metric):.3f}")
        return cells

    for path in args.parquet:
        import pyarrow.parquet as pq

        from producers.stores.outputs import read_provenance

        table = pq.read_table(path, columns=["user_id", "vector"])
        meta = read_provenance(Path(path))
        vectors = np.array(table.column("vector").to_pylist(), dtype=np.float32)
        row_of = {u: i for i, u in enumerate(table.column("user_id").to_pylist())}
        print(f"| {path} | seed {meta['config']['seed']}, {meta['config'].get('pooling', 'last')} | "
              + " | ".join(cells_for(vectors, row_of)) + " |", flush=True)

    for text in args.variant:
        name, overrides = parse_variant(text)
        config = dataclasses.replace(ColesConfig(device="cpu", threads=args.threads, seed=args.seed, progress=False,
                                                 force=True), **overrides)
        config.check()
        con = home.connect(read_only=True)
        try:
            records = read_records(con, stored_definition(con, args.dataset), config)
        finally:
            con.close()
        t0 = time.perf_counter()
        T.seed_all(config.seed)
        module = T.build_module(records, config)
        with tempfile.TemporaryDirectory() as run_dir:
            losses = T.train(module, records, config, Path(run_dir), torch.device("cpu"), None, [], lambda _: None,
                             training_plan(records.n_events, config))
        secs = time.perf_counter() - t0
        row_of = {u: i for i, u in enumerate(records.users)}
        for pooling in (args.poolings or config.pooling).split(","):
            cells = cells_for(pooled(module.seq_encoder, records, pooling, config.cnt_max), row_of)
            print(f"| {name} | {overrides or 'defaults'} | {pooling} | train {secs:.0f} s, loss {losses[0]:.3f} -> "
                  f"{losses[-1]:.3f} | " + " | ".join(cells) + " |", flush=True)


def pooled(seq_encoder, records, pooling: str, cnt_max: int) -> np.ndarray:
    import torch
    from ptls.data_load.utils import collate_feature_dict

    from producers.coles import train as T

    if pooling in ("last", "mean"):  # the stage's own inference
        return T.infer(seq_encoder, records, torch.device("cpu"), pooling=pooling)
    if pooling != "tail":
        raise SystemExit(f"unknown pooling {pooling!r}")
    seq_encoder = seq_encoder.eval()
    out = np.zeros((records.n_users, seq_encoder.embedding_size), np.float32)
    with torch.no_grad():
        for i, rec in enumerate(records.records):
            tail = {k: v[-cnt_max:] for k, v in rec.items() if k != "user_id"}
            out[i] = seq_encoder(collate_feature_dict([tail])).numpy()[0]
    return out


if __name__ == "__main__":
    main()
