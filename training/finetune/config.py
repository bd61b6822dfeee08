"""What `llm4es finetune` is asked for (`FinetuneConfig`) and what it reports (`FinetuneResult`). No torch
here: the CLI reads these defaults for its options."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

from producers.errors import Llm4esError
from producers.shared.mixture import Mixture
from producers.shared.models import DEFAULT_MODEL

CHECKPOINT_MARKER = "llm4es_checkpoint.json"
"""Written into every `models/...` folder: what the embedding step needs to know about it."""

AUTO_MAX_TOKENS = 16_384
"""The most tokens a step per device that `batch_tokens="auto"` chooses: 8 rows of 2048, the batch gpu_check
measures speed at (its rows-x2 variant measures what twice that gains). Past it more memory buys only fewer,
larger optimizer steps, which cost quality on data sets of a few million tokens (the paper trained with
batch size 1; one MovieLens template:7 epoch is ~826 steps of 8 full rows)."""

RESUMABLE_CHANGES = frozenset({"save_every_steps", "keep_checkpoints", "gradient_checkpointing", "precision",
                               "force", "run_name", "device", "compile", "chunked_loss",
                               "loss_dtype"})
"""Config fields a resumed run may change: they change neither the data order nor the maths."""

Log = Callable[[str], None]


class FinetuneError(Llm4esError, ValueError):
    """The fine-tuning cannot run as asked (bad config, incompatible resume, ...)."""


@dataclass(frozen=True)
class FinetuneConfig:
    model: str = DEFAULT_MODEL  # registry name, local folder or hub id (producers.shared.models.resolve_model)
    mixture: str = "template:7"  # producers.shared.mixture.Mixture spec
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; when set it decides, not `epochs`
    lr: float = 1e-4  # peak; full fine-tuning of a ~100M-3B model
    weight_decay: float = 0.01  # on matrices only, not on norms and biases
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_ratio: float = 0.03  # of all optimizer steps, then cosine decay to 0
    warmup_steps: int | None = None  # overrides warmup_ratio
    max_grad_norm: float | None = 1.0
    batch_size: int | None = None  # texts per device and step; None: 1, unless batch_tokens chooses
    # per device: rows x longest row <= this (similar lengths), replacing batch_size; "auto": on a GPU the
    # largest budget its free memory holds (measured, at most AUTO_MAX_TOKENS), elsewhere one text a step
    batch_tokens: int | Literal["auto"] | None = "auto"
    grad_accum: int = 1
    max_length: int = 2048  # tokens per text (EOS included), or per pack
    group_by_length: bool = True  # batches of similar lengths, batch order shuffled per epoch
    packing: bool = False  # several texts per row, attention kept within each text
    gradient_checkpointing: bool = False
    trainable_layers: int | None = None  # None: full fine-tuning; N: top N blocks + final norm only
    lora_r: int | None = None  # LoRA on all linear projections (merged into the saved models)
    lora_alpha: int | None = None  # default 2 * lora_r
    save_every_steps: int | None = None  # accelerate checkpoints besides the one at every epoch end
    keep_checkpoints: int = 2  # accelerate checkpoints kept (models/ keeps every epoch)
    seed: int = 0
    precision: Literal["auto", "bf16", "fp16", "no"] = "auto"  # auto: bf16 autocast on a GPU with bf16, else fp32
    device: str = "auto"  # auto (LLM4ES_DEVICE, else the GPU when there is one) | cpu | cuda | cuda:N (one process)
    compile: bool = False  # torch.compile the model (CUDA: faster steps after a compile of a minute or so)
    chunked_loss: bool = True  # the loss without (batch, seq, vocab) float32 logits (training.loss)
    # The chunked loss's LM-head matmuls: float32 (TF32 on CUDA; about a fifth of a small model's FLOPs)
    # or the autocast dtype (bf16, as the model's other Linears; log-sum-exp and sums stay float32).
    loss_dtype: Literal["float32", "autocast"] = "float32"
    run_name: str | None = None  # default: <dataset>__<model>__<mixture>
    force: bool = False  # train on data that failed validation

    def __post_init__(self) -> None:
        Mixture.parse(self.mixture)  # MixtureError (a ValueError) on a malformed spec
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "keep_checkpoints": self.keep_checkpoints, "max_steps": self.max_steps,
                    "save_every_steps": self.save_every_steps, "trainable_layers": self.trainable_layers,
                    "lora_r": self.lora_r}
        for name, value in positive.items():
            if value is not None and value < 1:
                raise FinetuneError(f"{name} must be at least 1, got {value}")
        if self.max_length < 2:
            raise FinetuneError("max_length must be at least 2")
        if isinstance(self.batch_tokens, str) and self.batch_tokens != "auto":
            raise FinetuneError(f"batch_tokens {self.batch_tokens!r}: expected a number of tokens or 'auto'")
        if isinstance(self.batch_tokens, int) and self.batch_tokens < self.max_length:
            raise FinetuneError(f"batch_tokens ({self.batch_tokens}) must hold one row of max_length "
                                f"({self.max_length}) tokens")
        if isinstance(self.batch_tokens, int) and not self.group_by_length:
            raise FinetuneError("batch_tokens needs group_by_length (batches of similar lengths)")
        if self.lora_r is not None and self.trainable_layers is not None:
            raise FinetuneError("choose LoRA (lora_r) or partial fine-tuning (trainable_layers), not both")
        if not 0 <= self.warmup_ratio < 1:
            raise FinetuneError("warmup_ratio must be in [0, 1)")
        if self.run_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.run_name):
            raise FinetuneError(f"run_name {self.run_name!r}: use letters, digits, '.', '_' and '-'")


@dataclass
class FinetuneResult:
    run_dir: Path
    dataset: str
    model: str  # the resolved model path (or hub id)
    mixture: str
    n_texts: int
    steps: int  # optimizer steps done, over all runs of this run_name
    total_steps: int
    epochs_done: int  # complete epochs
    final_loss: float | None
    losses: list[float]  # one per optimizer step, from step 1 (resumed runs included)
    tokens_seen: int  # real (non-pad) tokens, all processes, all runs of this run_name
    tokens_per_second: float  # real tokens per second of training in this call, saving excluded
    seconds: float  # wall time of the training loop in this call (model loading excluded, saving included)
    save_seconds: float  # of which writing checkpoints and models
    peak_memory_mb: float  # CUDA: max allocated; CPU: the process's max RSS
    steps_per_epoch: int = 0
    mfu: float | None = None  # model FLOPs utilisation on a GPU of known peak (README); None on CPU
    models: list[Path] = field(default_factory=list)  # models/epoch-E (and step-N) folders, oldest first
    checkpoints: list[Path] = field(default_factory=list)  # accelerate checkpoints kept
    resumed_from: int | None = None  # the global step this call resumed from


def default_run_name(dataset: str, model: str, mixture: Mixture) -> str:
    from producers.shared.models import REGISTRY

    model_tag = model if model in REGISTRY else Path(model.rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{dataset}__{model_tag}__{mixture}").strip("-")


def config_hash(config: FinetuneConfig) -> str:
    """Of the fields that decide the trained weights (not where or how often they are saved)."""
    decisive = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


def epochs_text(steps: int, steps_per_epoch: int) -> str:
    epochs = steps / steps_per_epoch
    return f"{epochs:g} epoch{'s' if epochs != 1 else ''}" if epochs == int(epochs) else f"{epochs:.2f} epochs"
