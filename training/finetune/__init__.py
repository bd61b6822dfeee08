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

The package, top down: `run` (the loop) uses `batching` (texts per step), `model` (model, optimizer,
loss), `accelerator` (precision, process checks) and `run_folder` (lock, state, checkpoints, saved
models); `config` holds the config and result. torch, transformers, accelerate and peft are imported
inside functions, so importing this package (for `FinetuneConfig`) stays instant.
"""
from training.finetune.batching import measure_batch_tokens
from training.finetune.config import (
    AUTO_MAX_TOKENS,
    CHECKPOINT_MARKER,
    RESUMABLE_CHANGES,
    FinetuneConfig,
    FinetuneError,
    FinetuneResult,
    config_hash,
    default_run_name,
)
from training.finetune.model import loss_matmul_dtype, training_loss
from training.finetune.run import finetune

__all__ = [
    "AUTO_MAX_TOKENS", "CHECKPOINT_MARKER", "RESUMABLE_CHANGES", "FinetuneConfig", "FinetuneError", "FinetuneResult",
    "config_hash", "default_run_name", "finetune", "loss_matmul_dtype", "measure_batch_tokens", "training_loss",
]
