"""CPU embedding with int8 linear layers against the plain transformers loop (float32), same texts.

    python benchmarks/embed_int8.py --avx2            # emulate an AVX2-only CPU (no AVX-512, AMX, VNNI-512)
    python benchmarks/embed_int8.py --users 64 --max-length 512

`--avx2` sets ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 and FBGEMM_ENABLE_INSTRUCTIONS=AVX2
before torch loads, so PyTorch's own kernels, oneDNN and FBGEMM (the int8 products) all stop at
AVX2, as on the 2-core AMD EPYC of the issue. Three paths embed the first N users' serialized
MovieLens texts (benchmarks/embed.py builds them) with the hidden states `--layers` (default 9:) averaged over tokens:

- plain: `AutoModelForCausalLM`, `output_hidden_states=True`, fixed batches, float32 (benchmarks/embed.py's loop);
- embedder fp32: `training.embed.Embedder` (sorted batches, bare decoder, layer-sum hooks);
- embedder int8: the same with `training.quantize.quantize_for_cpu` (int8 dynamic quantization of nn.Linear).

Printed: tokens/s of each and the speed-up over plain; the cosine between each user's int8 and
float32 vectors (min and mean). Timings on a shared machine: the load average is printed beside.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", default="9:", help="hidden states averaged by both paths (a range ending early: "
                    "the Embedder exits early, the plain loop runs the whole model as a user would)")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 Embedder run")
    ap.add_argument("--avx2", action="store_true", help="emulate an AVX2-only CPU (set before torch loads)")
    ap.add_argument("--home", type=Path, default=None, help="a home with (or to get) serialized MovieLens texts")
    args = ap.parse_args()
    if args.avx2:
        os.environ.update(AVX2_ENV)

    import numpy as np
    import torch

    from benchmarks.embed import ensure_texts, load, plain_loop, read_texts
    from benchmarks.machine import describe
    from training.embed import Embedder, EmbedConfig, n_hidden_states, plan_batches, resolve_layers
    from producers.shared.models import load_causal_lm, resolve_model

    torch.set_num_threads(args.threads)
    print(describe())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, quantized engine set by quantize_for_cpu; "
          f"env {({k: os.environ.get(k) for k in AVX2_ENV})}")
    tmp = None
    if args.home is None:
        tmp = tempfile.TemporaryDirectory(prefix="llm4es-bench-int8-")
        args.home = Path(tmp.name)
    ensure_texts(args.home, "smollm2-135m")
    users, texts = read_texts(args.home, args.users)
    path = resolve_model("smollm2-135m")
    config = EmbedConfig(max_length=args.max_length, batch_tokens=args.batch_tokens, dtype="float32", device="cpu",
                         layers=args.layers)

    def run_embedder(quantize: bool) -> tuple[np.ndarray, float, int]:
        # the product's path: Embedder.load quantizes before its layer-sum hooks attach
        emb = Embedder.load(path, path, replace(config, quantize="int8" if quantize else None))
        lengths = [min(n, emb.max_length) for n in emb.lengths(texts)]
        emb.encode(texts[:2])  # warm-up
        out = np.zeros((len(texts), emb.hidden_size), dtype=np.float32)
        start = time.perf_counter()
        for batch in plan_batches(lengths, args.batch_tokens):
            out[batch] = emb.encode([texts[i] for i in batch]).vectors
        seconds = time.perf_counter() - start
        emb.close()
        return out, seconds, sum(lengths)

    model = load_causal_lm(path, torch.float32).eval()
    from producers.shared.models import load_tokenizer
    tok = load_tokenizer(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    chosen = resolve_layers(args.layers, n_hidden_states(model.config))
    plain_loop(model, tok, texts[:2], chosen, 2, args.max_length, torch.device("cpu"))  # warm-up
    plain, plain_s, tokens, _, _ = plain_loop(model, tok, texts, chosen, max(1, args.batch_tokens // args.max_length),
                                              args.max_length, torch.device("cpu"))
    del model
    print(f"load {load()}; {len(texts)} users, {tokens:,} tokens (max_length {args.max_length}, layers {args.layers})")
    fp32, fp32_s, _ = run_embedder(False)
    int8, int8_s, _ = (fp32, float("nan"), 0) if args.no_int8 else run_embedder(True)

    def cos(a, b):
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    print("| path | seconds | tokens/s | speed-up vs plain |")
    print("|---|---|---|---|")
    for name, s in (("plain transformers loop, fp32", plain_s), ("Embedder fp32", fp32_s), ("Embedder int8", int8_s)):
        print(f"| {name} | {s:.1f} | {tokens / s:,.0f} | {plain_s / s:.2f}x |")
    c = cos(int8, fp32)
    print((f"cosine(int8, fp32) per user: min {c.min():.4f}, mean {c.mean():.4f}; " if not args.no_int8 else "")
          + f"cosine(Embedder fp32, plain): min {cos(fp32, plain).min():.6f}; load {load()}")


if __name__ == "__main__":
    main()
