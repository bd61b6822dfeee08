"""The CoLES encoder through pytorch-lifestream: model, Lightning training with per-epoch checkpoints, inference.

- model: `ptls.nn.TrxEncoder` (an embedding per categorical field, the numeric inputs as they
  come, batch-normed) -> `ptls.nn.RnnSeqEncoder(type='gru')`, wrapped in
  `ptls.frames.coles.CoLESModule` with ptls's default objective (contrastive loss, margin 0.5,
  hard negatives; `neg_count` = min(5, split_count) so a batch of two users never runs short of
  negatives) and an L2-normalising head used only in training;
- data: `ColesDataset(MemoryMapDataset(records), SampleSlices(split_count, cnt_min, cnt_max))` in
  a `PtlsDataModule` (shuffled; the last batch is dropped only where it would hold a single user);
- training: a `pytorch_lightning.Trainer` (Adam, StepLR x lr_gamma per epoch). The shuffle
  (`EpochSampler`) and, at the start of every epoch, every RNG (SampleSlices draws from numpy's)
  are seeded from (seed, epoch), so an epoch's batches and slices are a pure function of the seed
  and the epoch, and a run resumed from epoch E's checkpoint ends bit for bit where an
  uninterrupted one does (on CPU). After each epoch the checkpoint `checkpoints/epoch-NNN.ckpt`
  is written (temp file, then rename) and `state.json` updated;
- inference: the trained `RnnSeqEncoder` in eval mode over each user's whole (kept) sequence,
  batches of ptls's `collate_feature_dict` (users sorted by length to spare padding). The vector
  (`pooling`) is the GRU's hidden state after the user's last event, or its states averaged over
  the user's events; not normalised. (ptls's
  `InferenceModule` cannot be imported in ptls 0.7.0 without onnxruntime, hence the plain loop.)
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytorch_lightning as pl
import torch

from producers.coles.config import ColesConfig, ColesError
from producers.coles.records import Records
from producers.stores.outputs import atomic_write_text

Log = Callable[[str], None]
CKPT_DIR = "checkpoints"
STATE_FILE = "state.json"


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed every RNG gets at the start of `epoch` (0-based)."""
    return (seed * 1_000_003 + 7919 * (epoch + 1)) % 2**32


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle that is a pure function of (seed, epoch): Lightning calls `set_epoch` before every epoch.

    The DataLoader's own shuffle draws from the global torch RNG at a moment that differs between
    a run's first epoch and later ones (Lightning creates the first iterator early), so a resumed
    run would see other batches than an uninterrupted one.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())


def _data_module(dataset: Any, config: ColesConfig) -> Any:
    """ptls's PtlsDataModule, its training DataLoader shuffled by `EpochSampler`."""
    from ptls.frames import PtlsDataModule

    class DataModule(PtlsDataModule):
        def train_dl(self, train_data: Any) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(
                dataset=train_data, collate_fn=train_data.collate_fn,
                sampler=EpochSampler(len(train_data), config.seed),
                num_workers=self.hparams.train_num_workers, batch_size=self.hparams.train_batch_size,
                drop_last=self.hparams.train_drop_last)

    return DataModule(train_data=dataset, train_batch_size=config.batch_size,
                      train_num_workers=config.num_workers, train_drop_last=drop_last(len(dataset), config))


def build_module(records: Records, config: ColesConfig) -> Any:
    from functools import partial

    from ptls.frames.coles import CoLESModule
    from ptls.frames.coles.losses import ContrastiveLoss, SoftmaxLoss
    from ptls.frames.coles.sampling_strategies import HardNegativePairSelector
    from ptls.nn import RnnSeqEncoder, TrxEncoder

    trx_encoder = TrxEncoder(
        embeddings={name: {"in": k + 2, "out": config.embedding_dim} for name, k in records.categorical.items()},
        numeric_values={name: "identity" for name in records.numeric},  # already sign*log1p in SQL
        use_batch_norm=True,
        use_batch_norm_with_lens=config.norm_skips_padding,
    )
    seq_encoder = RnnSeqEncoder(trx_encoder=trx_encoder, hidden_size=config.hidden_size, type="gru")
    return CoLESModule(
        seq_encoder=seq_encoder,
        loss=(SoftmaxLoss(temperature=config.temperature) if config.loss == "softmax" else
              ContrastiveLoss(margin=0.5,
                              sampling_strategy=HardNegativePairSelector(neg_count=min(5, config.split_count)))),
        optimizer_partial=partial(torch.optim.Adam, lr=config.lr),
        lr_scheduler_partial=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=config.lr_gamma),
    )


def drop_last(n_users: int, config: ColesConfig) -> bool:
    """A one-user batch has no negatives: drop the last batch only where it would be one."""
    return n_users > config.batch_size and n_users % config.batch_size == 1


def list_checkpoints(run_dir: Path) -> dict[int, Path]:
    """Complete checkpoints of a run by epoch (1-based: epochs trained)."""
    found = {}
    for p in (run_dir / CKPT_DIR).glob("epoch-*.ckpt"):
        try:
            found[int(p.stem.split("-", 1)[1])] = p
        except ValueError:
            continue
    return dict(sorted(found.items()))


def read_state(run_dir: Path) -> dict:
    path = run_dir / STATE_FILE
    if not path.is_file():
        return {"losses": []}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {"losses": []}


class _EpochCallback(pl.Callback):
    """Re-seeds every epoch, averages the loss, checkpoints after each epoch, reports by `log`.

    The checkpoint is written at the end of the epoch, where Lightning's own ModelCheckpoint
    writes it (Lightning steps the per-epoch scheduler of a run resumed from there itself).
    """

    def __init__(self, run_dir: Path, seed: int, epochs: int, log: Log, losses: list[float]):
        self.run_dir, self.seed, self.epochs, self.say = run_dir, seed, epochs, log
        self.losses = list(losses)
        self._sum, self._n = 0.0, 0

    def state_dict(self) -> dict:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = [float(x) for x in state.get("losses", [])]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed_all(epoch_seed(self.seed, trainer.current_epoch))
        self._sum, self._n = 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._sum += float(loss.detach())
            self._n += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        mean = self._sum / self._n if self._n else float("nan")
        self.losses = self.losses[: epoch - 1] + [mean]
        folder = self.run_dir / CKPT_DIR
        final = folder / f"epoch-{epoch:03d}.ckpt"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".epoch-{epoch:03d}.ckpt.tmp"
        trainer.save_checkpoint(tmp)
        os.replace(tmp, final)
        checkpoints = list_checkpoints(self.run_dir)
        atomic_write_text(self.run_dir / STATE_FILE, json.dumps({
            "completed_epochs": max(checkpoints), "losses": self.losses[: max(checkpoints)],
            "checkpoints": {str(e): str(p.relative_to(self.run_dir)) for e, p in checkpoints.items()},
        }, indent=2) + "\n")
        self.say(f"epoch {epoch}/{self.epochs}: loss {mean:.4f} ({self._n} batches)")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """No 'GPU available' banners, no advice about workers or batch sizes: the log stays short."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric",
                                              "lightning.fabric", "ptls")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in (r".*does not have many workers.*", r".*Trying to infer the `batch_size`.*",
                            r".*number of training batches.*", r".*LeafSpec.*", r".*is_categorical_dtype.*",
                            r".*GPU available but not used.*", r".*no `val_dataloader`.*",
                            r".*`training_step` returned `None`.*"):
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def train(module: Any, records: Records, config: ColesConfig, run_dir: Path, device: torch.device,
          resume_from: Path | None, losses: list[float], log: Log, plan: Any = None) -> list[float]:
    """Train `module` up to `config.epochs` (from `resume_from`'s epoch when given); the per-epoch losses.

    `plan` (config.training_plan) says which records train and how many batches an epoch takes."""
    import sys

    from ptls.data_load.datasets import MemoryMapDataset
    from ptls.frames.coles import ColesDataset
    from ptls.frames.coles.split_strategy import SampleSlices

    if plan is None:
        from producers.coles.config import training_plan

        plan = training_plan(records.n_events, config)
    rows = plan.train_rows
    train_records = records.records if len(rows) == len(records.records) else [records.records[i] for i in rows]
    dataset = ColesDataset(MemoryMapDataset(train_records, n_jobs=1),
                           splitter=SampleSlices(split_count=config.split_count, cnt_min=config.cnt_min,
                                                 cnt_max=config.cnt_max))
    data = _data_module(dataset, config)
    callback = _EpochCallback(run_dir, config.seed, config.epochs, log, losses)
    progress = config.progress if config.progress is not None else sys.stderr.isatty()
    with quiet_lightning():
        trainer = pl.Trainer(
            max_epochs=config.epochs,
            accelerator="gpu" if device.type == "cuda" else device.type,
            devices=[device.index or 0] if device.type == "cuda" else 1,
            # no `deterministic=`: Lightning would switch torch's deterministic mode on for the whole
            # process; the CPU kernels used here are deterministic anyway
            logger=False,
            enable_checkpointing=False,  # our callback writes one checkpoint per epoch
            enable_model_summary=False,
            enable_progress_bar=progress,
            num_sanity_val_steps=0,
            limit_train_batches=plan.batches_per_epoch,
            default_root_dir=str(run_dir),
            callbacks=[callback],
        )
        trainer.fit(module, datamodule=data, ckpt_path=str(resume_from) if resume_from else None)
    if callback.losses and not math.isfinite(callback.losses[-1]):
        raise ColesError("the training loss is NaN: lower lr or check the numeric fields")
    return callback.losses


def load_weights(module: Any, checkpoint: Path) -> None:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])


@torch.no_grad()
def infer(seq_encoder: Any, records: Records, device: torch.device, batch_size: int = 256,
          pooling: str = "last") -> np.ndarray:
    """One vector per record (same order): the encoder over the user's whole kept sequence.

    `pooling`: "last", the GRU state after the last event (ptls's reducer); "mean", the GRU states
    averaged over the user's events (padding left out)."""
    from ptls.data_load.utils import collate_feature_dict

    seq_encoder = seq_encoder.to(device).eval()
    rnn = seq_encoder.seq_encoder
    lengths = np.array([len(r["event_time"]) for r in records.records])
    order = np.argsort(-lengths, kind="stable")
    out = np.zeros((len(order), seq_encoder.embedding_size), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collate_feature_dict([{k: v for k, v in records.records[i].items() if k != "user_id"}
                                      for i in rows]).to(device)
        if pooling == "mean":
            rnn.is_reduce_sequence = False
            try:
                states = rnn(seq_encoder.trx_encoder(batch))
            finally:
                rnn.is_reduce_sequence = True
            mask = states.seq_len_mask.unsqueeze(-1).to(states.payload.dtype)
            vectors = (states.payload * mask).sum(1) / states.seq_lens.unsqueeze(-1).to(mask.dtype)
        else:
            vectors = seq_encoder(batch)
        out[rows] = vectors.float().cpu().numpy()
    return out
