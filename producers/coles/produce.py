"""The stage: warehouse events in, `"<schema>".coles_embeddings` and its Parquet copy out."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from producers.coles.config import NOT_IN_RUN_KEY, ColesConfig, ColesError, ColesResult, training_plan
from producers.shared.devices import pick_device
from producers.stores.provenance import code_version
from producers.stores.outputs import COLES, read_provenance, write_output
from producers.stores.warehouse import Home, float32_lists, last_ingest, stored_definition

TABLE = COLES.table
__all__ = ["TABLE", "coles", "model_name", "read_provenance"]

Log = Callable[[str], None]


def coles(home: Home, dataset: str, config: ColesConfig = ColesConfig(), log: Log = lambda _: None) -> ColesResult:
    """Train (or resume, or reuse) a CoLES encoder on the dataset's events and embed every user."""
    started = time.perf_counter()
    config.check()
    from validation.gate import require_valid

    from producers.coles.records import read_records

    con = home.connect(read_only=True)
    try:
        require_valid(con, dataset, config.force)
        d = stored_definition(con, dataset)
        records = read_records(con, d, config)
        ingest = last_ingest(con, d.schema) or {}
    finally:
        con.close()  # before training: other stages may write the warehouse meanwhile
    if records.n_users < 2:
        raise ColesError(f"{d.name} has {records.n_users} user(s) with events up to {records.as_of}: "
                         "CoLES contrasts users, it needs at least 2")
    if records.skipped:
        log(f"not used: {', '.join(records.skipped)}")
    truncated = int((records.n_events > config.max_seq_len).sum())
    log(f"{records.n_users:,} users, {records.n_kept:,} events up to {records.as_of}"
        f"{f' ({truncated:,} users cut to their last {config.max_seq_len} events)' if truncated else ''}; "
        f"categorical: {', '.join(f'{k} ({v} codes)' for k, v in records.categorical.items()) or 'none'}; "
        f"numeric: {', '.join(records.numeric)}")
    plan = training_plan(records.n_events, config)
    if plan.n_short:
        log(f"warning: {plan.n_short:,} of {records.n_users:,} users ({plan.n_short / records.n_users:.0%}) have "
            f"fewer than {config.cnt_min} events (cnt_min, the shortest sub-sequence CoLES samples): their "
            f"sub-sequences are all the whole history, so CoLES has little to learn from them")
    if plan.note:
        log(plan.note)

    import pytorch_lightning as pl
    import torch

    from producers.coles import train as T

    data_version = {"dataset": d.name, "schema": d.schema, "definition_fingerprint": d.fingerprint(),
                    "ingest_id": ingest.get("ingest_id"), "source_hash": ingest.get("source_hash"),
                    "as_of": records.as_of.isoformat(), "records_sha256": records.digest,
                    "n_users": records.n_users, "n_events": records.n_kept}
    keyed = {k: v for k, v in config.as_dict().items() if k not in NOT_IN_RUN_KEY}
    keyed["as_of"] = records.as_of.isoformat()
    key_blob = {"config": keyed, "records_sha256": records.digest, "definition_fingerprint": d.fingerprint(),
                "ptls_version": _version("pytorch-lifestream")}
    run_key = hashlib.sha256(json.dumps(key_blob, sort_keys=True, default=str).encode()).hexdigest()[:16]
    run_dir = home.root / "runs" / d.schema / "coles" / run_key
    if not config.resume and run_dir.exists():
        log(f"resume=False: starting {run_key} again")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    versions = {"ptls": key_blob["ptls_version"], "torch": torch.__version__,
                "pytorch_lightning": pl.__version__, "code_version": code_version()}
    T.atomic_write_text(run_dir / "config.json", json.dumps(
        {"run_key": run_key, "key": key_blob, "config": config.as_dict(), "data": data_version,
         "vocabulary": records.vocabulary, "inputs": {"categorical": records.categorical, "numeric": records.numeric},
         "versions": versions}, indent=2, default=str) + "\n")

    device = pick_device(config.device, ColesError)
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        fit = _fit_and_embed(home, records, config, plan, run_key, run_dir, device, log)
    finally:
        torch.set_num_threads(threads)
    losses, final_loss, vectors, trained, resumed_from = (fit["losses"], fit["final_loss"], fit["vectors"],
                                                          fit["trained"], fit["resumed_from"])
    checkpoint = fit["checkpoint"]
    produced_at = datetime.now(timezone.utc).replace(tzinfo=None)
    provenance = {
        "output": TABLE, "dataset": d.name, "table": f"{d.schema}.{TABLE}", "model": model_name(config),
        "checkpoint": checkpoint, "epoch": config.epochs, "run_key": run_key, "run_dir": home.relative(run_dir),
        "produced_at": produced_at.isoformat(), "feature_timestamp": records.as_of.isoformat(),
        "config": config.as_dict(), "data": data_version, "vocabulary": records.vocabulary,
        "inputs": {"categorical": records.categorical, "numeric": records.numeric, "skipped": records.skipped},
        "epochs_trained": config.epochs, "epochs_trained_this_call": trained,
        "training_users": len(plan.train_rows), "short_users": plan.n_short,
        "batches_per_epoch": plan.batches_per_epoch, "resumed_from": resumed_from,
        "losses": losses, "final_loss": final_loss, "device": str(device),
        "torch_threads": config.threads or threads, "dim": int(vectors.shape[1]),
        "ptls_version": versions["ptls"], "torch_version": versions["torch"],
        "pytorch_lightning_version": versions["pytorch_lightning"], "code_version": versions["code_version"],
        "vector": ("the GRU hidden states averaged over the user's kept events" if config.pooling == "mean" else
                   "the GRU hidden state after the user's last kept event") + " (not normalised)",
    }
    parquet = _write(home, d.schema, d.events.user_dtype, records.users, vectors, provenance, produced_at,
                     ingest.get("source_hash"), log)
    seconds = time.perf_counter() - started
    log(f"{records.n_users:,} vectors of {vectors.shape[1]} -> {d.schema}.{TABLE}, {home.relative(parquet)} "
        f"({seconds:.1f}s{f', final loss {final_loss:.4f}' if final_loss is not None else ''})")
    return ColesResult(dataset=d.name, table=f"{d.schema}.{TABLE}", parquet_path=parquet, n_users=records.n_users,
                       dim=int(vectors.shape[1]), model=model_name(config), checkpoint=checkpoint, epoch=config.epochs,
                       epochs_trained=trained, resumed_from=resumed_from, final_loss=final_loss, losses=losses,
                       as_of=records.as_of, run_key=run_key, run_dir=run_dir, seconds=seconds,
                       train_seconds=fit["train_seconds"], provenance=provenance)


def _fit_and_embed(home: Home, records: Any, config: ColesConfig, plan: Any, run_key: str, run_dir: Path,
                   device: Any, log: Log) -> dict[str, Any]:
    """Train (or resume, or reuse) the run's encoder up to `config.epochs`, then embed every user."""
    from producers.coles import train as T

    T.seed_all(config.seed)
    module = T.build_module(records, config)
    checkpoints = T.list_checkpoints(run_dir)
    losses: list[float] = list(T.read_state(run_dir).get("losses", []))
    resumed_from, trained = None, 0
    started = time.perf_counter()
    if config.epochs in checkpoints:
        log(f"run {run_key} already has epoch {config.epochs}: reusing {home.relative(checkpoints[config.epochs])}")
        T.load_weights(module, checkpoints[config.epochs])
    else:
        before = [e for e in checkpoints if e < config.epochs]
        resume_ckpt = checkpoints[max(before)] if before else None
        if resume_ckpt is not None:
            resumed_from = max(before)
            log(f"resuming run {run_key} from epoch {resumed_from} ({home.relative(resume_ckpt)})")
        else:
            log(f"training CoLES {model_name(config)} for {config.epochs} epochs on {device} "
                f"-> {home.relative(run_dir)}")
        losses = T.train(module, records, config, run_dir, device, resume_ckpt, losses[:resumed_from or 0], log,
                         plan)
        trained = config.epochs - (resumed_from or 0)
        checkpoints = T.list_checkpoints(run_dir)
    train_seconds = time.perf_counter() - started
    losses = losses[: config.epochs]
    return {"losses": losses, "final_loss": losses[config.epochs - 1] if len(losses) >= config.epochs else None,
            "vectors": T.infer(module.seq_encoder, records, device, pooling=config.pooling), "trained": trained,
            "resumed_from": resumed_from,
            "checkpoint": home.relative(checkpoints[config.epochs]), "train_seconds": train_seconds}


def model_name(config: ColesConfig) -> str:
    return f"coles-gru-{config.hidden_size}"


def _write(home: Home, schema: str, user_type: str, users: list, vectors: Any, provenance: dict,
           produced_at: datetime, source_hash: str | None, log: Log) -> Path:
    """The vectors through the one write path (`producers.stores.outputs.write_output`)."""
    import pyarrow as pa

    arrow = pa.table({"user_id": pa.array(users), "vector": float32_lists(vectors)})
    return write_output(home, COLES, schema, arrow, f"""
            SELECT CAST(user_id AS {user_type}) AS user_id, CAST(vector AS FLOAT[]) AS vector,
                   CAST(len(vector) AS INTEGER) AS dim, CAST($model AS VARCHAR) AS model,
                   CAST($checkpoint AS VARCHAR) AS checkpoint, CAST($epoch AS INTEGER) AS epoch,
                   CAST($feature_timestamp AS TIMESTAMP) AS feature_timestamp,
                   CAST($produced_at AS TIMESTAMP) AS produced_at, CAST($source_hash AS VARCHAR) AS source_hash,
                   CAST($code_version AS VARCHAR) AS code_version
            FROM new_rows ORDER BY user_id""", provenance, log=log,
                        params={"model": provenance["model"], "checkpoint": provenance["checkpoint"],
                                "epoch": provenance["epoch"], "feature_timestamp": provenance["feature_timestamp"],
                                "produced_at": produced_at, "source_hash": source_hash,
                                "code_version": provenance["code_version"]})



def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"
