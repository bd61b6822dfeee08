"""Which part of the history, which layers, which pooling: measured on training folds only.

    python benchmarks/embed_choices.py embed --home H --dataset movielens-100k --max-length 128 --out ml.npz
    python benchmarks/embed_choices.py score ml.npz [bc.npz ...]   (or left.npz+right.npz)

`embed`: the base model reads each labelled *development* user's serialized text (the paper
protocol's split: its 10% test users, seed 0, are left out and never embedded), cut to
`--max-length` tokens on each truncation side (left = the last tokens, i.e. the most recent
events; right = the first tokens), in `--dtype` (float32, or bfloat16 as on a CPU with AMX /
AVX512-BF16). One forward pass per side keeps, for every hidden state, three
poolings: the mean over tokens, the last token, and the mean over the tokens of the last K lines
(K events: a line is an event, or a day of events in the compact format).

`score`: every (side, layer range, pooling) is read by the linear probe (evaluate's; `--lightgbm`
adds evaluate's LightGBM) in 5-fold
stratified CV over the development users: inner CV on the training part of the data, the test
users untouched. Prints ROC-AUC (binary targets) or MAE, mean ± std over the folds, one table per
file; the AVX2 environment is not needed (the vectors do not depend on the kernels within noise).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYER_RANGES = ("9:", "all", "1:6", "1:10", "1:16", "10:20", "20:", "-4:", "last")
TAIL_LINES = 8


def _dev_users(home, dataset: str, target: str):
    from training.evaluate import EvaluateConfig
    from training.evaluate.protocol import encode_labels, paper_splits
    from training.evaluate.run import _labels

    definition, labels, _ = _labels(home, dataset, EvaluateConfig(targets=(target,)))
    spec = next(lbl for lbl in definition.users.labels if lbl.name == target)
    users, raw = labels[target]
    y, _ = encode_labels(raw, spec.task, spec.values)
    dev = np.sort(np.concatenate([s.train for s in paper_splits(y, spec.task, 0)[:1]] +
                                 [paper_splits(y, spec.task, 0)[0].valid]))
    return [users[i] for i in dev], y[dev], spec.task


def embed_all(args) -> None:
    import torch

    from producers.shared.models import resolve_model
    from producers.stores.warehouse import Home
    from training.embed import EmbedConfig, Embedder
    from training.embed.store import read_texts

    torch.set_num_threads(args.threads)
    home = Home.resolve(args.home)
    users, y, task = _dev_users(home, args.dataset, args.target)
    if args.users and args.users < len(users):  # a seeded sample of the development users (CPU budget)
        pick = np.sort(np.random.default_rng(0).permutation(len(users))[:args.users])
        users, y = [users[i] for i in pick], y[pick]
    data = read_texts(home, args.dataset, EmbedConfig())
    text_of = dict(zip(data.users, data.texts))
    texts = [text_of[u] for u in users]
    path = resolve_model("smollm2-135m")
    out = {"y": y, "task": np.array(task), "max_length": np.array(args.max_length), "dtype": np.array(args.dtype)}
    for side in args.sides.split(","):
        cfg = EmbedConfig(max_length=args.max_length, truncation_side=side, layers="all", dtype=args.dtype)
        emb = Embedder.load(path, path, cfg)
        emb.close()  # its layer-sum hooks: this study reads every hidden state itself
        newline = np.array(["\n" in emb.tokenizer.decode([i]) for i in range(len(emb.tokenizer))])
        ids, _ = emb.tokenize(texts)
        n, L, d = len(ids), len(emb.layers), emb.hidden_size
        pooled = {p: np.zeros((n, L, d), np.float32) for p in ("mean", "last", "tail")}
        t0, done = time.perf_counter(), 0
        order = np.argsort([len(x) for x in ids])
        for start in range(0, n, args.batch):
            rows = order[start:start + args.batch]
            width = max(len(ids[r]) for r in rows)
            batch = torch.full((len(rows), width), emb.tokenizer.pad_token_id)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            tail = torch.zeros((len(rows), width), dtype=torch.bool)
            for j, r in enumerate(rows):
                x = ids[r]
                batch[j, :len(x)] = torch.tensor(x)
                mask[j, :len(x)] = 1
                nl = np.flatnonzero(newline[np.asarray(x)])
                nl = nl[nl < len(x) - 1]  # a newline that ends the text closes the last line, it does not open one
                begin = int(nl[-TAIL_LINES]) + 1 if len(nl) >= TAIL_LINES else 0
                tail[j, begin:len(x)] = True
            with torch.inference_mode():
                hs = emb.base(input_ids=batch, attention_mask=mask, use_cache=False,
                              output_hidden_states=True).hidden_states
                keep, tl = mask.bool().unsqueeze(-1), tail.unsqueeze(-1)
                last = mask.sum(1) - 1
                for i, h in enumerate(hs):
                    h = h.float()
                    pooled["mean"][rows, i] = (torch.where(keep, h, 0).sum(1) / keep.sum(1)).numpy()
                    pooled["tail"][rows, i] = (torch.where(tl, h, 0).sum(1) / tl.sum(1)).numpy()
                    pooled["last"][rows, i] = h[torch.arange(len(rows)), last].numpy()
            done += int(mask.sum())
        secs = time.perf_counter() - t0
        print(f"{args.dataset} {side}: {n} users, {done:,} tokens in {secs:.0f} s ({done / secs:.0f} tokens/s)",
              flush=True)
        for p, arr in pooled.items():
            out[f"{side}/{p}"] = arr.astype(np.float16)  # half the file; the probe standardizes anyway
        np.savez(args.out, **out)  # after each side: a stopped run keeps the side it finished


def score_all(args) -> None:
    from training.embed import resolve_layers
    from training.evaluate.probe import LinearProbe
    from training.evaluate.protocol import LgbmParams, cv_splits, primary_metric, run_protocol

    ranges = args.ranges.split(",") if args.ranges else LAYER_RANGES
    poolings = args.poolings.split(",")
    readers = [("linear", LinearProbe())] + ([("lightgbm", LgbmParams())] if args.lightgbm else [])

    for f in args.files:
        z: dict = {}
        for part in f.split("+"):  # "a.npz+b.npz": the same users, each truncation side embedded by its own process
            z.update(np.load(part))
        y, task = z["y"], str(z["task"])
        metric = primary_metric(task)
        splits = cv_splits(y, task, seed=0, folds=5, repeats=1)
        dtype = str(z["dtype"]) if "dtype" in z else "float32"  # files written before --dtype are float32
        print(f"\n{f}: {len(y)} development users, max_length {int(z['max_length'])}, {dtype}, "
              f"{' and '.join(n for n, _ in readers)}, 5-fold CV, {metric}")
        rows = []
        for side in [side for side in ("left", "right") if f"{side}/mean" in z]:
            for pooling in poolings:
                arr = z[f"{side}/{pooling}"].astype(np.float32)
                for spec in ranges:
                    chosen = resolve_layers(spec, arr.shape[1])
                    X = arr[:, chosen.start:chosen.stop].mean(axis=1)
                    for name, reader in readers:
                        r = run_protocol("cv", X, y, task, splits, reader, seed=0, workers=args.workers)
                        rows.append((side, pooling, spec, name, r.mean(metric), r.std(metric)))
                        print(f"| {side} | {pooling} | {spec} | {name} | {r.mean(metric):.3f} ± {r.std(metric):.3f} |",
                              flush=True)
        best = (min if metric == "mae" else max)(rows, key=lambda r: r[4])
        print(f"best: {best}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("embed")
    e.add_argument("--home", required=True)
    e.add_argument("--dataset", required=True)
    e.add_argument("--target", required=True)
    e.add_argument("--max-length", type=int, default=128)
    e.add_argument("--users", type=int, default=0, help="a seeded sample of this many development users (0: all)")
    e.add_argument("--sides", default="left,right", help="truncation sides to embed (one file holds any of them)")
    e.add_argument("--batch", type=int, default=16)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights and activations (bfloat16: the cpu-bf16 demo plan's; pooled in float32 either way)")
    e.add_argument("--out", required=True)
    s = sub.add_parser("score")
    s.add_argument("files", nargs="+")
    s.add_argument("--ranges", default="", help="comma-separated layer ranges (default: the study's seven)")
    s.add_argument("--poolings", default="mean,last,tail")
    s.add_argument("--lightgbm", action="store_true", help="also LightGBM (evaluate's settings), not only the probe")
    s.add_argument("--workers", type=int, default=1, help="splits fitted at once (evaluate's workers)")
    args = ap.parse_args()
    embed_all(args) if args.cmd == "embed" else score_all(args)


if __name__ == "__main__":
    main()
