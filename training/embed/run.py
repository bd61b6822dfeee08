"""The stage: warehouse texts in, one embeddings set per checkpoint out (table + Parquet), resumable, and
sharded over the processes of torchrun / accelerate launch."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from producers.shared.models import resolve_model
from producers.stores.outputs import atomic_write_text
from producers.stores.provenance import code_version
from producers.stores.warehouse import Home
from training.embed.batches import choose_batch_tokens, plan_batches
from training.embed.checkpoints import Checkpoint, find_checkpoints
from training.embed.config import EmbedConfig, EmbedError, EmbedResult, EmbedSet, Log, pooling_description
from training.embed.embedder import Embedder, Encoded
from training.embed.layers import layers_label, n_decoder_layers, n_hidden_states
from training.embed.parts import PartWriter, next_part_index, users_in_parts
from training.embed.ranks import ProcessGroup, shard_users
from training.embed.store import Texts, export_set, finished_set, merge_parts, read_texts


def embed(home: Home, dataset: str, config: EmbedConfig = EmbedConfig(), log: Log = lambda _: None) -> EmbedResult:
    """Embed every user's text with the model (or each checkpoint) into `"<schema>".embeddings` and Parquet."""
    if config.batch_tokens != "auto" and (not isinstance(config.batch_tokens, int) or config.batch_tokens < 1):
        raise EmbedError(f"batch_tokens must be a positive number of tokens or 'auto', not {config.batch_tokens!r}")
    if config.max_length < 1:
        raise EmbedError("max_length must be positive")
    data = read_texts(home, dataset, config)
    checkpoints = find_checkpoints(home, config.checkpoint)
    result = EmbedResult(dataset=dataset)
    for ck in checkpoints:
        if len(checkpoints) > 1:
            log(f"checkpoint {ck.label} (epoch {ck.epoch})")
        result.sets.append(_embed_set(home, data, config, ck, log))
    return result


def _embed_set(home: Home, data: Texts, config: EmbedConfig, ck: Checkpoint, log: Log) -> EmbedSet:
    """One set. Under torchrun / accelerate launch every process embeds its own length-balanced shard of
    the users into its own part files; after a barrier the first process merges and publishes."""
    import torch
    import transformers

    from training.hardware import Ranks

    started = time.perf_counter()
    ranks = Ranks.from_env()
    say = log if ranks.main else (lambda _: None)
    model_path, tokenizer_path, model_name = _model_paths(config, ck, say)
    embedder = Embedder.load(model_path, tokenizer_path, config, say)
    total_layers = n_decoder_layers(embedder.base.config)
    if embedder.layers_run < total_layers:
        # not in the provenance: the vectors are the full forward's, only the time differs
        say(f"early exit: layers {layers_label(embedder.layers)} need {embedder.layers_run}"
            f" of {total_layers} decoder layers")
    group = ProcessGroup.join(ranks, embedder.device)
    try:
        provenance = _provenance(data, config, ck, embedder, model_name, model_path, tokenizer_path)
        run_key = hashlib.sha256(json.dumps(provenance, sort_keys=True, default=str).encode()).hexdigest()[:16]
        key = {"model": model_name, "checkpoint": ck.label, "layers": provenance["layers"], "text_kind": config.kind}
        done_before = finished_set(home, data, key, run_key, config)
        if done_before is not None:
            say(f"{ck.label}: this set was already embedded from the same texts and settings ({run_key}); reusing it")
            return done_before
        parts = home.data_dir / data.schema / "embeddings_parts" / run_key
        if ranks.main:
            parts.mkdir(parents=True, exist_ok=True)
            if not (parts / "run.json").exists():
                atomic_write_text(parts / "run.json", json.dumps(provenance, indent=2, default=str) + "\n")
        group.barrier()
        done = users_in_parts(parts)
        group.barrier()  # every process has read the parts before any writes new ones
        mine = shard_users([len(t) for t in data.texts], ranks.world_size)[ranks.rank]
        todo = [i for i in mine if data.users[i] not in done]
        n_resumed = len(mine) - len(todo)
        where = f" (process {ranks.rank} of {ranks.world_size}: {len(mine):,} users)" if ranks.distributed else ""
        if n_resumed:
            say(f"resuming {run_key}: {n_resumed:,} users already embedded, {len(todo):,} to go{where}")
        elif ranks.distributed:
            say(f"embedding {len(todo):,} users{where}")
        ids, lengths = embedder.tokenize([data.texts[i] for i in todo])  # once: planning and the model share it
        truncated = sum(n > embedder.max_length for n in lengths)
        batch_tokens = choose_batch_tokens(config.batch_tokens, embedder, say) if todo else None  # no probe for nothing
        prefix = f"batch-r{ranks.rank:03d}-" if ranks.distributed else "batch-"
        loop = _embed_batches(embedder, data, todo, ids, batch_tokens, parts, prefix, ck.label,
                              provenance["dtype"], say, show_bar=ranks.main)
        if truncated:
            say(f"{truncated:,} texts were longer than {embedder.max_length} tokens and cut on the "
                f"{config.truncation_side}")
        provenance.update(code_version=code_version(), run_key=run_key, transformers_version=transformers.__version__,
                          torch_version=torch.__version__, device=str(embedder.device),
                          num_processes=ranks.world_size, batch_tokens=batch_tokens)
        group.barrier()  # every shard is on disk
        full = config.limit_users is None and config.users is None
        outcome = _merge_once(home, data, parts, key, ck, provenance, embedder.hidden_size, full, ranks.main, group)
        tokens_all, seconds_max = group.sum_max(loop.tokens, loop.seconds)
        _, compute_max = group.sum_max(0, loop.compute_seconds)
        compute_tps = tokens_all / compute_max if compute_max > 0 else 0.0
        mfu = _embed_mfu(embedder, ids, compute_tps, ranks.world_size)
    finally:
        embedder.close()
        group.leave()
    return EmbedSet(model=model_name, checkpoint=ck.label, epoch=ck.epoch, layers=key["layers"],
                    text_kind=config.kind, n_users=outcome["n_users"], n_computed=len(todo), n_resumed=n_resumed,
                    n_truncated=truncated, dim=outcome["dim"], tokens=tokens_all, padded_tokens=loop.padded_tokens,
                    seconds=seconds_max, cpu_seconds=loop.cpu_seconds, wall_seconds=time.perf_counter() - started,
                    tokens_per_s=tokens_all / seconds_max if seconds_max > 0 else 0.0, parquet=outcome["parquet"],
                    run_key=run_key, compute_seconds=compute_max, compute_tokens_per_s=compute_tps, mfu=mfu)


def _model_paths(config: EmbedConfig, ck: Checkpoint, say: Log) -> tuple[str, str, str]:
    """(model folder, tokenizer folder, the model's recorded name) for one checkpoint. The base model is
    only fetched when needed: a checkpoint folder normally has its own tokenizer."""
    if ck.path is None:
        model_path = tokenizer_path = resolve_model(config.model, progress=say)
    else:
        model_path = str(ck.path)
        tokenizer_path = model_path if _has_tokenizer(ck.path) else resolve_model(config.model, progress=say)
    # A fine-tuned checkpoint names its base model (`model_source` in llm4es_checkpoint.json).
    model_name = str(ck.info.get("model_source") or config.model)
    if model_name != config.model:
        say(f"{ck.label} was fine-tuned from {model_name}: recorded as its model")
    return model_path, tokenizer_path, model_name


def _provenance(data: Texts, config: EmbedConfig, ck: Checkpoint, embedder: Embedder, model_name: str,
                model_path: str, tokenizer_path: str) -> dict:
    """Everything the vectors depend on; its hash is the run key, so parts are resumed only into the same set."""
    return {
        "model": model_name, "model_path": model_path, "tokenizer_path": tokenizer_path,
        "checkpoint": ck.label, "checkpoint_info": ck.info, "epoch": ck.epoch,
        "layers": layers_label(embedder.layers), "layers_spec": config.layers,
        "n_hidden_states": n_hidden_states(embedder.base.config),
        "pooling": pooling_description(config.pooling), "pooling_spec": config.pooling,
        "text_kind": config.kind, "variant": config.variant,
        "max_length": embedder.max_length, "truncation_side": config.truncation_side,
        "add_special_tokens": config.add_special_tokens,
        "dtype": str(next(embedder.base.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": config.attn_implementation, "texts_digest": data.digest,
        "quantize": config.quantize,
    }


@dataclass
class _Loop:
    """What one process's batch loop did."""

    tokens: int = 0  # real tokens embedded
    padded_tokens: int = 0  # tokens fed to the model, padding included
    seconds: float = 0.0  # wall clock of the loop (tokenized ids in, parts written)
    cpu_seconds: float = 0.0
    compute_seconds: float = 0.0  # waiting for the model's vectors (copy in, forward, pooling, copy out)


def _embed_batches(embedder: Embedder, data: Texts, todo: list[int], ids: list, batch_tokens: int | None,
                   parts: Path, prefix: str, label: str, dtype: str, say: Log, show_bar: bool) -> _Loop:
    """Embed the users `todo` (indices into `data`; `ids` their token ids) batch by batch, each batch's
    vectors to its own part file (written behind the loop by `PartWriter`)."""
    from tqdm.auto import tqdm

    from training.hardware import Progress

    batches = plan_batches([len(x) for x in ids], batch_tokens) if todo else []
    next_index = next_part_index(parts, prefix)
    loop, done_users = _Loop(), 0
    progress = Progress(say, len(todo), "users")
    writer = PartWriter()
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        bar = tqdm(batches, desc=f"embed {label}", unit="batch", disable=None if show_bar else True)
        encoded = embedder.encode_batches([ids[j] for j in batch] for batch in batches)
        for b, batch in enumerate(bar):
            rows = [todo[j] for j in batch]
            users = [data.users[i] for i in rows]
            t_batch = time.perf_counter()
            enc = next(encoded)  # on a GPU: launches the next batch, then waits for this one's vectors
            loop.compute_seconds += time.perf_counter() - t_batch
            _refuse_non_finite(enc, users, dtype, label)
            writer.submit(parts / f"{prefix}{next_index + b:05d}.parquet", users, enc,
                          [data.source_hashes[i] for i in rows])
            loop.tokens += int(enc.n_tokens.sum())
            loop.padded_tokens += enc.padded_tokens
            done_users += len(rows)
            bar.set_postfix_str(f"{loop.tokens / max(time.perf_counter() - started, 1e-9):,.0f} tok/s")
            progress.update(done_users, loop.tokens)
        bar.close()
    finally:
        writer.close()
    loop.seconds, loop.cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return loop


def _merge_once(home: Home, data: Texts, parts: Path, key: dict, ck: Checkpoint, provenance: dict,
                expected_dim: int, full: bool, main: bool, group: ProcessGroup) -> dict[str, Any]:
    """Process 0 merges every process's parts into the table and exports the set; all processes get
    its outcome ({n_users, dim, parquet}), or an EmbedError when the merge failed."""
    outcome: dict[str, Any] = {}
    if main:
        try:
            n_users, dim, total_tokens = merge_parts(home, data, parts, key, ck.epoch, full=full,
                                                     expected_dim=expected_dim)
            provenance.update(n_users=n_users, dim=dim, tokens=total_tokens,
                              produced_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            parquet = export_set(home, data.schema, key, provenance)
            shutil.rmtree(parts, ignore_errors=True)
            outcome = {"n_users": n_users, "dim": dim, "parquet": str(parquet)}
        except Exception as e:  # the other processes must hear of it, not wait forever
            group.share({"error": f"{type(e).__name__}: {e}"})
            raise
    outcome = group.share(outcome)
    if "error" in outcome:
        raise EmbedError(f"process 0 could not merge the parts: {outcome['error']}")
    return outcome


def _refuse_non_finite(enc: Encoded, users: list, dtype: str, checkpoint: str) -> None:
    """Stop before a batch with an inf or NaN vector is written: float16 can overflow, and a diverged
    checkpoint gives NaN. The batches before it stay on disk, so the same command resumes after them."""
    import numpy as np

    bad = [u for u, ok in zip(users, np.isfinite(enc.vectors).all(axis=1)) if not ok]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise EmbedError(f"{checkpoint}: the vectors of user {shown} are not finite (inf or NaN) in {dtype}; none "
                         "of them was stored. float16 overflows on some models: try --dtype float32 (or bfloat16 "
                         "on a GPU that has it). A fine-tuned checkpoint may also have diverged (see its losses).")


def _embed_mfu(embedder: Embedder, ids: list, tokens_per_s: float, processes: int) -> float | None:
    """2N + attention FLOPs per real token of the bare decoder (README), against the GPU's peak."""
    from training.hardware import model_flops_per_token, peak_flops

    peak, _ = peak_flops(embedder.device)
    if peak is None or not ids or tokens_per_s <= 0:
        return None
    n = [len(x) for x in ids]
    mean_context = sum(k * k for k in n) / sum(n) / 2
    flops = model_flops_per_token(embedder.base.config, mean_context, training=False, lm_head=False)
    flops *= embedder.layers_run / n_decoder_layers(embedder.base.config)  # both terms scale with the layers run
    return tokens_per_s * flops / (peak * processes)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
