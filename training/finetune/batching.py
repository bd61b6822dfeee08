"""How many texts a step: `--batch-size`, `--batch-tokens N`, or "auto", the largest budget that fits the
GPU, measured on the run's own model and settings (`training.memory_fit`)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from training.finetune.config import AUTO_MAX_TOKENS, FinetuneConfig, FinetuneError, Log
from training.finetune.model import build_model, chunked_head, loss_matmul_dtype, training_loss
from training.finetune.run_folder import read_json


def choose_batching(config: FinetuneConfig, run_dir: Path, accelerator, model_path: str, say: Log,
                     on_gpu: bool) -> tuple[FinetuneConfig, dict]:
    """`config` with a concrete batch_size and batch_tokens, and how they were chosen (config.json's
    `schedule.batching`). An explicit --batch-size wins over the default "auto"; a resumed run keeps
    the batches it started with, whatever memory is free today."""
    if config.batch_tokens != "auto":
        how = "--batch-tokens" if config.batch_tokens else "--batch-size"
        return replace(config, batch_size=config.batch_size or 1), {"chosen_by": how}
    if config.batch_size is not None:
        return replace(config, batch_tokens=None), {"chosen_by": "--batch-size"}
    saved = read_json(run_dir / "config.json")
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
    model = build_model(model_path, config, lambda _: None).to(accelerator.device)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = chunked_head(model, accelerator, config)
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
