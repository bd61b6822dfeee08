"""What a CoLES run is asked to do (`ColesConfig`), what it did (`ColesResult`), and its error type.

No torch here: the CLI imports this module for its options.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from producers.errors import Llm4esError

# Config fields that change neither the data nor the maths of an epoch: they are left out of the
# run key, so a run asked for more epochs continues the same run, and a finished one is reused.
# `pooling` only reads the trained encoder: a run is reused whatever vector is asked of it.
NOT_IN_RUN_KEY = frozenset({"epochs", "device", "threads", "num_workers", "force", "resume", "progress", "pooling"})

# Settings added after the first runs, with the value every earlier run had: a run whose recorded
# config lacks one (a served encoder's provenance) is rebuilt and read with these, not today's defaults.
LEGACY = {"pooling": "last", "norm_skips_padding": False, "loss": "contrastive"}


class ColesError(Llm4esError, ValueError):
    """The CoLES run cannot be done as asked (bad config value, no events, no usable fields)."""


@dataclass(frozen=True)
class ColesConfig:
    # Defaults chosen on MovieLens-100k's development users (benchmarks/coles_choices.py, RESULTS.md
    # "CoLES as a fair reference"): the old ones (256 / 16 / 1,000 / 10 epochs of 64 users / slices
    # up to 100 / last state) made 150 optimiser steps in all and scored gender ROC-AUC 0.58-0.62.
    # encoder: ptls TrxEncoder (categorical embeddings + numeric inputs) -> GRU
    hidden_size: int = 128  # GRU hidden size = the embedding's dimension
    # the user's vector: "mean", the GRU states averaged over every kept event (the whole history
    # counts, not mostly its end); "last", the state after the last kept event (ptls's reducer)
    pooling: str = "mean"
    embedding_dim: int = 32  # embedding size of each categorical field
    max_categories: int = 2000  # per categorical field: the most frequent values get codes 1..K, the rest K+1
    # The numeric inputs' batch norm (ptls TrxEncoder): statistics over the real events only. False:
    # ptls's default, which counts the padding zeros too, so in a batch of uneven lengths the norm
    # mostly encodes "is this padding" and flattens a field far from 0 (ln(1 + year) ~ 7.6 +- 0.01).
    # Measured: no gain on MovieLens-100k, so ptls's default stays.
    norm_skips_padding: bool = False
    loss: str = "contrastive"  # contrastive: ptls's default (margin 0.5, hard negatives); softmax: InfoNCE
    temperature: float = 0.05  # softmax loss only (ptls's default, for L2-normalised vectors)
    # training: CoLES (ptls CoLESModule), Adam + StepLR per epoch; small batches and short slices buy
    # optimiser steps (MovieLens-100k: 30 batches an epoch, 900 steps, ~3-5 s an epoch on 2 CPU cores)
    epochs: int = 30
    batch_size: int = 32  # users per batch; each gives `split_count` subsequences
    lr: float = 0.002
    lr_gamma: float = 0.95  # learning rate x lr_gamma after every epoch
    split_count: int = 5  # subsequences (positives) sampled per user and batch (ptls SampleSlices)
    cnt_min: int = 15  # shortest subsequence, events
    cnt_max: int = 50  # longest subsequence, events
    max_seq_len: int = 1000  # events per user kept (the most recent), for training and inference
    # Cost that follows the data (see `training_plan`): users with fewer than cnt_min events give
    # sub-sequences that are all the whole sequence (nothing to contrast), so training uses the users
    # with at least cnt_min events when there are at least 2 batches of them; and an epoch is at most
    # max_batches_per_epoch batches (a fresh random sample of users each epoch on big datasets).
    max_batches_per_epoch: int = 100
    seed: int = 42
    device: str = "auto"  # auto: cuda when available, else cpu; or cpu | cuda | cuda:1
    threads: int | None = None  # torch CPU threads during the run; None: torch's default (all cores).
    # Bit-for-bit equal vectors from run to run on a CPU need threads=1: with more, multi-threaded
    # kernels can differ in the last bits (~1e-7) between runs of the same seed.
    num_workers: int = 0  # DataLoader workers
    as_of: datetime | None = None  # only events at or before it (UTC); default: the dataset's last event
    force: bool = False  # run even if the dataset has not passed validation
    resume: bool = True  # continue (or reuse) a run with the same key; False: start it again from scratch
    progress: bool | None = None  # Lightning's progress bar; None: only on a terminal

    def check(self) -> None:
        """Raise ColesError naming the first bad value."""
        positive = ("hidden_size", "embedding_dim", "max_categories", "epochs", "cnt_min", "cnt_max", "max_seq_len",
                    "max_batches_per_epoch")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ColesError(f"{name} must be a whole number of at least 1, not {value!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ColesError(f"batch_size must be at least 2 (CoLES contrasts users in a batch), "
                             f"not {self.batch_size!r}")
        if not isinstance(self.split_count, int) or self.split_count < 2:
            raise ColesError(f"split_count must be at least 2 (positives come in pairs), not {self.split_count!r}")
        if self.cnt_min > self.cnt_max:
            raise ColesError(f"cnt_min ({self.cnt_min}) must not exceed cnt_max ({self.cnt_max})")
        if self.pooling not in ("last", "mean"):
            raise ColesError(f"pooling must be last or mean, not {self.pooling!r}")
        if self.loss not in ("contrastive", "softmax"):
            raise ColesError(f"loss must be contrastive or softmax, not {self.loss!r}")
        if not self.temperature > 0:
            raise ColesError(f"temperature must be positive, not {self.temperature!r}")
        if not self.lr > 0:
            raise ColesError(f"lr must be positive, not {self.lr!r}")
        if not 0 < self.lr_gamma <= 1:
            raise ColesError(f"lr_gamma must be in (0, 1], not {self.lr_gamma!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ColesError(f"threads must be at least 1 (or None for torch's default), not {self.threads!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ColesError(f"num_workers must be 0 or more, not {self.num_workers!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ColesError(f"seed must be a whole number in [0, 2**32), not {self.seed!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(self.device)):
            raise ColesError(f"device {self.device!r}: expected auto, cpu, cuda, cuda:N or mps")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["as_of"] = self.as_of.isoformat() if self.as_of is not None else None
        return d


def recorded_config(recorded: dict[str, Any], as_of: datetime | None = None) -> ColesConfig:
    """The config a run recorded (its provenance's "config"), as `as_of`; a setting it predates takes its
    `LEGACY` value (the run was trained and read that way), never today's default."""
    names = {f.name for f in fields(ColesConfig)}
    merged = {**LEGACY, **recorded}
    return ColesConfig(**{k: v for k, v in merged.items() if k in names and k != "as_of"}, as_of=as_of)


@dataclass
class ColesResult:
    dataset: str
    table: str  # "<schema>.coles_embeddings"
    parquet_path: Path
    n_users: int
    dim: int
    model: str  # "coles-gru-128"
    checkpoint: str  # the checkpoint the vectors come from, relative to the home
    epoch: int  # epochs the encoder was trained
    epochs_trained: int  # epochs trained by this call (0: a finished run was reused)
    resumed_from: int | None  # the epoch an interrupted run was resumed from
    final_loss: float | None  # mean training loss of the last epoch
    losses: list[float]  # mean training loss per epoch, from epoch 1
    as_of: datetime  # = feature_timestamp
    run_key: str
    run_dir: Path
    seconds: float  # wall clock, the whole call
    train_seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingPlan:
    """Which users train the encoder and how many batches an epoch takes (every user is embedded)."""

    train_rows: tuple[int, ...]  # indices into the records, ascending
    n_short: int  # users with fewer than cnt_min events
    batches_per_epoch: int
    note: str  # what the plan did, for the log ("" when it trains on everyone, every batch)


def training_plan(n_events: Any, config: ColesConfig) -> TrainingPlan:
    """The documented rule: train on the users long enough for the sampler, cap the batches per epoch.

    - A user with fewer than `cnt_min` events yields `split_count` copies of its whole sequence:
      nothing to contrast, one batch slot spent. When at least two batches of users have `cnt_min`
      events or more, only they train; otherwise (a dataset of very short histories) everyone
      trains, since there is nothing better, and the warning says so.
    - An epoch is at most `max_batches_per_epoch` batches: on a big dataset each epoch sees a fresh
      random sample of `max_batches_per_epoch x batch_size` users (the shuffle is seeded per epoch).
    MovieLens-100k (943 users, all with 20 ratings or more) trains exactly as without the rule.
    """
    import numpy as np

    n = np.asarray(n_events)
    usable = np.flatnonzero(n >= config.cnt_min)
    n_short = int(len(n) - len(usable))
    notes = []
    if n_short and len(usable) >= 2 * config.batch_size:
        rows = usable
        notes.append(f"training on the {len(usable):,} users with at least {config.cnt_min} events")
    else:
        rows = np.arange(len(n))
        if n_short:
            notes.append(f"fewer than {2 * config.batch_size} users have {config.cnt_min} events or more: "
                         "training on everyone, the short ones only as negatives")
    full = -(-len(rows) // config.batch_size)
    batches = min(full, config.max_batches_per_epoch)
    if batches < full:
        notes.append(f"{batches} of {full} batches per epoch (max_batches_per_epoch): each epoch a fresh sample "
                     f"of {batches * config.batch_size:,} users")
    return TrainingPlan(tuple(int(i) for i in rows), n_short, batches, "; ".join(notes))
