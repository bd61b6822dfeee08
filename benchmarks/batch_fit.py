"""What `finetune --batch-tokens auto` measures and would choose, for a model shape, on this machine.

    python -m benchmarks.batch_fit                                # SmolLM2-135M, 2048-token rows, bf16 autocast
    python -m benchmarks.batch_fit --shape llama-3.2-1b --seq 512 # the 1B shape (random weights), shorter rows
    python -m benchmarks.batch_fit --gpu-gib 80 141               # the choice for these amounts of free memory

On a GPU it runs finetune's own probe (`training.finetune.measure_batch_tokens`, the CUDA
allocator's peak) and prints its choice. On a CPU it runs the same probe with
`SavedTensorsMeter` (the bytes autograd keeps for backward), which sees the activations, i.e.
what grows with tokens, but not the transient buffers; the choice printed for each `--gpu-gib`
is then an estimate: activations measured here, weights + gradients + AdamW counted (16 bytes
per trained weight, float32), and the probe's own fixed part unknown.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="smollm2-135m", help="a shape of benchmarks.gpu_check.SHAPES (random weights)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens a row (finetune's --max-length)")
    ap.add_argument("--precision", choices=["bf16", "no"], default="bf16", help="autocast as on a GPU, or float32")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--gpu-gib", type=float, nargs="*", default=[80.0, 141.0],
                    help="free GiB to print the CPU estimate's choice for")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import tempfile

    import torch
    from accelerate import Accelerator

    from benchmarks.gpu_check import build_model
    from benchmarks.machine import describe
    from training.finetune import AUTO_MAX_TOKENS, FinetuneConfig, measure_batch_tokens
    from training.finetune.accelerator import fresh_accelerator_state
    from training.memory_fit import GIB, MemoryLine, SavedTensorsMeter, tokens_that_fit

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    print(describe())
    fresh_accelerator_state(not cuda, args.precision)
    acc = Accelerator(cpu=not cuda, mixed_precision=args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(args.shape, Path(tmp) / args.shape, "cpu")
        config = FinetuneConfig(model=str(folder), max_length=args.seq,
                                gradient_checkpointing=args.gradient_checkpointing)
        meter = None if cuda else SavedTensorsMeter(free_bytes=1024 * GIB)
        t0 = time.perf_counter()
        fit = measure_batch_tokens(str(folder), config, acc, meter)
        seconds = time.perf_counter() - t0
    line = fit.line
    print(f"{args.shape}, rows of {args.seq} tokens, {args.precision} autocast, checkpointing "
          f"{args.gradient_checkpointing}, {acc.device}: probe {seconds:.1f} s; "
          f"{line.per_token_bytes / 2**20:.3f} MiB a token{' kept for backward' if not cuda else ''}, "
          f"{line.fixed_bytes / GIB:.3f} GiB fixed, {fit.extra_bytes / GIB:.2f} GiB AdamW states")
    if cuda:
        print(fit.summary())
        return
    weights_and_grads = fit.extra_bytes  # float32 weights + gradients: 8 bytes a trained weight, as AdamW's states
    # the measured fixed part is what backward keeps whatever the tokens (autocast's bf16 weight copies)
    estimate = MemoryLine(line.fixed_bytes + weights_and_grads, line.per_token_bytes)
    for gib in args.gpu_gib:
        choice = tokens_that_fit(estimate, gib * GIB, fit.extra_bytes, args.seq, AUTO_MAX_TOKENS)
        uncapped = tokens_that_fit(estimate, gib * GIB, fit.extra_bytes, args.seq, 2**40)
        print(f"  {gib:.0f} GiB free: auto would choose {choice.tokens:,} tokens ({choice.limited_by}); memory alone "
              f"would hold {uncapped.tokens:,} (estimate: activations measured here, transients not)")


if __name__ == "__main__":
    main()
