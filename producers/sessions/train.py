"""Training the session encoder: per-epoch checkpoints, exact resume, reuse of a finished run.

Runs live in `runs/<schema>/sessions/<run_key>/`: `config.json`, `epoch-<N>.pt` after every epoch
(model, optimizer, RNG states, vocabulary and statistics, config, data version, losses; written
to a temp file and renamed) and `done.json` once `epochs` are trained. The run key hashes the
config (all but epochs, device, progress, force: see `NOT_IN_RUN_KEY`), the encoded inputs
(`features.Sessions.digest`) and the definition, so the same call after an interruption resumes
from the last checkpoint, asking for more epochs continues the run (AdamW at a constant learning
rate: no schedule depends on the number of epochs), and a finished run is reused.

Determinism: the weights are initialised under `seed`; at the start of every epoch torch's RNG
(dropout) and a numpy Generator (shuffle, crops, event dropout, masks) are seeded from
(seed, epoch), so an epoch is a pure function of the weights and optimizer state it starts from,
and a resumed run ends with the same weights as an uninterrupted one (on a CPU).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from producers.shared.devices import pick_device
from producers.stores.outputs import atomic_write_text
from producers.stores.provenance import code_version
from producers.sessions import features as F
from producers.sessions.config import SessionEncoderConfig, SessionEncoderResult, SessionsError
from producers.stores.warehouse import Home, last_ingest, one, stored_definition, table_exists

Log = Callable[[str], None]
DONE = "done.json"


@dataclass
class Prepared:
    dataset: str
    schema: str
    user_type: str
    data: F.Sessions
    vocab: F.Vocab
    data_version: dict[str, Any]
    run_key: str
    run_dir: Path


def prepare(home: Home, dataset: str, config: SessionEncoderConfig, log: Log) -> Prepared:
    """Read and encode the sessions; the run key and folder they and the config give."""
    from validation.gate import require_valid

    con = home.connect(read_only=True)
    try:
        require_valid(con, dataset, config.force)
        d = stored_definition(con, dataset)
        if not table_exists(con, d.schema, "sessions_meta"):
            raise SessionsError(f"{d.name} has no sessions: run `llm4es sessions build {d.name}` first")
        meta = one(con, f'SELECT spec, ingest_id FROM "{d.schema}".sessions_meta')
        if meta is None:
            raise SessionsError(f"{d.name} has no sessions: run `llm4es sessions build {d.name}` first")
        spec, meta_ingest = meta
        ingest = last_ingest(con, d.schema) or {}
        if meta_ingest != ingest.get("ingest_id"):
            log(f"warning: {d.name} was re-ingested after its sessions were built: "
                f"run `llm4es sessions build {d.name}` to rebuild them")
        data, vocab = F.load(con, d, config)
    finally:
        con.close()
    cut = int((data.n_events > config.max_events).sum())
    log(f"{data.n:,} sessions, {data.pad:,} events"
        f"{f' ({cut:,} sessions cut to their last {config.max_events} events)' if cut else ''}; "
        f"categorical: {', '.join(f'{k} ({len(v)} values)' for k, v in vocab.categorical.items()) or 'none'}; "
        f"numeric: {', '.join(vocab.numeric) or 'none'}; text: {', '.join(vocab.text) or 'none'}"
        f"{'; not used: ' + ', '.join(vocab.skipped) if vocab.skipped else ''}")
    data_version = {"dataset": d.name, "schema": d.schema, "definition_fingerprint": d.fingerprint(),
                    "ingest_id": ingest.get("ingest_id"), "source_hash": ingest.get("source_hash"),
                    "sessions_spec": json.loads(spec), "n_sessions": data.n, "n_events_kept": data.pad,
                    "inputs_sha256": data.digest}
    key_blob = {"config": config.keyed(), "inputs_sha256": data.digest, "definition_fingerprint": d.fingerprint()}
    run_key = hashlib.sha256(json.dumps(key_blob, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Prepared(dataset=d.name, schema=d.schema, user_type=d.events.user_dtype, data=data, vocab=vocab,
                    data_version=data_version, run_key=run_key,
                    run_dir=home.root / "runs" / d.schema / "sessions" / run_key)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed every RNG gets at the start of `epoch` (0-based)."""
    return (seed * 1_000_003 + 7919 * (epoch + 1)) % 2**32


def build_model(vocab: F.Vocab, config: SessionEncoderConfig) -> Any:
    import torch

    from producers.sessions.model import SessionEncoder

    torch.manual_seed(config.seed)
    return SessionEncoder(vocab.sizes(), len(vocab.numeric), len(vocab.text), config)


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """Complete checkpoints of a run by epoch (1-based: epochs trained)."""
    found = {}
    for p in run_dir.glob("epoch-*.pt"):
        try:
            found[int(p.stem.split("-", 1)[1])] = p
        except ValueError:
            continue
    return dict(sorted(found.items()))


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to `threads` (None: left alone) for the block."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_encoder(home: Home, dataset: str, config: SessionEncoderConfig = SessionEncoderConfig(),
                  log: Log = lambda _: None) -> SessionEncoderResult:
    """Train (or resume, or reuse) the session encoder of the dataset's sessions up to `config.epochs`."""
    config.check()
    with torch_threads(config.threads):
        return _train(home, dataset, config, log)


def _train(home: Home, dataset: str, config: SessionEncoderConfig, log: Log) -> SessionEncoderResult:
    started = time.perf_counter()
    p = prepare(home, dataset, config, log)
    if p.data.n < 2:
        raise SessionsError(f"{p.dataset} has {p.data.n} session(s): the contrastive objective needs at least 2")
    import torch

    device = pick_device(config.device, SessionsError)
    p.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p.run_dir / "config.json", json.dumps(
        {"run_key": p.run_key, "config": config.as_dict(), "data": p.data_version, "vocab": p.vocab.as_dict(),
         "versions": {"torch": torch.__version__, "code_version": code_version()}}, indent=2, default=str) + "\n")
    found = checkpoints(p.run_dir)
    rel = home.relative(p.run_dir)
    if config.epochs in found:
        state = load_checkpoint(found[config.epochs])
        losses = list(state["losses"])[: config.epochs]
        log(f"run {p.run_key} already has epoch {config.epochs}: reusing {rel}")
        _write_done(p.run_dir, config.epochs, losses)
        return SessionEncoderResult(dataset=p.dataset, run_key=p.run_key, run_dir=p.run_dir, epochs=config.epochs,
                                    epochs_trained=0, resumed_from=None, final_loss=losses[-1], losses=losses,
                                    n_sessions=p.data.n, seconds=time.perf_counter() - started, train_seconds=0.0,
                                    sessions_per_second=0.0, device=str(device))
    model = build_model(p.vocab, config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    before = [e for e in found if e < config.epochs]
    start, losses, resumed_from = 0, [], None
    if before:
        start = resumed_from = max(before)
        state = load_checkpoint(found[start])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        losses = list(state["losses"])[:start]
        log(f"resuming run {p.run_key} from epoch {start} ({rel})")
    else:
        log(f"training the session encoder for {config.epochs} epochs on {device} -> {rel}")
    t0 = time.perf_counter()
    for epoch in range(start, config.epochs):
        loss = run_epoch(model, optimizer, p.data, config, epoch, device)
        if not math.isfinite(loss):
            raise SessionsError(f"the training loss is {loss} at epoch {epoch + 1}: lower lr")
        losses.append(loss)
        _save(p, model, optimizer, config, epoch + 1, losses)
        log(f"epoch {epoch + 1}/{config.epochs}: loss {loss:.4f}")
    train_seconds = time.perf_counter() - t0
    _write_done(p.run_dir, config.epochs, losses)
    trained = config.epochs - start
    return SessionEncoderResult(dataset=p.dataset, run_key=p.run_key, run_dir=p.run_dir, epochs=config.epochs,
                                epochs_trained=trained, resumed_from=resumed_from, final_loss=losses[-1],
                                losses=losses, n_sessions=p.data.n, seconds=time.perf_counter() - started,
                                train_seconds=train_seconds,
                                sessions_per_second=p.data.n * trained / train_seconds if train_seconds else 0.0,
                                device=str(device))


def batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A shuffle cut into batches of sessions of similar length (less padding: the cost is ~ length^2).

    The shuffle is cut into pools of 16 batches, each pool sorted by length and cut into batches,
    and the batches shuffled; a last batch of one session (no negatives) joins the previous one.
    """
    perm = rng.permutation(len(lengths))
    pool = 16 * batch_size
    out = []
    for i in range(0, len(perm), pool):
        chunk = perm[i:i + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2] = np.concatenate([out[-2], out.pop()])
    return [out[k] for k in rng.permutation(len(out))]


def view(events: np.ndarray, rng: np.random.Generator, config: SessionEncoderConfig) -> np.ndarray:
    """A random contiguous crop (at least crop_min of the session), then random event dropout (one event stays)."""
    n = len(events)
    size = int(rng.integers(max(1, math.ceil(config.crop_min * n)), n + 1))
    first = int(rng.integers(0, n - size + 1))
    crop = events[first:first + size]
    keep = rng.random(size) >= config.event_dropout
    if not keep.any():
        keep[int(rng.integers(0, size))] = True
    return crop[keep]


def mask(real: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
    """Events to mask: each real one with probability `prob`, at least one per session."""
    draw = rng.random(real.shape)
    masked = (draw < prob) & real
    none = ~masked.any(axis=1)
    if none.any():
        pick = np.where(real, draw, np.inf).argmin(axis=1)
        masked[none, pick[none]] = True
    return masked


def run_epoch(model: Any, optimizer: Any, data: F.Sessions, config: SessionEncoderConfig, epoch: int,
              device: Any) -> float:
    """One epoch over every session; the mean loss."""
    import torch
    from tqdm.auto import tqdm

    from producers.sessions.model import info_nce, mem_loss, to_device

    seed = epoch_seed(config.seed, epoch)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.train()
    total, count = 0.0, 0
    bar = tqdm(batches(np.diff(data.offsets), config.batch_size, rng), desc=f"epoch {epoch + 1}/{config.epochs}",
               unit="batch", disable=None if config.progress is None else not config.progress, leave=False)
    for rows in bar:
        views = []
        for _ in range(2):
            batch = F.collate(data, [view(data.events(i), rng, config) for i in rows], config.max_events)
            masked = torch.from_numpy(mask(batch["mask"].numpy(), rng, config.mask_prob))
            views.append((to_device(batch, device), masked.to(device)))
        outputs = [model(b, m) for b, m in views]
        loss = torch.zeros((), device=device)
        if config.mem_weight:
            mem = sum(mem_loss(model, h, b, m) for (h, _), (b, m) in zip(outputs, views)) / 2
            loss = loss + config.mem_weight * mem
        if config.contrastive_weight:
            loss = loss + config.contrastive_weight * info_nce(model, outputs[0][1], outputs[1][1], config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = float(loss.detach())
        total, count = total + value * len(rows), count + len(rows)
        bar.set_postfix(loss=f"{total / count:.4f}")
    bar.close()
    return total / count


def _save(p: Prepared, model: Any, optimizer: Any, config: SessionEncoderConfig, epoch: int,
          losses: list[float]) -> None:
    import torch

    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": None,
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
             "vocab": p.vocab.as_dict(), "config": config.as_dict(), "data_version": p.data_version,
             "run_key": p.run_key, "losses": list(losses), "code_version": code_version(),
             "saved_at": datetime.now(timezone.utc).isoformat()}
    final = p.run_dir / f"epoch-{epoch}.pt"
    tmp = p.run_dir / f".epoch-{epoch}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, final)


def _write_done(run_dir: Path, epochs: int, losses: list[float]) -> None:
    atomic_write_text(run_dir / DONE, json.dumps(
        {"epochs": epochs, "checkpoint": f"epoch-{epochs}.pt", "losses": losses,
         "finished_at": datetime.now(timezone.utc).isoformat()}, indent=2) + "\n")
