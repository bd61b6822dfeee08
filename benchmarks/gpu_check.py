"""One prepared GPU run: correctness on CUDA, training and embedding throughput + MFU, optional quality run.

    python -m benchmarks.gpu_check --out gpu-check-out            # on one H100/H200, about 5-8 minutes
    python -m benchmarks.gpu_check --dry-run --out /tmp/gc         # the same code, tiny, on the CPU

Steps (each prints PASS/FAIL or a figure, all collected in OUT/gpu_check.json):

1. the CUDA tests (`pytest -m cuda tests/training/test_cuda.py`): GPU vs CPU embeddings (float32
   within 1e-4, bf16 cosine >= 0.999), packing isolation under SDPA, left/right padding NaN-free,
   a 10-step fine-tune's losses GPU vs CPU. The dry run runs them with the CPU in the GPU's place
   (`LLM4ES_CUDA_TESTS_DEVICE=cpu`) and needs them to pass: every call they make is tried before the GPU run.
2. throughput with random weights of the real shapes (speed does not depend on the values):
   SmolLM2-135M and Llama-3.2-1B (dry run: a tiny Llama). Training: the fine-tuning step itself
   (`training.data.make_collate`, `training.finetune.training_loss` with the chunked loss, its AdamW, fused on CUDA,
   bf16 autocast through accelerate as `llm4es finetune` runs it) on full 2048-token rows;
   embedding: `training.embed.Embedder.encode_batches` on the bare decoder over length-sorted batches
   (for SmolLM2 also as it ran before: with the padding mask, and one batch at a time).
   Real tokens per second of pure compute (synchronised, after warm-up), and MFU =
   tokens/s x FLOPs per token / peak, FLOPs per token from `training.hardware.model_flops_per_token`
   (6N + attention for training, 2N + attention for the bare decoder; README "Speed and MFU").
   Then what `--batch-tokens auto` chooses for each shape (finetune and embed), with the probe's
   predicted training peak at the throughput batch beside the peak measured there.
3. optional (`--quality-model DIR --source ML100K_DIR`): the real pipeline on MovieLens-100k:
   ingest, serialize, template:7 enrich, one full epoch of `finetune` at 2048 tokens, `embed`; the
   embeddings Parquet is copied to OUT for `publish` + `evaluate` on the CPU machine.
4. A/B variants of the fine-tuning step (`AB_VARIANTS`: the chunked loss's matmuls in bf16, twice the
   rows a step, `--compile`, both), after the quality run and each only while its estimated time fits
   `--budget-s`: the figures that decide finetune's defaults, measured in the same one-shot run.

A step that raises is recorded (`errors` in the JSON, its traceback in the log), counted as failed, and
the next step still runs: the GPU run is one shot, and one broken step must not cost the others.

The GPU machine is offline: see ../shared/gpu/README.md (or the README section "GPU check") for
taking wheels, data and the real model along.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                         tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
# The tests take well under a minute on a GPU machine (9 tiny-model tests, two 10-step fine-tunes); a hang
# must still leave the throughput and quality steps most of gpu_bundle's 520 s.
TESTS_TIMEOUT_S = 180
# The A/B variants of the fine-tuning step, measured after the quality run so they never starve it; each
# runs only while its estimated H200 seconds (model load, warm-up or compile, 20 steps) fit the budget left.
# The decision they inform: finetune's defaults (--loss-dtype, --compile) are chosen from these figures.
# A compile of the 30-block model is ~1 minute with inductor (cached for the second compile: same graph).
AB_VARIANTS = (
    ("smollm2-135m", "loss-bf16", {"loss_dtype": "autocast"}, 30),
    ("llama-3.2-1b", "loss-bf16", {"loss_dtype": "autocast"}, 45),
    # twice the rows (32,768 tokens a step, twice finetune's AUTO_MAX_TOKENS): would a larger cap still gain?
    ("smollm2-135m", "rows-x2", {"rows": 2}, 40),
    ("smollm2-135m", "compile", {"compile": True}, 150),
    ("smollm2-135m", "compile+loss-bf16", {"compile": True, "loss_dtype": "autocast"}, 60),
)
BUDGET_S = 480  # of gpu_bundle's `timeout 520` for this script: what is left is for writing the JSON
TARGETS = {"smollm2-135m": {"train_tokens_per_s": 300_000, "embed_tokens_per_s": 1_000_000},
           "llama-3.2-1b": {"train_mfu": 0.40}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(name: str, folder: Path, device) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.fixtures.tiny_model import tiny_tokenizer

    config = LlamaConfig(**SHAPES[name], max_position_embeddings=8192, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)  # the token ids are random anyway: any pad/eos will do
    return folder


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def train_throughput(model_dir: Path, seq: int, batch: int, steps: int, warmup: int, device,
                     loss_dtype: str = "float32", compile: bool = False, compile_backend: str | None = None) -> dict:
    """The fine-tuning step on full rows of random tokens: real tokens/s of compute, peak memory, MFU.

    `loss_dtype` and `compile` are finetune's options of the same names (the A/B variants); a compile
    happens in the warm-up steps, whose time is reported apart (`warmup_seconds`)."""
    import numpy as np
    import torch
    from accelerate import Accelerator

    from training.data import make_collate
    from training.finetune import FinetuneConfig, loss_matmul_dtype, training_loss
    from training.finetune.model import make_optimizer
    from training.hardware import fast_cuda_settings, model_flops_per_token, peak_flops
    from producers.shared.models import load_causal_lm

    cuda = device.type == "cuda"
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    fast_cuda_settings(acc.device)
    from training.loss import bypass_lm_head

    model = load_causal_lm(str(model_dir), dtype=torch.float32).train()
    head = bypass_lm_head(model)  # the chunked loss, as `llm4es finetune` runs by default
    optimizer = make_optimizer(model, FinetuneConfig(), fused=cuda)
    model, optimizer = acc.prepare(model, optimizer)
    if compile:  # after prepare, as `llm4es finetune` does
        model = torch.compile(model, **({"backend": compile_backend} if compile_backend else {}))
    head_dtype = loss_matmul_dtype(loss_dtype, acc.mixed_precision)
    vocab = model.config.vocab_size if hasattr(model, "config") else acc.unwrap_model(model).config.vocab_size
    rng = np.random.default_rng(0)
    collate = make_collate(pad_id=0, packed=False)
    rows = [[rng.integers(3, vocab, seq).astype(np.int32)] for _ in range(batch)]
    data = {k: v.to(acc.device) for k, v in collate(rows).items() if k != "n_tokens"}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = []
    t_warm = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            sync(acc.device)
            t0 = time.perf_counter()
        loss = training_loss(model, data, head, head_dtype)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync(acc.device)
    seconds = time.perf_counter() - t0
    tps = steps * batch * seq / seconds
    config = acc.unwrap_model(model).config
    flops = model_flops_per_token(config, mean_context=seq / 2, training=True)
    peak, name = peak_flops(acc.device)
    out = {"kind": "train", "seq": seq, "batch": batch, "steps": steps, "seconds": round(seconds, 3),
           "warmup_seconds": round(t0 - t_warm, 3), "loss_dtype": loss_dtype, "compile": compile,
           "tokens_per_s": round(tps), "flops_per_token": flops, "device": name,
           "mfu": round(tps * flops / peak, 4) if peak else None,
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
           "loss_first_last": [round(float(losses[0]), 4), round(float(losses[-1]), 4)],
           "finite": bool(all(torch.isfinite(x).item() for x in losses))}
    del model, optimizer
    acc.free_memory()  # the Accelerator keeps the prepared model and optimizer until told: the next shape needs room
    if cuda:
        torch.cuda.empty_cache()
    return out


def embed_throughput(model_dir: Path, n_texts: int, lo: int, hi: int, batch_tokens: int, device,
                     ab: bool = True) -> dict:
    """`Embedder.encode_batches` (the embed loop's path) over length-sorted batches of random token ids:
    real tokens/s of compute, MFU. With `ab`, the same batches again as they ran before: with the 2-D
    padding mask (SDPA off its causal kernel), and one batch at a time (the GPU idle while the host
    takes each batch's vectors)."""
    import numpy as np

    from training.embed import EmbedConfig, Embedder, plan_batches
    from training.hardware import model_flops_per_token, peak_flops

    cfg = EmbedConfig(model=str(model_dir), layers="9:" if n_texts > 64 else "1:", max_length=hi,
                      device=str(device), batch_tokens=batch_tokens)
    e = Embedder.load(str(model_dir), str(model_dir), cfg)
    vocab = e.base.config.vocab_size
    rng = np.random.default_rng(1)
    lengths = rng.integers(lo, hi + 1, n_texts)
    texts = [rng.integers(3, vocab, int(n)).tolist() for n in lengths]
    batches = plan_batches(lengths.tolist(), batch_tokens)
    tokens = int(lengths.sum())

    def timed(ahead: int | None = None) -> tuple[float, np.ndarray, int]:
        e.encode_ids([texts[i] for i in batches[0]])  # warm-up (and the largest batch first: memory shows now)
        sync(e.device)
        t0 = time.perf_counter()
        padded, vectors = 0, []
        for enc in e.encode_batches(([texts[i] for i in b] for b in batches), ahead=ahead):
            padded += enc.padded_tokens
            vectors.append(enc.vectors)
        sync(e.device)
        return time.perf_counter() - t0, np.concatenate(vectors), padded

    def versus(seconds_then: float, then: np.ndarray) -> dict:
        cos = (vectors * then).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(then, axis=1))
        return {"tokens_per_s": round(tokens / seconds_then), "speedup_now": round(seconds_then / seconds, 3),
                "min_cosine": round(float(np.nanmin(cos)), 6)}

    seconds, vectors, padded = timed()
    nan = int(np.isnan(vectors).sum())
    before = {}
    if ab:
        e.padding_mask = True
        before["with_padding_mask"] = versus(*timed()[:2])
        e.padding_mask = False
        before["one_batch_at_a_time"] = versus(*timed(ahead=0)[:2])
    mean_context = float((lengths.astype(float) ** 2).sum() / tokens) / 2
    flops = model_flops_per_token(e.base.config, mean_context, training=False, lm_head=False)
    peak, name = peak_flops(e.device)
    dtype = str(next(e.base.parameters()).dtype).removeprefix("torch.")
    e.close()
    tps = tokens / seconds
    return {"kind": "embed", "texts": n_texts, "tokens": tokens, "padding": round(1 - tokens / padded, 4),
            "batch_tokens": batch_tokens, "dtype": dtype, "seconds": round(seconds, 3), "tokens_per_s": round(tps),
            "flops_per_token": flops, "device": name, "mfu": round(tps * flops / peak, 4) if peak else None,
            "nan": nan, "before": before}


def auto_batch(model_dir: Path, seq: int, device, train: dict | None) -> dict:
    """What `--batch-tokens auto` chooses for this shape at `seq` tokens a row, in finetune (bf16, the
    chunked loss, AdamW) and in embed, and for training the probe's predicted peak at the throughput
    step's batch beside the peak measured there: how far the measured line can be trusted.
    The dry run measures what backward keeps (SavedTensorsMeter) in place of the CUDA allocator."""
    import torch
    from accelerate import Accelerator

    from training.embed import EmbedConfig, Embedder
    from training.embed import measure_batch_tokens as embed_batch_tokens
    from training.finetune import FinetuneConfig, measure_batch_tokens
    from training.memory_fit import GIB, SavedTensorsMeter

    cuda = device.type == "cuda"
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    meter = None if cuda else SavedTensorsMeter(free_bytes=GIB)
    fit = measure_batch_tokens(str(model_dir), FinetuneConfig(model=str(model_dir), max_length=seq), acc, meter)
    out = {"train": fit.record()}
    if train and train.get("peak_mem_gib") and train.get("batch"):
        predicted = (fit.line.bytes_at(train["batch"] * seq) + fit.extra_bytes) / GIB
        out["train"].update(throughput_batch_tokens=train["batch"] * seq, predicted_peak_at_it_gib=round(predicted, 3),
                            measured_peak_at_it_gib=train["peak_mem_gib"])
    acc.free_memory()
    embedder = Embedder.load(str(model_dir), str(model_dir), EmbedConfig(model=str(model_dir), layers="1:",
                                                                          max_length=seq, device=str(device)))
    out["embed"] = embed_batch_tokens(embedder, meter).record()
    embedder.close()
    del embedder
    if cuda:
        torch.cuda.empty_cache()
    return out


def cuda_tests(out: Path, device) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
           str(ROOT / "tests" / "training" / "test_cuda.py")]
    env = {**os.environ, "LLM4ES_CUDA_TESTS_DEVICE": "cuda" if device.type == "cuda" else "cpu"}
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as e:  # the log so far still comes back
        text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        (out / "cuda_tests.log").write_text(text + f"\nTIMEOUT after {TESTS_TIMEOUT_S} s\n")
        return {"returncode": None, "summary": f"timed out after {TESTS_TIMEOUT_S} s"}
    (out / "cuda_tests.log").write_text(done.stdout + done.stderr)
    tail = [line for line in done.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    return {"returncode": done.returncode, "summary": tail[0]}


def quality_run(model_dir: Path, source: Path, out: Path, max_length: int, epochs: int, limit: int | None,
                figures: dict | None = None, batch_size: int | None = None) -> dict:
    """The real pipeline on MovieLens-100k: ingest, serialize, enrich template:7, finetune, embed (no GX: --force).

    `figures` gets the fine-tuning figures as soon as they exist, so a failing embed still leaves them.
    `batch_size` None: finetune's default batches (`--batch-tokens auto`), what a user gets."""
    figures = {} if figures is None else figures
    from producers.datasets.definition import load_builtin
    from producers.enrich.run import EnrichConfig, enrich
    from producers.ingest import IngestConfig, ingest
    from producers.serialize.run import SerializeConfig, serialize
    from producers.stores.warehouse import Home
    from training.embed import EmbedConfig, embed
    from training.finetune import FinetuneConfig, finetune

    shutil.rmtree(out / "quality-home", ignore_errors=True)  # a fresh run, never a resumed one
    home = Home.resolve(out / "quality-home")
    ingest(home, load_builtin("movielens-100k"), IngestConfig(source=source))
    serialize(home, "movielens-100k", SerializeConfig(model=str(model_dir), max_tokens=max_length, force=True))
    enrich(home, "movielens-100k", EnrichConfig(tokenizer=str(model_dir), max_tokens=max_length, force=True))
    t0 = time.perf_counter()
    ft = finetune(home, "movielens-100k", FinetuneConfig(model=str(model_dir), mixture="template:7", epochs=epochs,
                                                          max_length=max_length, batch_size=batch_size, force=True),
                  log=log)
    schedule = json.loads((ft.run_dir / "config.json").read_text())["schedule"]
    figures.update(finetune_steps=ft.steps, final_loss=ft.final_loss, train_tokens_per_s=round(ft.tokens_per_second),
                   train_mfu=ft.mfu, batching=schedule["batching"], train_peak_mem_mb=round(ft.peak_memory_mb))
    layers = "9:" if limit is None else "1:"  # the authors' layers; the dry run's tiny model has 3 blocks
    em = embed(home, "movielens-100k", EmbedConfig(model=str(model_dir), checkpoint=str(ft.models[-1]), layers=layers,
                                                  max_length=max_length, limit_users=limit, force=True), log=log)
    parquet = Path(em.sets[0].parquet)
    shutil.copy(parquet, out / parquet.name)
    figures.update(embed_tokens_per_s=round(em.sets[0].tokens_per_s), n_users=em.sets[0].n_users,
                   parquet=parquet.name, seconds=round(time.perf_counter() - t0, 1))
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: the plumbing, no figures")
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--quality-model", type=Path, default=None, help="a real model folder (e.g. converted SmolLM2)")
    ap.add_argument("--gguf", type=Path, default=None,
                    help="the real SmolLM2 GGUF (joined from its halves): converted here, then the quality model")
    ap.add_argument("--source", type=Path, default=None, help="MovieLens-100k files for the quality run")
    ap.add_argument("--quality-epochs", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"seconds this run may take: the A/B variants that would not fit are skipped "
                         f"(default {BUDGET_S} on a GPU, none in a dry run)")
    args = ap.parse_args(argv)

    import torch

    started = time.perf_counter()
    budget = args.budget_s if args.budget_s is not None else (None if args.dry_run else BUDGET_S)
    from benchmarks.machine import describe
    from training.hardware import choose_device

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device("cpu") if args.dry_run else choose_device("auto")
    if device.type != "cuda" and not args.dry_run:
        print("FAIL: no CUDA device; --dry-run runs the same steps tiny on the CPU")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": describe(), "torch": torch.__version__, "device": str(device),
                    "dry_run": args.dry_run, "checks": {}, "throughput": {}, "targets": TARGETS}
    log(report["machine"])
    failed = 0

    def save() -> None:  # after every step: a run stopped by its time limit still leaves the figures so far
        tmp = args.out / ".gpu_check.json.tmp"
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        tmp.replace(args.out / "gpu_check.json")

    def free_cuda() -> None:
        if device.type == "cuda":
            gc.collect()  # prepared models sit in reference cycles (accelerate's wrapped forward)
            torch.cuda.empty_cache()

    def attempt(step: str, fn, *a, **kw):
        """fn(*a, **kw), or None when it raises: the error is logged and kept in the report, and the run goes on."""
        nonlocal failed
        try:
            return fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 (one shot on the GPU: record it, run the next step)
            failed += 1
            log(f"FAIL {step}: {type(e).__name__}: {e}")
            print(traceback.format_exc(), flush=True)
            report.setdefault("errors", {})[step] = traceback.format_exc(limit=-8)
            save()
        free_cuda()  # here, not in `except`: until it ends, the traceback holds the step's tensors
        return None

    if not args.skip_tests:
        log("CUDA tests (tests/training/test_cuda.py)" + (", the CPU in the GPU's place" if args.dry_run else ""))
        r = attempt("cuda_tests", cuda_tests, args.out, device)
        if r is not None:
            report["checks"]["cuda_tests"] = r
            ok = r["returncode"] == 0
            failed += not ok
            log(f"{'PASS' if ok else 'FAIL'} cuda tests: {r['summary']}")
        save()

    models = args.out / "models"
    names = ["tiny"] if args.dry_run else ["smollm2-135m"] + ([] if args.skip_1b else ["llama-3.2-1b"])

    def train_fitting(folder: Path, name: str, seq: int, batch: int, steps: int, warmup: int, **variant) -> dict:
        for rows in (batch, batch // 2, batch // 4):  # a batch that does not fit halves, and says so
            try:
                return train_throughput(folder, seq, max(rows, 1), steps, warmup, device, **variant)
            except torch.OutOfMemoryError:
                log(f"{name}: batch {rows} x {seq} does not fit; halving")
            free_cuda()  # the failed try's model and optimizer, before the next try loads them again
        return {"error": "out of memory"}

    seq = 128 if args.dry_run else 2048
    steps, warmup = (3, 1) if args.dry_run else (20, 3)
    # 8 rows of 2048 = finetune's AUTO_MAX_TOKENS: the batch `--batch-tokens auto` takes when memory allows
    shape_batch = lambda name: 2 if args.dry_run else 8  # noqa: E731
    built: dict[str, Path] = {}
    mfu = lambda r: f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""  # noqa: E731
    for name in names:
        folder = attempt(f"{name} build", build_model, name, models / name, "cpu" if args.dry_run else device)
        if folder is None:
            continue
        built[name] = folder
        batch = shape_batch(name)
        tr = attempt(f"{name} train", train_fitting, folder, name, seq, batch, steps, warmup)
        n_texts = 48 if args.dry_run else 2048
        # the A/B of what embedding did before, on the model the 1M tokens/s target is set for
        em = attempt(f"{name} embed", embed_throughput, folder, n_texts, seq // 4, seq,
                     4096 if args.dry_run else 65536, device, ab=name in ("tiny", "smollm2-135m"))
        report["throughput"][name] = {"train": tr or {"error": "raised"}, "embed": em or {"error": "raised"}}
        auto = attempt(f"{name} auto batch", auto_batch, folder, seq, device, tr)
        report["throughput"][name]["auto_batch"] = auto or {"error": "raised"}
        if auto is not None:
            t = auto["train"]
            log(f"{name} --batch-tokens auto: finetune {t['batch_tokens']:,} ({t['limited_by']}; "
                f"{t['per_token_mib']} MiB a token + {t['fixed_gib'] + t['extra_gib']:.2f} GiB; predicted "
                f"{t.get('predicted_peak_at_it_gib')} GiB vs measured {t.get('measured_peak_at_it_gib')} GiB at the "
                f"throughput batch), embed {auto['embed']['batch_tokens']:,} ({auto['embed']['limited_by']})")
        if tr is not None:  # (a step that raised is counted and logged already)
            log(f"{name} train: {tr.get('tokens_per_s', 0):,} tokens/s{mfu(tr)} (batch {tr.get('batch')} x {seq}, "
                f"peak {tr.get('peak_mem_gib')} GiB, losses finite: {tr.get('finite')})")
            failed += not tr.get("finite", False)  # out of memory at every batch tried counts too
        if em is not None:
            log(f"{name} embed: {em['tokens_per_s']:,} tokens/s{mfu(em)} ({em['dtype']}, padding {em['padding']:.1%}, "
                f"NaN {em['nan']})")
            failed += em["nan"] > 0
            for how, then in em["before"].items():
                log(f"{name} embed as before, {how.replace('_', ' ')}: {then['tokens_per_s']:,} tokens/s (now "
                    f"x{then['speedup_now']}), min cosine to now {then['min_cosine']}")
                failed += not then["min_cosine"] >= 0.999  # the same vectors, within bf16's rounding
        save()

    if args.gguf:
        from producers.shared.models import convert_gguf_to_safetensors

        log(f"converting {args.gguf} to a float32 model folder")
        args.quality_model = attempt("gguf conversion", convert_gguf_to_safetensors, args.gguf,
                                     args.out / "models" / "smollm2-135m-real")
    if args.quality_model:
        if not args.source:
            print("FAIL: --quality-model needs --source (the MovieLens-100k files)")
            return 2
        log("quality run: template:7, one epoch at 2048 tokens")
        quality_seq = 256 if args.dry_run else 2048
        report["quality"] = {}
        # on the CPU `auto` is one text a step: 6,600 steps; the dry run takes 8 a step to stay quick
        attempt("quality run", quality_run, args.quality_model, args.source, args.out, quality_seq, args.quality_epochs,
                32 if args.dry_run else None, report["quality"], 8 if args.dry_run else None)
        log(f"quality run: {report['quality']}")

    report["ab"] = {}
    for name, variant, options, cost_s in AB_VARIANTS:
        shape = "tiny" if args.dry_run else name
        if shape not in built or variant in report["ab"].get(shape, {}):
            continue
        left = None if budget is None else budget - (time.perf_counter() - started)
        if left is not None and left < cost_s:
            log(f"A/B {shape} {variant}: skipped, {left:.0f} s left of {budget:.0f} (needs ~{cost_s} s)")
            report["ab"].setdefault(shape, {})[variant] = {"skipped": f"{left:.0f} s left, needs ~{cost_s} s"}
            continue
        options = dict(options)
        if args.dry_run and options.get("compile"):
            options["compile_backend"] = "eager"  # the plumbing, without a C++ compile on the CPU
        rows = shape_batch(name) * options.pop("rows", 1)
        r = attempt(f"{shape} train {variant}", train_fitting, built[shape], shape, seq, rows, steps, warmup,
                    **options)
        report["ab"].setdefault(shape, {})[variant] = r or {"error": "raised"}
        base = (report["throughput"].get(shape) or {}).get("train") or {}
        if r is not None and r.get("tokens_per_s") and base.get("tokens_per_s"):
            ratio = r["tokens_per_s"] / base["tokens_per_s"]
            log(f"A/B {shape} {variant}: {r['tokens_per_s']:,} tokens/s, x{ratio:.2f} of the default{mfu(r)} "
                f"(warm-up {r.get('warmup_seconds')} s, losses finite: {r.get('finite')})")
            failed += not r.get("finite", False)
        save()
    for folder in built.values():
        shutil.rmtree(folder, ignore_errors=True)  # several GB for the 1B shape

    report["finished"] = True
    save()
    log(f"{'FAIL' if failed else 'PASS'}: {failed} failed; figures in {args.out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
