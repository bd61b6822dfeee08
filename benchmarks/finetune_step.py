"""One fine-tuning step with and without the 2-D padding mask: same loss, which is faster.

    python benchmarks/finetune_step.py                      # SmolLM2-135M, 4 right-padded rows of 64-256 tokens
    python benchmarks/finetune_step.py --model DIR --steps 5 --threads 1

`make_collate(padding_mask=False)` (the default since this benchmark) leaves the mask out of
right-padded rows: under a causal mask a real token never attends to the padding on its right,
and padding has no label. The script times forward + backward + AdamW for both forms on the same
rows, alternating them, and prints the losses (they must agree) and the median step times.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import numpy as np
    import torch

    from benchmarks.machine import describe
    from training.data import make_collate
    from training.finetune import FinetuneConfig, _optimizer, training_loss
    from training.models import load_causal_lm, resolve_model

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model = load_causal_lm(path, dtype=torch.float32).train()
    optimizer = _optimizer(model, FinetuneConfig(lr=0.0))  # lr 0: every step sees the same weights
    rng = np.random.default_rng(0)
    lengths = np.linspace(args.min_len, args.max_len, args.rows).astype(int)
    rows = [[rng.integers(3, model.config.vocab_size, n).astype(np.int32)] for n in lengths]
    batches = {mask: make_collate(pad_id=0, packed=False, padding_mask=mask)(rows) for mask in (True, False)}
    for b in batches.values():
        b.pop("n_tokens")
    times: dict[bool, list[float]] = {True: [], False: []}
    losses: dict[bool, float] = {}
    for step in range(args.steps + 1):
        for mask in (True, False):
            t0 = time.perf_counter()
            loss = training_loss(model, batches[mask])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:  # the first round warms up
                times[mask].append(time.perf_counter() - t0)
            losses[mask] = loss.item()
    print(describe())
    print(f"{path}: {args.rows} rows of {lengths.min()}-{lengths.max()} tokens, right-padded to {lengths.max()}, "
          f"{args.threads} thread(s), median of {args.steps} steps")
    for mask in (True, False):
        print(f"  {'with' if mask else 'without'} 2-D padding mask: {statistics.median(times[mask]) * 1e3:,.0f} ms "
              f"per step, loss {losses[mask]:.6f}")
    print(f"  loss difference {abs(losses[True] - losses[False]):.2e}; speed-up "
          f"{statistics.median(times[True]) / statistics.median(times[False]):.2f}x")


if __name__ == "__main__":
    main()
