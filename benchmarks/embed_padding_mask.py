"""Embedding with and without the padding mask on right-padded batches, interleaved, on this machine.

    python -m benchmarks.embed_padding_mask --home H --users 120     # H: a home `make demo` filled

Right padding under a causal mask changes no real token's hidden states, so `Embedder` sends no mask
(SDPA then takes its causal kernel instead of building a 4-D mask); `Embedder.padding_mask = True`
is the old way. Both embed the first N users' texts with the demo's cpu-bf16 setting by default
(layers 1:10, bf16, 2,048 tokens), the same batches, alternating `--passes` times; it prints
tokens/s of each pass and the largest difference between the two sets of vectors (expected 0.0).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.machine import describe


def main(argv: list[str] | None = None) -> int:
    import torch

    from producers.shared.models import resolve_model
    from producers.stores.warehouse import Home
    from training.embed import EmbedConfig, Embedder, plan_batches
    from training.embed.store import read_texts

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", required=True, help="a home with serialized texts (e.g. the demo's)")
    ap.add_argument("--dataset", default="movielens-100k")
    ap.add_argument("--users", type=int, default=120)
    ap.add_argument("--layers", default="1:10")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-tokens", type=int, default=16_384)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EmbedConfig(layers=args.layers, max_length=args.max_length, dtype=args.dtype, device="cpu")
    texts = read_texts(Home.resolve(args.home), args.dataset, config).texts[:args.users]
    model = resolve_model(config.model)
    embedder = Embedder.load(model, model, config)
    ids, _ = embedder.tokenize(texts)
    batches = plan_batches([len(x) for x in ids], args.batch_tokens)
    tokens = sum(len(x) for x in ids)
    print(f"{describe()}; torch threads {torch.get_num_threads()}; {len(texts)} users, {tokens:,} tokens, "
          f"{len(batches)} batches; layers {args.layers}, {args.dtype}, {args.max_length} tokens")
    speeds: dict[bool, list[float]] = {False: [], True: []}
    vectors: dict[bool, np.ndarray] = {}
    for _ in range(args.passes):
        for mask in (False, True):
            embedder.padding_mask = mask
            started = time.perf_counter()
            vectors[mask] = np.concatenate([embedder.encode_ids([ids[j] for j in b]).vectors for b in batches])
            speeds[mask].append(tokens / (time.perf_counter() - started))
    for mask, label in ((False, "without the mask (default)"), (True, "with the mask (before)")):
        print(f"{label}: tokens/s {', '.join(f'{s:,.0f}' for s in speeds[mask])}")
    print(f"max abs difference of the vectors: {float(np.abs(vectors[False] - vectors[True]).max())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
