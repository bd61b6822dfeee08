"""The training loop: one flat accelerate loop (see the package docstring), resumable at every checkpoint."""
from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import asdict
from typing import Callable

from producers.shared.mixture import Mixture
from producers.stores.locks import LockHeld, file_lock
from producers.stores.provenance import code_version
from producers.stores.warehouse import Home, stored_definition
from training.finetune.accelerator import (auto_precision, fresh_accelerator_state, precision_text,
                                           refuse_fsdp_partial, require_process_group)
from training.finetune.batching import choose_batching
from training.finetune.config import FinetuneConfig, FinetuneError, FinetuneResult, Log, default_run_name, epochs_text
from training.finetune.model import (build_model, chunked_head, count_trainable, loss_matmul_dtype, make_optimizer,
                                     training_loss)
from training.finetune.run_folder import finish_epoch, open_run, run_lock_path, run_result, save_checkpoint
from validation.gate import require_valid


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
    on_cpu, precision = device.type == "cpu", auto_precision(config, device)
    select_named_gpu(config.device, FinetuneError)  # before the Accelerator, which places on a bare `cuda`
    fresh_accelerator_state(on_cpu, precision)
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, cpu=on_cpu, mixed_precision=precision)
    say = log if accelerator.is_main_process else (lambda _: None)
    require_process_group(accelerator)
    refuse_fsdp_partial(accelerator, config)
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
        held.enter_context(file_lock(run_lock_path(run_dir, accelerator.process_index), wait=False))
    except LockHeld:
        raise FinetuneError(
            f"{run_dir} is being trained by another process right now (process {accelerator.process_index}'s "
            "lock is held): wait for it, stop it, or give this run another --run-name. The workers of a launcher "
            "killed with SIGKILL keep running: `pgrep -af 'producers.cli.*finetune'` lists them") from None
    say(f"{len(tokens):,} texts of {dataset} ({mixture}), {int(tokens.lengths.sum()):,} tokens -> {run_dir}")
    config, batching = choose_batching(config, run_dir, accelerator, model_path, say,
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
    state = open_run(run_dir, record, accelerator)
    accelerator.wait_for_everyone()
    if state.get("finished"):
        say(f"{run_name} already finished at step {state['global_step']}: nothing to do")
        return run_result(run_dir, record, state, seconds=0.0, tokens_run=0, resumed_from=None, save_seconds=0.0)

    set_seed(config.seed)
    model = build_model(model_path, config, say)
    head = chunked_head(model, accelerator, config)
    head_dtype = loss_matmul_dtype(config.loss_dtype, accelerator.mixed_precision)
    optimizer = make_optimizer(model, config, fused=cuda)
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
    say(f"training {total_steps} steps ({epochs_text(total_steps, steps_per_epoch)} of {steps_per_epoch} steps), "
        f"{count_trainable(model)}, {precision_text(accelerator)} on {accelerator.device}")
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
                    finish_epoch(accelerator, model, tokenizer, run_dir, record, state, steps_per_epoch, say)
                elif checkpointing:
                    save_checkpoint(accelerator, run_dir, state, config.keep_checkpoints, say)
                save_s += time.perf_counter() - t_save
                if on_step is not None:
                    on_step(global_step, step_loss)
                if finishing:
                    break
            epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    result = run_result(run_dir, record, state, seconds, tokens_run, resumed_from, save_s,
                     accelerator.device if cuda else None)
    result.mfu = _mfu(accelerator, model, tokens, result.tokens_per_second)
    say(f"done: {global_step} steps, loss {state['losses'][-1]:.4f}, "
        f"{result.tokens_per_second:,.0f} real tokens/s of training ({tokens_run / max(seconds, 1e-9):,.0f} with "
        f"saving){'' if result.mfu is None else f', MFU {result.mfu:.1%}'}, {seconds:.1f}s of which {save_s:.1f}s "
        f"saving; models in {run_dir / 'models'}")
    accelerator.free_memory()
    return result


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
