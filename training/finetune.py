"""`llm4es finetune`: next-token fine-tuning of a causal LLM on a mixture of user texts (paper, section 2).

One flat accelerate loop in the shape of transformers' `run_clm_no_trainer.py`: `prepare`, a step
inside `accelerator.accumulate`, counted when `sync_gradients`, `save_state` every N steps and at
every epoch end, `load_state` + `skip_first_batches` to resume, and `unwrap_model(...).save_pretrained`
for the models the embedding step reads. The same code runs on a CPU, one GPU or several
(`accelerate launch`).

Layout of a run, `home/runs/<schema>/<run_name>/`:

    config.json            resolved config, model path, data provenance, code version
    state.json             global_step, epoch, step_in_epoch, completed_epochs, checkpoints, models, losses
    checkpoints/step-<N>/  accelerator.save_state: model, optimizer, scheduler, RNG states (last K kept)
    models/epoch-<E>/      plain Hugging Face model + tokenizer + llm4es_checkpoint.json, one per epoch
    models/step-<N>/       the same, when `max_steps` ends training inside an epoch

Every folder is written under a temporary name and renamed into place, and state.json (written
atomically after the rename) only ever names complete folders, so a killed run resumes from its
newest checkpoint and ends in the state an uninterrupted run would have reached: the batches of
an epoch are a pure function of (seed, epoch), and the schedule, optimizer and RNG states come
back from the checkpoint.

The loss of a micro-batch is the model's own: the mean over its real target tokens (labels are
-100 on padding); with `grad_accum` > 1 a step averages its micro-batches' means, as
`run_clm_no_trainer.py` does. Several processes: `accelerate launch` (or torchrun) on GPUs; on
CPUs set `ACCELERATE_USE_CPU=true`, else accelerate does not see the processes as one job.

torch, transformers, accelerate and peft are imported inside functions, so importing this module
(for `FinetuneConfig`) stays instant.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

from producers.errors import Llm4esError
from producers.shared.mixture import Mixture
from producers.shared.models import DEFAULT_MODEL
from producers.stores.locks import LockHeld, file_lock
from producers.stores.outputs import atomic_write_text
from producers.stores.provenance import code_version
from producers.stores.warehouse import Home, stored_definition
from validation.gate import require_valid

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


def finetune(home: Home, dataset: str, config: FinetuneConfig, log: Log = lambda _: None, tokenizer=None,
             on_step: Callable[[int, float], None] | None = None) -> FinetuneResult:
    """Fine-tune `config.model` on the `config.mixture` texts of `dataset`; resume the run if it exists.

    `tokenizer` overrides the model folder's own. `on_step(global_step, loss)` is called after
    every optimizer step, once that step's checkpoint (if any) is on disk; an exception raised
    there stops training as a kill would.
    """
    with ExitStack() as held:  # the run folder's lock, once the run is known, until training returns
        return _finetune(home, dataset, config, log, tokenizer, on_step, held)


def _finetune(home: Home, dataset: str, config: FinetuneConfig, log: Log, tokenizer,
              on_step: Callable[[int, float], None] | None, held: ExitStack) -> FinetuneResult:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from training.data import (EpochBatchSampler, ItemDataset, make_collate, pack_items, read_mixture_tokens,
                               single_items)
    from producers.shared.models import load_tokenizer, resolve_model

    from training.hardware import choose_device, fast_cuda_settings, select_named_gpu

    mixture = Mixture.parse(config.mixture)
    device = choose_device(config.device, FinetuneError)
    on_cpu, precision = device.type == "cpu", _precision(config, device)
    select_named_gpu(config.device, FinetuneError)  # before the Accelerator, which places on a bare `cuda`
    _fresh_accelerator_state(on_cpu, precision)
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, cpu=on_cpu, mixed_precision=precision)
    say = log if accelerator.is_main_process else (lambda _: None)
    _require_process_group(accelerator)
    _refuse_fsdp_partial(accelerator, config)
    if not on_cpu and config.precision == "auto" and precision == "no":
        say(f"{device} has no bf16 tensor cores (compute capability below 8.0): training in float32")
    fast_cuda_settings(accelerator.device)
    con = home.connect(read_only=True)
    try:
        require_valid(con, dataset, config.force)
        definition = stored_definition(con, dataset)
        model_path = resolve_model(config.model, progress=say)
        tokenizer = tokenizer or load_tokenizer(model_path)
        texts, tokens = read_mixture_tokens(con, definition.schema, mixture, tokenizer, config.max_length)
    finally:
        con.close()  # before training: other stages may want to write the warehouse meanwhile
    run_name = config.run_name or default_run_name(definition.name, config.model, mixture)
    run_dir = home.root / "runs" / definition.schema / run_name
    # A second job on the same run (the same --run-name, or the workers of a launcher killed with SIGKILL,
    # which torchrun does not stop) would write its checkpoints over this one's.
    try:
        held.enter_context(file_lock(_run_lock_path(run_dir, accelerator.process_index), wait=False))
    except LockHeld:
        raise FinetuneError(
            f"{run_dir} is being trained by another process right now (process {accelerator.process_index}'s "
            "lock is held): wait for it, stop it, or give this run another --run-name. The workers of a launcher "
            "killed with SIGKILL keep running: `pgrep -af 'producers.cli.*finetune'` lists them") from None
    say(f"{len(tokens):,} texts of {dataset} ({mixture}), {int(tokens.lengths.sum()):,} tokens -> {run_dir}")
    config, batching = _choose_batching(config, run_dir, accelerator, model_path, say,
                                        on_gpu=accelerator.device.type == "cuda")
    items = pack_items(tokens.lengths, config.max_length) if config.packing else single_items(len(tokens))
    if tokens.n_truncated:
        say(f"{tokens.n_truncated:,} texts cut to max_length={config.max_length} tokens")
    if config.packing:
        say(f"packed {len(tokens):,} texts into {len(items):,} rows of up to {config.max_length} tokens")
    dataset_ = ItemDataset(tokens, items)
    sampler = EpochBatchSampler(dataset_.lengths, config.batch_size, config.seed, config.group_by_length,
                                config.batch_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cuda = accelerator.device.type == "cuda"
    # On CUDA batches come from pinned memory, so accelerate's copy to the GPU does not block.
    train_dl = torch.utils.data.DataLoader(dataset_, batch_sampler=sampler,
                                           collate_fn=make_collate(pad_id, config.packing), pin_memory=cuda)
    train_dl = accelerator.prepare(train_dl)  # sharded: shorter on several processes

    steps_per_epoch = math.ceil(len(train_dl) / config.grad_accum)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = config.warmup_steps if config.warmup_steps is not None else math.ceil(config.warmup_ratio * total_steps)

    record = {
        "config": asdict(config), "run_name": run_name, "model_path": model_path,
        "schedule": {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "epochs": num_epochs,
                     "warmup_steps": warmup, "num_processes": accelerator.num_processes,
                     "effective_batch_size": (config.batch_size * config.grad_accum * accelerator.num_processes
                                              if config.batch_tokens is None else None),
                     "tokens_per_step_budget": (config.batch_tokens * config.grad_accum * accelerator.num_processes
                                                if config.batch_tokens else None),
                     "batching": batching},
        "data": {"dataset": definition.name, "schema": definition.schema, "mixture": str(mixture),
                 "n_texts": len(tokens), "texts_per_kind": texts.per_kind, "n_rows": len(items),
                 "n_tokens": int(tokens.lengths.sum()), "n_truncated": tokens.n_truncated,
                 "source_hashes": texts.source_hashes, "texts_sha256": texts.sha256},
        "code_version": code_version(),
    }
    state = _open_run(run_dir, record, accelerator)
    accelerator.wait_for_everyone()
    if state.get("finished"):
        say(f"{run_name} already finished at step {state['global_step']}: nothing to do")
        return _result(run_dir, record, state, seconds=0.0, tokens_run=0, resumed_from=None, save_seconds=0.0)

    set_seed(config.seed)
    model = _build_model(model_path, config, say)
    head = _chunked_head(model, accelerator, config)
    head_dtype = loss_matmul_dtype(config.loss_dtype, accelerator.mixed_precision)
    optimizer = _optimizer(model, config, fused=cuda)
    from transformers import get_cosine_schedule_with_warmup

    # The prepared scheduler steps once per process at every optimizer step (run_clm_no_trainer).
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup * accelerator.num_processes,
                                                total_steps * accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    resumed_from = None
    if state.get("checkpoint"):
        accelerator.load_state(str(run_dir / state["checkpoint"]))
        resumed_from = state["global_step"]
        say(f"resuming {run_name} from {state['checkpoint']} (epoch {state['epoch']}, "
            f"step {state['step_in_epoch']} of {steps_per_epoch})")
    global_step, epoch, step_in_epoch = state["global_step"], state["epoch"], state["step_in_epoch"]
    say(f"training {total_steps} steps ({_epochs_text(total_steps, steps_per_epoch)} of {steps_per_epoch} steps), "
        f"{_count_trainable(model)}, {_precision_text(accelerator)} on {accelerator.device}")
    if config.compile:
        model = torch.compile(model)

    from tqdm.auto import tqdm

    # no bar when the output is not a terminal (a log file): the loss lines below report progress there
    bar = tqdm(total=total_steps, initial=global_step, desc=run_name,
               disable=None if accelerator.is_local_main_process else True)
    log_every = max(1, total_steps // 20)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cuda:  # this run's peak, not that of whatever ran before it in the process (gpu_check runs several)
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    tokens_run, t0, save_s = 0, time.perf_counter(), 0.0
    window_loss, window_tokens, pending = [], 0, []
    try:
        while epoch < num_epochs and global_step < total_steps:
            model.train()
            sampler.set_epoch(epoch)
            train_dl.set_epoch(epoch)
            loader = train_dl
            if step_in_epoch:
                loader = accelerator.skip_first_batches(train_dl, step_in_epoch * config.grad_accum)
                loader.set_epoch(epoch)
            for batch in loader:
                n_tokens = batch.pop("n_tokens")
                with accelerator.accumulate(model):
                    loss = training_loss(model, batch, head, head_dtype)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm:
                        accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                window_loss.append(loss.detach().float())
                window_tokens = window_tokens + n_tokens
                if not accelerator.sync_gradients:
                    continue
                # The step's mean micro-batch loss and its tokens stay on the device until the next report:
                # reading them every step would make the host wait for the GPU at each step, and the host
                # could no longer queue the next step's kernels while this one runs (small models).
                pending.append(torch.stack([torch.stack(window_loss).mean(),
                                            torch.as_tensor(window_tokens, dtype=torch.float32,
                                                            device=accelerator.device)]))
                window_loss, window_tokens = [], 0
                global_step += 1
                step_in_epoch += 1
                bar.update(1)
                state.update(global_step=global_step, epoch=epoch, step_in_epoch=step_in_epoch)
                finishing = step_in_epoch == steps_per_epoch or global_step == total_steps  # save, then leave
                checkpointing = bool(config.save_every_steps and global_step % config.save_every_steps == 0)
                logging = global_step % log_every == 0 or global_step == total_steps
                if finishing or checkpointing or logging or on_step is not None:
                    # losses averaged over processes, tokens summed: one read for all steps since the last
                    steps = accelerator.reduce(torch.stack(pending), "sum").tolist()
                    pending = []
                    losses = [loss_sum / accelerator.num_processes for loss_sum, _ in steps]
                    new_tokens = int(sum(n for _, n in steps))
                    state["losses"].extend(losses)
                    state["tokens_seen"] += new_tokens
                    tokens_run += new_tokens
                    step_loss = losses[-1]
                    speed = tokens_run / max(time.perf_counter() - t0 - save_s, 1e-9)
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                    tok_s=f"{speed:.0f}")
                    if logging:
                        say(f"step {global_step}/{total_steps} epoch {epoch + 1} loss {step_loss:.4f} "
                            f"lr {scheduler.get_last_lr()[0]:.3g} {speed:,.0f} tok/s")
                t_save = time.perf_counter()
                if finishing:
                    _finish_epoch(accelerator, model, tokenizer, run_dir, record, state, steps_per_epoch, say)
                elif checkpointing:
                    _checkpoint(accelerator, run_dir, state, config.keep_checkpoints, say)
                save_s += time.perf_counter() - t_save
                if on_step is not None:
                    on_step(global_step, step_loss)
                if finishing:
                    break
            epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    result = _result(run_dir, record, state, seconds, tokens_run, resumed_from, save_s,
                     accelerator.device if cuda else None)
    result.mfu = _mfu(accelerator, model, tokens, result.tokens_per_second)
    say(f"done: {global_step} steps, loss {state['losses'][-1]:.4f}, "
        f"{result.tokens_per_second:,.0f} real tokens/s of training ({tokens_run / max(seconds, 1e-9):,.0f} with "
        f"saving){'' if result.mfu is None else f', MFU {result.mfu:.1%}'}, {seconds:.1f}s of which {save_s:.1f}s "
        f"saving; models in {run_dir / 'models'}")
    accelerator.free_memory()
    return result


def _run_lock_path(run_dir: Path, rank: int) -> Path:
    """This rank's lock on the run folder. Beside the folder, so the run folder holds only what training writes."""
    return run_dir.parent / f".{run_dir.name}.rank{rank}.lock"


def default_run_name(dataset: str, model: str, mixture: Mixture) -> str:
    from producers.shared.models import REGISTRY

    model_tag = model if model in REGISTRY else Path(model.rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{dataset}__{model_tag}__{mixture}").strip("-")


def config_hash(config: FinetuneConfig) -> str:
    """Of the fields that decide the trained weights (not where or how often they are saved)."""
    decisive = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


def training_loss(model, batch: dict, head_weight=None, head_dtype=None):
    """The loss of one collated batch: the forward every training step makes.

    `use_cache=False` is what keeps packed texts apart: without a cache, transformers reads the
    restarting position ids as separate documents and builds a block-diagonal mask; with one it
    assumes one sequence per row and packed texts attend to each other (tests fail if it goes).
    With `head_weight` (the model's LM head bypassed by `training.loss.bypass_lm_head`) the
    forward returns hidden states and the loss is computed chunk by chunk from them, its matmuls in
    `head_dtype` (None: the hidden states' dtype).
    """
    if head_weight is None:
        return model(**batch, use_cache=False).loss
    from training.loss import chunked_cross_entropy

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model(**inputs, use_cache=False).logits  # the bypassed head returns its input
    return chunked_cross_entropy(hidden, head_weight, batch["labels"], matmul_dtype=head_dtype)


def loss_matmul_dtype(loss_dtype: str, mixed_precision: str):
    """The torch dtype of the chunked loss's matmuls: None (float32, the master weights' dtype) unless
    `loss_dtype` is "autocast" and the run has a mixed precision (bf16 or fp16) to use."""
    import torch

    if loss_dtype not in ("float32", "autocast"):
        raise FinetuneError(f"loss_dtype {loss_dtype!r}: expected float32 or autocast")
    mp = str(mixed_precision)
    if loss_dtype == "float32" or mp not in ("bf16", "fp16"):
        return None
    return torch.bfloat16 if mp == "bf16" else torch.float16


def _chunked_head(model, accelerator, config: FinetuneConfig):
    """The LM head's weight when the chunked loss applies (not under FSDP, whose sharded weights are
    only whole inside the wrapped forward), else None and the model's own loss."""
    from accelerate.utils import DistributedType

    from training.loss import bypass_lm_head

    if not config.chunked_loss or accelerator.distributed_type == DistributedType.FSDP:
        return None
    return bypass_lm_head(model)


def _precision(config: FinetuneConfig, device: Any) -> str:
    """`auto`: bf16 autocast on a GPU with bf16 tensor cores, float32 elsewhere. On an older GPU (V100,
    T4) bf16 is only emulated; fp16 would be fast there but needs loss scaling, which this loop has
    never been run with on such a GPU, so `auto` does not pick it (`FinetuneConfig(precision="fp16")` does)."""
    from producers.shared.devices import native_bf16

    if config.precision != "auto":
        return config.precision
    return "bf16" if native_bf16(device) else "no"


def _fresh_accelerator_state(on_cpu: bool, mixed_precision: str) -> None:
    """Forget accelerate's process-wide state when this run needs another device or precision.

    accelerate keeps one state per process: once an Accelerator exists, a later one asking for
    another mixed precision raises ValueError ("AcceleratorState has already been initialized"), and
    one asking for the GPU after a CPU run silently stays on the CPU. So a second `finetune` in the
    same process (the CUDA test trains on the CPU, then on the GPU; a notebook) would fail or train
    on the wrong device. Single process only: a launched job keeps its state (one config per job).
    """
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if not state or PartialState._shared_state.get("num_processes", 1) != 1:
        return
    was_cpu = getattr(state.get("device"), "type", "cpu") == "cpu"
    if was_cpu != on_cpu or state.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=True)


def _precision_text(accelerator) -> str:
    mp = str(accelerator.mixed_precision)
    return "float32" if mp == "no" else f"{mp} autocast (float32 master weights)"


def _epochs_text(steps: int, steps_per_epoch: int) -> str:
    epochs = steps / steps_per_epoch
    return f"{epochs:g} epoch{'s' if epochs != 1 else ''}" if epochs == int(epochs) else f"{epochs:.2f} epochs"


def _require_process_group(accelerator) -> None:
    """A launcher started N processes, so accelerate must have joined them into one job of N.

    `accelerate launch --use_fsdp` (or `--multi_gpu`) on a machine without GPUs starts the processes but
    can set each up alone (distributed type NO, process 0 of 1; seen with a bare `Accelerator()`): every
    one would train the whole run by itself, into the same folder. Refused, with what works on CPUs."""
    from training.hardware import Ranks

    launched = Ranks.from_env().world_size
    if launched > 1 and accelerator.num_processes != launched:
        raise FinetuneError(
            f"started as {launched} processes (WORLD_SIZE), but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}): each would train the whole run alone. An FSDP or multi-GPU "
            "accelerate config needs GPUs; on CPUs launch with `torchrun --nproc-per-node N`")


def _refuse_fsdp_partial(accelerator, config: FinetuneConfig) -> None:
    """FSDP shards parameters: clipping would use a shard-local norm for the frozen/LoRA mix and the
    LoRA merge would run on a sharded model. Refuse rather than train something else than asked."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and (config.lora_r or config.trainable_layers):
        what = "LoRA (--lora-r)" if config.lora_r else "partial fine-tuning (--trainable-layers)"
        raise FinetuneError(f"{what} is not supported under FSDP: run it with DDP (`accelerate launch` without an "
                            "FSDP config, or torchrun), or drop the option for full fine-tuning under FSDP")


def _mfu(accelerator, model, tokens, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation (6N + attention per real token, README) on a known GPU; None on CPU."""
    from training.hardware import model_flops_per_token, peak_flops

    peak, _ = peak_flops(accelerator.device)
    if peak is None or tokens_per_s <= 0:
        return None
    config = accelerator.unwrap_model(model).config
    lengths = tokens.lengths
    mean_context = float((lengths.astype("float64") ** 2).sum() / max(lengths.sum(), 1)) / 2
    return tokens_per_s * model_flops_per_token(config, mean_context, training=True) / (
        peak * accelerator.num_processes)


def _choose_batching(config: FinetuneConfig, run_dir: Path, accelerator, model_path: str, say: Log,
                     on_gpu: bool) -> tuple[FinetuneConfig, dict]:
    """`config` with a concrete batch_size and batch_tokens, and how they were chosen (config.json's
    `schedule.batching`). An explicit --batch-size wins over the default "auto"; a resumed run keeps
    the batches it started with, whatever memory is free today."""
    if config.batch_tokens != "auto":
        how = "--batch-tokens" if config.batch_tokens else "--batch-size"
        return replace(config, batch_size=config.batch_size or 1), {"chosen_by": how}
    if config.batch_size is not None:
        return replace(config, batch_tokens=None), {"chosen_by": "--batch-size"}
    saved = _read_json(run_dir / "config.json")
    if saved is not None:
        chosen = replace(config, batch_size=saved["config"].get("batch_size") or 1,
                         batch_tokens=saved["config"].get("batch_tokens"))
        return chosen, saved.get("schedule", {}).get("batching") or {"chosen_by": "the run being resumed"}
    from accelerate.utils import DistributedType

    one_text = replace(config, batch_size=1, batch_tokens=None)
    if not on_gpu:
        return one_text, {"chosen_by": "auto: one text a step off the GPU"}
    if accelerator.distributed_type == DistributedType.FSDP or not config.group_by_length:
        why = "under FSDP (a shard's peak is not the probe's)" if config.group_by_length else "without group_by_length"
        say(f"--batch-tokens auto: one text a step {why}; give --batch-tokens N or --batch-size N to choose")
        return one_text, {"chosen_by": f"auto: one text a step {why}"}
    import torch

    from training.memory_fit import NotEnoughMemory

    fit, problem = None, ""
    try:
        fit = measure_batch_tokens(model_path, config, accelerator)
    except NotEnoughMemory as e:
        problem = str(e)
    # every process must train on the same batches: the smallest budget of all, and all stop if one cannot
    tokens = int(accelerator.gather(torch.tensor([fit.tokens if fit else 0], device=accelerator.device)).min())
    if tokens == 0:
        raise FinetuneError(
            f"{model_path} does not fit for training at --max-length {config.max_length} on "
            f"{'this GPU' if fit is None else 'one of the GPUs'}{': ' + problem if problem else ''}. Try "
            "--gradient-checkpointing, --lora-r 16, --trainable-layers N, a smaller --max-length, or FSDP "
            "over several GPUs (with --batch-tokens N)")
    say(fit.summary() if tokens == fit.tokens else f"--batch-tokens auto: {tokens:,} tokens (the smallest of "
                                                   f"{accelerator.num_processes} processes)")
    return replace(config, batch_size=1, batch_tokens=tokens), {"chosen_by": "auto", **fit.record(),
                                                                "batch_tokens": tokens}


def measure_batch_tokens(model_path: str, config: FinetuneConfig, accelerator, meter=None):
    """The `training.memory_fit.BatchFit` of this model and config on this process's GPU: the real
    training step (autocast, checkpointing, LoRA or frozen layers, the chunked loss) probed on rows of
    max_length random tokens, plus AdamW's two float32 states per trained weight and, with several
    processes, DDP's gradient buckets (one more float32 copy). `meter` defaults to the CUDA allocator."""
    import gc

    import numpy as np
    import torch

    from training.data import make_collate
    from training.memory_fit import CudaMeter, probe_line, tokens_that_fit

    meter = meter or CudaMeter(accelerator.device)
    free = meter.start()
    model = _build_model(model_path, config, lambda _: None).to(accelerator.device)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = _chunked_head(model, accelerator, config)
    head_dtype = loss_matmul_dtype(config.loss_dtype, accelerator.mixed_precision)
    vocab = model.get_input_embeddings().num_embeddings
    rng = np.random.default_rng(0)
    collate = make_collate(pad_id=0, packed=False)

    def step(rows: int) -> None:
        batch = collate([[rng.integers(3, vocab, config.max_length)] for _ in range(rows)])
        batch = {k: v.to(accelerator.device) for k, v in batch.items() if k != "n_tokens"}
        with accelerator.autocast():
            loss = training_loss(model, batch, head, head_dtype)
        loss.backward()

    try:
        line = probe_line(step, config.max_length, meter, (torch.OutOfMemoryError,))
    finally:
        model = head = None  # the probe's model goes before training loads its own
        gc.collect()
        if accelerator.device.type == "cuda":
            torch.cuda.empty_cache()
    extra = 4 * trained * (2 + (accelerator.num_processes > 1))
    return tokens_that_fit(line, free, extra, config.max_length, AUTO_MAX_TOKENS)


def _build_model(model_path: str, config: FinetuneConfig, say: Log):
    import torch

    from producers.shared.models import load_causal_lm

    model = load_causal_lm(model_path, dtype=torch.float32)  # fp32 master weights; autocast does bf16
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora_r:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha or 2 * config.lora_r, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    elif config.trainable_layers is not None:
        decoder = model.get_decoder()
        layers, norm = decoder.layers, getattr(decoder, "norm", None)
        if config.trainable_layers > len(layers) or norm is None:
            raise FinetuneError(f"trainable_layers={config.trainable_layers}: the model has {len(layers)} decoder "
                                f"blocks{'' if norm is not None else ' and no final norm named `norm`'}")
        model.requires_grad_(False)
        for module in [*layers[-config.trainable_layers:], norm]:
            module.requires_grad_(True)
    return model.train()


def _optimizer(model, config: FinetuneConfig, fused: bool = False):
    """AdamW, decay on matrices only; `fused` (one kernel for all parameters) on CUDA."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(config.beta1, config.beta2),
                             **({"fused": True} if fused else {}))


def _count_trainable(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} of {total:,} parameters trained"


# --- the run folder ---------------------------------------------------------------------------

def _open_run(run_dir: Path, record: dict, accelerator) -> dict:
    """Create the run folder, or check that resuming it keeps what decides the weights; return its state."""
    saved = _read_json(run_dir / "config.json")
    if saved is not None:
        _check_resumable(run_dir, saved, record)
    state = _read_json(run_dir / "state.json") or {
        "global_step": 0, "epoch": 0, "step_in_epoch": 0, "completed_epochs": 0, "checkpoint": None,
        "checkpoints": [], "models": [], "losses": [], "tokens_seen": 0, "finished": False}
    if accelerator.is_main_process:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "models").mkdir(parents=True, exist_ok=True)
        _remove_leftovers(run_dir, state)
        if saved is None:
            _write_json(run_dir / "config.json", {**record, "created_at": _now()})
    return state


def _check_resumable(run_dir: Path, saved: dict, record: dict) -> None:
    changed = [f"{k}: {saved['config'].get(k)!r} -> {v!r}" for k, v in record["config"].items()
               if k not in RESUMABLE_CHANGES and saved["config"].get(k) != v]
    for section, key in [("schedule", "num_processes"), ("data", "texts_sha256")]:
        if saved.get(section, {}).get(key) != record[section][key]:
            changed.append(f"{key}: {saved.get(section, {}).get(key)!r} -> {record[section][key]!r}")
    if saved.get("model_path") != record["model_path"]:
        changed.append(f"model_path: {saved.get('model_path')!r} -> {record['model_path']!r}")
    if changed:
        raise FinetuneError(f"run {run_dir.name!r} exists with another config ({'; '.join(changed)}); resuming it "
                            f"would not give the run it started. Give a new run_name, or delete {run_dir}")


def _remove_leftovers(run_dir: Path, state: dict) -> None:
    """Temporary folders of a killed save, and checkpoints state.json no longer names."""
    for parent, keep in [(run_dir / "checkpoints", state["checkpoints"]), (run_dir / "models", state["models"])]:
        for path in parent.iterdir():
            if path.name.startswith(".") or (parent.name == "checkpoints" and path.name not in keep):
                shutil.rmtree(path, ignore_errors=True)


def _checkpoint(accelerator, run_dir: Path, state: dict, keep: int, say: Log) -> None:
    """`save_state` into a temporary folder, rename it, then point state.json at it and prune old ones."""
    name = f"step-{state['global_step']}"
    final, tmp = run_dir / "checkpoints" / name, run_dir / "checkpoints" / f".{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with _tied_weights_saved_once(accelerator):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _replace_folder(tmp, final)
        kept = [c for c in state["checkpoints"] if c != name] + [name]
        dropped, kept = kept[:-keep], kept[-keep:]
        state.update(checkpoint=f"checkpoints/{name}", checkpoints=kept)
        _write_json(run_dir / "state.json", {**state, "updated_at": _now()})
        for old in dropped:
            shutil.rmtree(run_dir / "checkpoints" / old, ignore_errors=True)
        say(f"checkpoint {final}")
    else:
        state.update(checkpoint=f"checkpoints/{name}")
    accelerator.wait_for_everyone()


@contextmanager
def _tied_weights_saved_once(accelerator):
    """accelerate's safetensors save drops the second name of a shared tensor and warns "Removed
    shared tensor {'lm_head.weight'}" on every save. For weights the model declares tied (SmolLM2's
    embeddings) that is the right thing, and loading re-ties them: only that warning is muted.
    Any other shared tensor still warns."""
    import logging

    tied: set[str] = set()
    for model in accelerator._models:
        inner = accelerator.unwrap_model(model)
        keys = getattr(inner, "_tied_weights_keys", None) or {}
        names = keys.keys() if isinstance(keys, dict) else keys
        params = dict(inner.named_parameters(remove_duplicate=False))
        for name in names:  # tied in fact, not only by declaration
            source = keys.get(name) if isinstance(keys, dict) else None
            if name in params and (source is None or (source in params and params[source] is params[name])):
                tied.add(name)

    def keep(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "Removed shared tensor" not in text or not tied:
            return True
        removed = set(re.findall(r"'([^']+)'", text.split(" while saving")[0]))
        return not removed or not removed <= {n.split("module.")[-1] for n in tied} | tied

    target = logging.getLogger("accelerate.utils.other")
    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


def _finish_epoch(accelerator, model, tokenizer, run_dir: Path, record: dict, state: dict, steps_per_epoch: int,
                  say: Log) -> None:
    """At an epoch end (or where max_steps stops): a model folder for the embedding step, then a checkpoint."""
    whole = state["step_in_epoch"] == steps_per_epoch
    if whole:
        state.update(completed_epochs=state["completed_epochs"] + 1, epoch=state["epoch"] + 1, step_in_epoch=0)
    name = f"epoch-{state['completed_epochs']}" if whole else f"step-{state['global_step']}"
    config = record["config"]
    marker = {
        "dataset": record["data"]["dataset"], "schema": record["data"]["schema"], "run_name": record["run_name"],
        "epoch": state["completed_epochs"] if whole else round(state["global_step"] / steps_per_epoch, 4),
        "global_step": state["global_step"], "model_source": config["model"], "model_path": record["model_path"],
        "mixture": record["data"]["mixture"], "config_hash": config_hash(FinetuneConfig(**config)),
        "lora_merged": bool(config["lora_r"]), "code_version": record["code_version"], "produced_at": _now(),
    }
    _save_model(accelerator, model, tokenizer, run_dir / "models" / name, marker, lora=bool(config["lora_r"]))
    state["models"] = [m for m in state["models"] if m != name] + [name]
    say(f"model {run_dir / 'models' / name}")
    state["finished"] = state["global_step"] >= record["schedule"]["total_steps"]
    _checkpoint(accelerator, run_dir, state, config["keep_checkpoints"], say)


def _save_model(accelerator, model, tokenizer, folder: Path, marker: dict, lora: bool) -> None:
    """The weights as a plain Hugging Face folder that `producers.shared.models.load_causal_lm` loads.

    A LoRA model is saved merged (base + adapter, so the embedding step needs no peft), with the
    adapter alone in `adapter/`; the merge happens on a copy, so training goes on unmerged.
    """
    from accelerate.utils import is_compiled_module

    if is_compiled_module(model):  # `compile`: accelerate's unwrap keeps torch.compile's wrapper, whose
        model = model._orig_mod  # state dict names every weight `_orig_mod.<name>` and would load as random
    tmp = folder.with_name(f".{folder.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    if lora:
        if accelerator.is_main_process:
            adapted = accelerator.unwrap_model(model)
            adapted.save_pretrained(tmp / "adapter")
            copy.deepcopy(adapted).merge_and_unload().save_pretrained(tmp)
    else:
        state_dict = accelerator.get_state_dict(model)  # every process (sharded models gather here)
        accelerator.unwrap_model(model).save_pretrained(tmp, is_main_process=accelerator.is_main_process,
                                                        state_dict=state_dict)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(tmp)
        _write_json(tmp / CHECKPOINT_MARKER, marker)
        _replace_folder(tmp, folder)
    accelerator.wait_for_everyone()


def _result(run_dir: Path, record: dict, state: dict, seconds: float, tokens_run: int,
            resumed_from: int | None, save_seconds: float, cuda_device=None) -> FinetuneResult:
    import resource

    import torch

    if cuda_device is not None:  # a CPU run on a GPU machine reports its RSS, not the GPU's memory
        peak = torch.cuda.max_memory_allocated(cuda_device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    losses = state["losses"]
    return FinetuneResult(
        run_dir=run_dir, dataset=record["data"]["dataset"], model=record["model_path"],
        mixture=record["data"]["mixture"], n_texts=record["data"]["n_texts"], steps=state["global_step"],
        total_steps=record["schedule"]["total_steps"], epochs_done=state["completed_epochs"],
        final_loss=losses[-1] if losses else None, losses=list(losses), tokens_seen=state["tokens_seen"],
        tokens_per_second=tokens_run / (seconds - save_seconds) if seconds > save_seconds else 0.0,
        seconds=seconds, save_seconds=save_seconds, peak_memory_mb=peak,
        steps_per_epoch=record["schedule"]["steps_per_epoch"],
        models=[run_dir / "models" / m for m in state["models"]],
        checkpoints=[run_dir / "checkpoints" / c for c in state["checkpoints"]], resumed_from=resumed_from)


def _replace_folder(new: Path, dest: Path) -> None:
    from producers.shared.models import _swap_into_place

    _swap_into_place(new, dest)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

