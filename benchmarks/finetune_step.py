"""One fine-tuning step in its old and new forms: same loss, which is faster.

    python benchmarks/finetune_step.py                      # SmolLM2-135M, 4 right-padded rows of 64-256 tokens
    python benchmarks/finetune_step.py --model DIR --steps 5 --threads 1

Three forms of forward + backward + AdamW on the same right-padded rows, alternated:
- `mask + model loss`: the 2-D padding mask and transformers' loss (the old default);
- `no mask + model loss`: `make_collate(padding_mask=False)`: under a causal mask a real token
  never attends to the padding on its right, and padding has no label;
- `no mask + chunked loss` (the new default): the LM head bypassed, `training.loss` computes the
  loss chunk by chunk over real target tokens, with no (batch, seq, vocab) float32 logits.
It prints the losses (they must agree), the median step times and, on CUDA, peak memory. With
`--bf16` the CPU steps run under bf16 autocast (on CUDA they always do).
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
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast on the CPU too, as the cpu-bf16 demo plan fine-tunes (always on CUDA)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from benchmarks.machine import describe
    from training.data import make_collate
    from training.finetune import FinetuneConfig, training_loss
    from training.finetune.model import make_optimizer
    from producers.shared.models import load_causal_lm, resolve_model

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model = load_causal_lm(path, dtype=torch.float32).train()
    optimizer = make_optimizer(model, FinetuneConfig(lr=0.0))  # lr 0: every step sees the same weights
    rng = np.random.default_rng(0)
    lengths = np.linspace(args.min_len, args.max_len, args.rows).astype(int)
    rows = [[rng.integers(3, model.config.vocab_size, n).astype(np.int32)] for n in lengths]
    from training.loss import bypass_lm_head, restore_lm_head

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    batches = {mask: {k: v.to(device) for k, v in make_collate(pad_id=0, packed=False, padding_mask=mask)(rows).items()
                      if k != "n_tokens"} for mask in (True, False)}
    forms = [("mask + model loss", True, False), ("no mask + model loss", False, False),
             ("no mask + chunked loss", False, True)]
    times: dict[str, list[float]] = {f[0]: [] for f in forms}
    losses: dict[str, float] = {}
    memory: dict[str, float] = {}
    for step in range(args.steps + 1):
        for name, mask, chunked in forms:
            head = bypass_lm_head(model) if chunked else None
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or args.bf16):
                loss = training_loss(model, batches[mask], head)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
                memory[name] = torch.cuda.max_memory_allocated() / 2**30
            if step:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
            losses[name] = loss.item()
            restore_lm_head(model)
    print(describe())
    print(f"{path}: {args.rows} rows of {lengths.min()}-{lengths.max()} tokens, right-padded to {lengths.max()}, "
          f"{args.threads} thread(s), {device}, median of {args.steps} steps")
    base = statistics.median(times[forms[0][0]])
    for name, _, _ in forms:
        t = statistics.median(times[name])
        mem = f", peak {memory[name]:.2f} GiB" if name in memory else ""
        print(f"  {name:24s} {t * 1e3:8,.0f} ms per step ({base / t:.2f}x), loss {losses[name]:.6f}{mem}")
    spread = max(losses.values()) - min(losses.values())
    print(f"  largest loss difference {spread:.2e}")


if __name__ == "__main__":
    main()
