"""One bf16-autocast fine-tuning step on the CPU, old form against the new default, alternated.

    python benchmarks/finetune_step_autocast.py [--rows 4] [--length 512] [--steps 6] [--threads 2]

Old: the 2-D padding mask and transformers' loss; new: no mask and the chunked loss
(training.loss). Same weights every step (lr 0), so the losses must agree; prints the median step
time and tokens/s of each, and the machine. The `cpu-bf16` demo plan fine-tunes exactly so.
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
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch

    from benchmarks.machine import describe
    from training.data import make_collate
    from training.finetune import FinetuneConfig, _optimizer, training_loss
    from training.loss import bypass_lm_head, restore_lm_head
    from training.models import load_causal_lm, resolve_model

    torch.set_num_threads(args.threads)
    model = load_causal_lm(resolve_model(args.model), dtype=torch.float32).train()
    optimizer = _optimizer(model, FinetuneConfig(lr=0.0))
    rng = np.random.default_rng(0)
    rows = [[rng.integers(3, model.config.vocab_size, args.length).astype(np.int32)] for _ in range(args.rows)]
    batches = {mask: {k: v for k, v in make_collate(pad_id=0, packed=False, padding_mask=mask)(rows).items()
                      if k != "n_tokens"} for mask in (True, False)}
    times: dict[str, list[float]] = {"mask + model loss": [], "no mask + chunked loss": []}
    for step in range(args.steps):
        for form in times:
            new = form.startswith("no mask")
            head = bypass_lm_head(model) if new else None
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = training_loss(model, batches[not new], head)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step:  # the first step of each form warms up
                times[form].append(time.perf_counter() - t0)
            else:
                print(f"{form}: loss {float(loss):.6f}")
            if head is not None:
                restore_lm_head(model)
    print(describe())
    tokens = args.rows * args.length
    for form, ts in times.items():
        median = statistics.median(ts)
        print(f"{form}: median step {median:.2f} s, {tokens / median:,.0f} tokens/s ({len(ts)} steps)")


if __name__ == "__main__":
    main()
