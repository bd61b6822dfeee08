"""Embedding throughput: `training.embed` against a plain transformers loop, same texts, same pooling.

    python benchmarks/embed.py                          # CPU: 64 MovieLens users, max_length 512
    python benchmarks/embed.py --users 0                # every user (the GPU default)
    python benchmarks/embed.py --home H                 # reuse a home that already has serialized texts

The texts are MovieLens-100k serialized as the README does it (`llm4es ingest movielens-100k`,
`validate`, `serialize`, SmolLM2 token budget 2048), built in a temporary home unless `--home`
already holds them. Both paths embed the first N users (by id) with the same model, dtype,
layers (`hidden_states[9:]`), truncation and pooling:

- embedding path: `training.embed.embed` end to end (texts sorted by length, batches cut to a
  padded-token budget, the bare decoder with no LM head, layers summed by hooks as the forward
  runs, inference mode, per-batch Parquet parts, then the merge into DuckDB and the export);
  timed over its batch loop (tokenize, forward, pool, write parts), with the wall time beside;
- plain loop: `AutoModelForCausalLM` with `output_hidden_states=True` under `torch.no_grad()`,
  users in id order, fixed batches of `batch_tokens // max_length` texts padded to the batch's
  longest, the same pooling on the returned hidden states;
- with `--breakdown` (default on CPU), the same plain loop on the bare decoder, to tell the gain
  of sorting from that of not computing logits.

Vectors of the paths are compared (max abs difference). On a GPU, model FLOPs utilisation is
reported: 2N (non-embedding parameters) plus causal attention FLOPs per real token, against the
device's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb
import numpy as np

from benchmarks.machine import describe, peak_rss_mib

DATASET = "movielens-100k"
SCHEMA = "movielens_100k"
BF16_DENSE_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # H100 SXM; a PCIe H100 is lower


def ensure_texts(home_dir: Path, model: str) -> None:
    """Ingest, validate and serialize MovieLens-100k into `home_dir` unless its texts are there."""
    from producers.stores.cache import default_cache_dir
    from producers.ingest.default_sources import fetch_default_source
    from producers.datasets.definition import load_builtin
    from producers.ingest import IngestConfig, ingest
    from producers.serialize.run import SerializeConfig, serialize
    from producers.stores.warehouse import Home
    from validation.run import ValidateConfig, validate

    home = Home.resolve(home_dir)
    if home.warehouse_path.exists():
        con = duckdb.connect(str(home.warehouse_path), read_only=True)
        try:
            n = con.execute(f"SELECT count(*) FROM {SCHEMA}.texts WHERE kind = 'serialized'").fetchone()[0]
        except duckdb.Error:
            n = 0
        finally:
            con.close()
        if n:
            return
    d = load_builtin(DATASET)
    t = time.perf_counter()
    ingest(home, d, IngestConfig(source=fetch_default_source(d.name, default_cache_dir())))
    if not validate(home, DATASET, ValidateConfig(data_docs=False)).success:
        raise SystemExit("MovieLens-100k failed validation")
    r = serialize(home, DATASET, SerializeConfig(model=model))
    print(f"built {r.n_texts} serialized texts in {time.perf_counter() - t:.1f} s")


def read_texts(home_dir: Path, n_users: int | None) -> tuple[list, list[str]]:
    con = duckdb.connect(str(Path(home_dir) / "data" / "warehouse.duckdb"), read_only=True)
    try:
        rows = con.execute(f"SELECT user_id, text FROM {SCHEMA}.texts WHERE kind = 'serialized' AND variant = 0 "
                           "ORDER BY user_id").fetchall()
    finally:
        con.close()
    rows = rows[:n_users] if n_users else rows
    return [r[0] for r in rows], [r[1] for r in rows]


def table_vectors(home_dir: Path, users: list) -> np.ndarray:
    con = duckdb.connect(str(Path(home_dir) / "data" / "warehouse.duckdb"), read_only=True)
    try:
        got = dict(con.execute(f"SELECT user_id, vector FROM {SCHEMA}.embeddings WHERE checkpoint = 'base'").fetchall())
    finally:
        con.close()
    return np.array([got[u] for u in users], dtype=np.float32)


def plain_loop(model, tokenizer, texts: list[str], chosen: range, batch_size: int, max_length: int,
               device) -> tuple[np.ndarray, float, int, int, float]:
    """The straightforward loop: user order, fixed batch size, padded to the batch's longest."""
    import torch

    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    out, tokens, padded = [], 0, 0
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states
        mask = enc["attention_mask"].unsqueeze(-1).float()
        layers = torch.stack([hidden[k].float() for k in chosen]).mean(dim=0)
        out.append(((layers * mask).sum(dim=1) / mask.sum(dim=1)).cpu().numpy())
        tokens += int(enc["attention_mask"].sum())
        padded += enc["input_ids"].numel()
        del hidden, layers, enc
    if device.type == "cuda":
        torch.cuda.synchronize()
    return np.concatenate(out), time.perf_counter() - start, tokens, padded, time.process_time() - cpu


def load() -> str:
    """Other processes on the machine skew every timing: printed beside them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def model_flops(base, token_counts: list[int]) -> float:
    """2N per token (non-embedding parameters) plus causal attention: 2 x layers x d_attn x T(T+1) per text."""
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    embedding = base.get_input_embeddings()
    n = sum(p.numel() for name, p in base.named_parameters()
            if not any(p is q for q in embedding.parameters()))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d_attn = config.num_attention_heads * head_dim
    attention = sum(2 * config.num_hidden_layers * d_attn * t * (t + 1) for t in token_counts)
    return 2 * n * sum(token_counts) + attention


def bf16_peak(device_name: str) -> float | None:
    if "H100" in device_name and "PCIe" in device_name:
        return None
    return next((peak for key, peak in BF16_DENSE_PEAK.items() if key in device_name), None)


def main(argv: list[str] | None = None) -> None:
    import torch

    on_gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=None, help="first N users; 0 = all (default: 64 on CPU, all on GPU)")
    ap.add_argument("--max-length", type=int, default=None, help="tokens per text (default: 512 on CPU, 2048 on GPU)")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="both paths run in this dtype (auto: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--layers", default="9:")
    ap.add_argument("--home", type=Path, default=None, help="a home with (or to get) the serialized texts")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=not on_gpu,
                    help="also time the plain loop on the bare decoder (no LM head)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_users = (0 if on_gpu else 64) if args.users is None else args.users
    max_length = args.max_length or (2048 if on_gpu else 512)

    from producers.stores.warehouse import Home
    from training.embed import (
        EmbedConfig,
        Embedder,
        embed,
        pick_device,
        pick_dtype,
    )
    from producers.shared.models import load_causal_lm, load_tokenizer, resolve_model

    print(describe())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    tmp = None
    if args.home is None:
        tmp = tempfile.TemporaryDirectory(prefix="llm4es-bench-embed-")
        args.home = Path(tmp.name)
    model_path = resolve_model(args.model)
    ensure_texts(args.home, args.model)
    users, texts = read_texts(args.home, n_users or None)
    device = pick_device("auto")
    dtype = pick_dtype(args.dtype, device)
    config = EmbedConfig(model=args.model, layers=args.layers, max_length=max_length, batch_tokens=args.batch_tokens,
                         dtype=args.dtype,
                         limit_users=n_users or None)
    lengths_probe = Embedder.load(model_path, model_path, config)
    full = lengths_probe.lengths(texts)
    chosen = lengths_probe.layers
    lengths = [min(n, max_length) for n in full]
    lengths_probe.encode(texts[:2])  # warm-up: first-call allocations and kernel selection
    lengths_probe.close()
    print(f"{len(texts)} users, {sum(lengths):,} tokens after truncation to {max_length} "
          f"({sum(n > max_length for n in full)} texts cut; lengths {min(lengths)}-{max(lengths)}, "
          f"median {int(np.median(lengths))}); model {args.model}, {str(dtype).removeprefix('torch.')} on {device}, "
          f"hidden states {chosen.start}:{chosen.stop}, batch_tokens {args.batch_tokens}")

    print(f"load average before: {load()}")
    r = embed(Home.resolve(args.home), DATASET, config)
    (s,) = r.sets
    cpu = s.cpu_seconds
    ours = table_vectors(args.home, users)
    print(f"embedding path: {s.seconds:.1f} s ({s.wall_seconds:.1f} s with loading, merge and export), "
          f"{s.tokens_per_s:,.0f} tokens/s, padding {1 - s.tokens / s.padded_tokens:.1%} of fed tokens; "
          f"CPU time {cpu:.1f} s; load average {load()}")

    batch_size = max(1, args.batch_tokens // max_length)
    tokenizer = load_tokenizer(model_path)
    lm = load_causal_lm(model_path, dtype=dtype).to(device)
    plain_loop(lm, tokenizer, texts[:2], chosen, 2, max_length, device)  # warm-up
    vec, sec, tok, pad, cpu_plain = plain_loop(lm, tokenizer, texts, chosen, batch_size, max_length, device)
    print(f"plain loop (CausalLM, batches of {batch_size} in user order): {sec:.1f} s, {tok / sec:,.0f} tokens/s, "
          f"padding {1 - tok / pad:.1%}; CPU time {cpu_plain:.1f} s; load average {load()}; "
          f"max |diff| vs embedding path {np.abs(vec - ours).max():.2e}")
    print(f"ratio: embedding path is {sec / s.seconds:.2f}x the plain loop (wall), {cpu_plain / cpu:.2f}x (CPU time)")
    if args.breakdown:
        base = lm.base_model
        vec2, sec2, _, _, cpu2 = plain_loop(base, tokenizer, texts, chosen, batch_size, max_length, device)
        print(f"plain loop on the bare decoder (no LM head): {sec2:.1f} s, {tok / sec2:,.0f} tokens/s, "
              f"CPU time {cpu2:.1f} s (embedding path {sec2 / s.seconds:.2f}x it wall, {cpu2 / cpu:.2f}x CPU; "
              f"max |diff| {np.abs(vec2 - ours).max():.2e}); load average {load()}")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        flops = model_flops(lm.base_model, lengths)
        peak = bf16_peak(name)
        for label, seconds in (("embedding path", s.seconds), ("plain loop", sec)):
            achieved = flops / seconds
            mfu = f"{achieved / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else "unknown peak"
            print(f"MFU {label}: {achieved / 1e12:.1f} TFLOP/s model FLOPs, {mfu} ({name})")
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"peak RSS {peak_rss_mib():,.0f} MiB")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
