"""What the sessions stages are asked to do (configs), what they did (results), and their error type.

No torch here: the CLI imports this module for its options.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from producers.errors import Llm4esError


class SessionsError(Llm4esError, RuntimeError):
    """A sessions stage cannot be done as asked (bad config, failed checks, no trained encoder)."""


@dataclass(frozen=True)
class SessionsConfig:
    gap_minutes: float | None = None  # overrides the definition's events.sessions.gap_minutes (gap mode only)
    force: bool = False  # build even if the dataset has not passed validation
    # A refresh: only these users' sessions are cut again (with the spec the table was built with); the
    # other users' rows stay as they are.
    users: tuple | None = None


@dataclass
class SessionsResult:
    dataset: str
    table: str  # "<schema>.sessions"
    mode: str  # "column" or "gap"
    spec: dict[str, Any]  # {"column": ..., "gap_minutes": ...} as used
    n_sessions: int
    n_events: int
    events_per_session: dict[str, float]  # median, p90, max (of the re-cut users' sessions when `users`)
    validation_path: Path  # the JSON report of the checks
    seconds: float


# Config fields that change neither the data nor the maths of an epoch: left out of the run key, so a
# run asked for more epochs continues the same run and a finished one is reused.
NOT_IN_RUN_KEY = frozenset({"epochs", "device", "threads", "progress", "force"})


@dataclass(frozen=True)
class SessionEncoderConfig:
    # features
    max_events: int = 64  # a longer session keeps its last max_events events
    max_categories: int = 1000  # per categorical field: the most frequent values; the rest share one OOV code
    text_buckets: int = 2048  # hashed word buckets per text field
    max_tokens: int = 16  # words kept per text value
    # model: a Transformer encoder; the session vector is the masked mean of its outputs (dimension d_model)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.1
    # objective: mem_weight * masked-event modelling + contrastive_weight * InfoNCE (see producers.sessions.model)
    mask_prob: float = 0.2  # share of a view's events masked for MEM (at least one per session)
    temperature: float = 0.1  # InfoNCE temperature
    crop_min: float = 0.5  # a view keeps a random contiguous crop of at least this share of the session
    event_dropout: float = 0.1  # then drops each event of the crop with this probability (one always stays)
    mem_weight: float = 1.0
    contrastive_weight: float = 1.0
    # training: AdamW at a constant learning rate (no schedule, so a longer run continues a shorter one)
    epochs: int = 5
    batch_size: int = 64  # sessions per batch; the other sessions of a batch are the InfoNCE negatives
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 42
    device: str = "auto"  # auto: cuda when available, else cpu; or cpu | cuda | cuda:N
    # torch CPU threads during the call; None: torch's default (all cores). The model is small: on
    # MovieLens on a busy 2-core machine one thread ran an epoch in ~5 s, torch's default 2 in ~77 s
    # (threads spin waiting for each other). Not in the run key: results differ only in the last bits.
    threads: int | None = 1
    progress: bool | None = None  # tqdm bar per epoch; None: on a terminal only (a cron log gets no bars)
    force: bool = False  # run even if the dataset has not passed validation

    def check(self) -> None:
        """Raise SessionsError naming the first bad value."""
        for name in ("max_events", "max_categories", "text_buckets", "max_tokens", "d_model", "n_layers",
                     "n_heads", "epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SessionsError(f"{name} must be a whole number of at least 1, not {value!r}")
        if self.d_model % self.n_heads:
            raise SessionsError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise SessionsError(f"batch_size must be at least 2 (InfoNCE contrasts the sessions of a batch), "
                                f"not {self.batch_size!r}")
        for name in ("mask_prob", "crop_min"):
            if not 0 < getattr(self, name) <= 1:
                raise SessionsError(f"{name} must be in (0, 1], not {getattr(self, name)!r}")
        for name in ("dropout", "event_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise SessionsError(f"{name} must be in [0, 1), not {getattr(self, name)!r}")
        for name in ("mem_weight", "contrastive_weight", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise SessionsError(f"{name} must be 0 or more, not {getattr(self, name)!r}")
        if self.mem_weight == 0 and self.contrastive_weight == 0:
            raise SessionsError("mem_weight and contrastive_weight cannot both be 0")
        if not self.lr > 0 or not self.temperature > 0:
            raise SessionsError(f"lr and temperature must be positive (lr {self.lr!r}, "
                                f"temperature {self.temperature!r})")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise SessionsError(f"seed must be a whole number in [0, 2**32), not {self.seed!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise SessionsError(f"threads must be at least 1 (or None for torch's default), not {self.threads!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(self.device)):
            raise SessionsError(f"device {self.device!r}: expected auto, cpu, cuda, cuda:N or mps")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def keyed(self) -> dict[str, Any]:
        """The fields that go into the run key."""
        return {k: v for k, v in self.as_dict().items() if k not in NOT_IN_RUN_KEY}


@dataclass
class SessionEncoderResult:
    dataset: str
    run_key: str
    run_dir: Path
    epochs: int  # epochs the encoder has been trained (= config.epochs)
    epochs_trained: int  # by this call (0: a finished run was reused)
    resumed_from: int | None  # the epoch an interrupted run resumed from
    final_loss: float | None  # mean loss of the last epoch
    losses: list[float]  # mean loss per epoch, from epoch 1
    n_sessions: int
    seconds: float  # wall clock, the whole call
    train_seconds: float
    sessions_per_second: float  # training throughput (sessions x epochs trained / train_seconds); 0 when reused
    device: str = "cpu"


@dataclass
class SessionEmbedResult:
    dataset: str
    table: str  # "<schema>.session_embeddings"
    parquet_path: Path
    n_sessions: int
    dim: int
    run_dir: Path
    checkpoint: str  # relative to the home
    epoch: int
    seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)
    unstored: Any = None  # `embed_some(also=...)`: session_id and embedding of the sessions embedded, not stored
