"""The LLM stages and the downstream evaluation: `finetune`, `embed`, `evaluate`."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import click

from producers.cli import printers
from producers.cli.defaults import config_defaults, module_constant
from producers.cli.errors import handle_errors
from producers.cli.options import TokensOrAuto, dataset_arg, force_opt, model_opt, pass_pipeline

if TYPE_CHECKING:
    from producers.pipeline import Pipeline
    from training.evaluate import FusionConfig

F = config_defaults("training.finetune.config", "FinetuneConfig")
M = config_defaults("training.embed.config", "EmbedConfig")
V = config_defaults("training.evaluate.run", "EvaluateConfig")
AUTO_MAX_TOKENS = module_constant("training.finetune.config", "AUTO_MAX_TOKENS")
EMBED_AUTO_MAX_TOKENS = module_constant("training.embed.config", "AUTO_MAX_TOKENS")
EMBED_CPU_BATCH_TOKENS = module_constant("training.embed.config", "CPU_BATCH_TOKENS")


@click.command()
@dataset_arg
@model_opt
@click.option("--mixture", default=F.mixture, show_default=True,
              help="Texts to train on, KIND:N,... over serialized/template/llm (the paper's best: template:7).")
@click.option("--epochs", type=click.IntRange(1), default=F.epochs, show_default=True)
@click.option("--max-steps", type=click.IntRange(1), default=F.max_steps, help="Stop after this many optimizer steps.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=F.lr, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=F.batch_size,
              help="Texts per device per step (given, it replaces --batch-tokens auto). Default: what "
                   "--batch-tokens chooses, one text a step on a CPU.")
@click.option("--grad-accum", type=click.IntRange(1), default=F.grad_accum, show_default=True)
@click.option("--batch-tokens", type=TokensOrAuto(16), default=F.batch_tokens, show_default=True,
              help="Token budget per device and step: as many similar-length texts as fit rows x longest <= N. "
                   "auto: on a GPU, the largest budget its free memory holds for this model and these options "
                   f"(measured by a short probe, whole rows of --max-length, at most {AUTO_MAX_TOKENS:,}; recorded "
                   "in the run's config.json); on a CPU, one text a step.")
@click.option("--max-length", type=click.IntRange(16), default=F.max_length, show_default=True)
@click.option("--packing", is_flag=True, help="Pack texts into max-length rows (attention never crosses texts).")
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--trainable-layers", type=click.IntRange(1), default=F.trainable_layers,
              help="Train only the top N blocks (CPU-friendly). Default: full fine-tuning, as in the paper.")
@click.option("--lora-r", type=click.IntRange(1), default=F.lora_r,
              help="LoRA rank (peft); the paper found LoRA worse.")
@click.option("--save-every-steps", type=click.IntRange(1), default=F.save_every_steps,
              help="Checkpoint every N steps too.")
@click.option("--seed", type=int, default=F.seed, show_default=True)
@click.option("--run-name", default=F.run_name, help="Folder under runs/<dataset>/; re-running a name resumes it.")
@click.option("--device", default=F.device, show_default=True,
              help="auto (the GPU when there is one; LLM4ES_DEVICE overrides), cpu, cuda, or cuda:N in a "
                   "single process (a launched job: each process its LOCAL_RANK's GPU).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (GPU; compiling takes a minute).")
@click.option("--loss-dtype", type=click.Choice(["float32", "autocast"]), default=F.loss_dtype, show_default=True,
              help="The LM head's matmuls in the chunked loss: float32 (TF32 on a GPU) or the autocast dtype "
                   "(bf16 on a GPU; the log-sum-exp stays float32). No effect on the CPU's float32 runs.")
@force_opt
@pass_pipeline
@handle_errors
def finetune(p: Pipeline, dataset: str, model: str, mixture: str, epochs: int, max_steps: int | None, lr: float,
             batch_size: int | None, grad_accum: int, batch_tokens: int | str | None, max_length: int, packing: bool,
             gradient_checkpointing: bool, trainable_layers: int | None, lora_r: int | None,
             save_every_steps: int | None, seed: int, run_name: str | None, device: str, compile_: bool,
             loss_dtype: str, force: bool) -> None:
    """Fine-tune a causal LLM on DATASET's texts with the next-token loss (the GPU job).

    Runs through accelerate: CPU, one GPU, or several with `accelerate launch -m producers.cli
    finetune ...`; bf16 autocast on a GPU with bf16 tensor cores (A100, L4, H100 ...), float32 on
    older GPUs (V100, T4) and the CPU. A checkpoint is saved at every epoch end (and every
    --save-every-steps); re-running the same --run-name resumes from the last one. Each epoch's
    model goes to runs/<dataset>/<run>/models/epoch-E for `llm4es embed`.
    """
    from training.finetune import FinetuneConfig

    config = FinetuneConfig(model=model, mixture=mixture, epochs=epochs, max_steps=max_steps, lr=lr,
                            batch_size=batch_size, grad_accum=grad_accum, batch_tokens=batch_tokens,
                            max_length=max_length, packing=packing,
                            gradient_checkpointing=gradient_checkpointing, trainable_layers=trainable_layers,
                            lora_r=lora_r, save_every_steps=save_every_steps, seed=seed, run_name=run_name,
                            device=device, compile=compile_, loss_dtype=loss_dtype, force=force)
    r = p.finetune(dataset, config)
    if _main_process():
        printers.print_finetune(r)


@click.command()
@dataset_arg
@model_opt
@click.option("--checkpoint", default=M.checkpoint,
              help="A model folder (runs/<dataset>/<run>/models/epoch-E or step-N), or a run folder for every "
                   "model the run saved. "
                   "Default: the base model (LLM4ES without fine-tuning).")
@click.option("--kind", type=click.Choice(["serialized", "template", "llm"]), default=M.kind,
              show_default=True, help="Which texts to embed (variant 0).")
@click.option("--layers", default=M.layers, show_default=True,
              help="Hidden states averaged: '9:' (the authors' code: index 9 to the last), '-4:', 'a:b', 'all', "
                   "'last' or one index.")
@click.option("--max-length", type=click.IntRange(16), default=M.max_length, show_default=True,
              help="Tokens per text; longer texts keep their end (the most recent events), see --truncation-side.")
@click.option("--truncation-side", type=click.Choice(["left", "right"]), default=M.truncation_side,
              show_default=True,
              help="Which end a long text loses: left keeps its last tokens (the most recent events), right its first.")
@click.option("--pooling", default=M.pooling, show_default=True,
              help="Tokens averaged: 'mean' (every token), 'last' (the last token) or 'lines:K' (the last K lines, "
                   "i.e. events). Measured in benchmarks/embed_choices.py (RESULTS.md).")
@click.option("--batch-tokens", type=TokensOrAuto(256), default=M.batch_tokens, show_default=True,
              help="Padded tokens per batch (texts sorted by length). auto: on a GPU, the largest batch its free "
                   f"memory holds (measured by a short probe, at most {EMBED_AUTO_MAX_TOKENS:,}); on a CPU "
                   f"{EMBED_CPU_BATCH_TOKENS:,}.")
@click.option("--limit-users", type=click.IntRange(1), default=M.limit_users, help="Only the first N users.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=M.dtype,
              show_default=True,
              help="auto: float32 on CPU (exact batch invariance), bfloat16 on a GPU with bf16 tensor cores (A100, "
                   "L4, H100 ...), float16 on older GPUs (V100, T4). bfloat16 is ~2-3x faster on CPUs with "
                   "AMX/avx512_bf16, vectors then agree to ~1e-3.")
@click.option("--quantize", type=click.Choice(["int8"]), default=M.quantize,
              help="CPU only, float32: int8 dynamic quantization of the linear layers, for CPUs without bf16 "
                   "(see benchmarks/RESULTS.md for its speed and how close the vectors stay).")
@click.option("--device", default=M.device, show_default=True,
              help="auto (each process's GPU when there is one; LLM4ES_DEVICE overrides), cpu, cuda or cuda:N. "
                   "Several processes: torchrun --nproc-per-node N -m producers.cli embed ...")
@force_opt
@pass_pipeline
@handle_errors
def embed(p: Pipeline, dataset: str, model: str, checkpoint: str | None, kind: str, layers: str, max_length: int,
          truncation_side: str, pooling: str, batch_tokens: int | str, limit_users: int | None, dtype: str,
          quantize: str | None, device: str, force: bool) -> None:
    """One vector per user: hidden states averaged over --layers, mean-pooled over the text's tokens.

    Batches are sorted by length and written as they finish, so a killed run resumes where it
    stopped. Output: the embeddings table and a Parquet file per (model, checkpoint, layers,
    kind) under data/<schema>/, with what produced them.
    """
    from training.embed import EmbedConfig

    r = p.embed(dataset, EmbedConfig(model=model, checkpoint=checkpoint, kind=kind, layers=layers,
                                     max_length=max_length, truncation_side=truncation_side, pooling=pooling,
                                     batch_tokens=batch_tokens, limit_users=limit_users, dtype=dtype,
                                     quantize=quantize, device=device, force=force))
    if _main_process():
        printers.print_embed(r)


def _main_process() -> bool:
    """Process 0 of a launched job (torchrun, accelerate launch), or a plain run: it reports for the job."""
    from training.hardware import Ranks

    return Ranks.from_env().main


@click.command()
@dataset_arg
@click.option("--target", "targets", multiple=True, help="A label to predict (repeatable). Default: every label.")
@click.option("--features", default=None,
              help="Comma-separated feature sets: agg, coles, llm4es, sessions (session-embedding rollup), intents "
                   "(intent shares) or a published view name; '+' concatenates (the paper's ensembles). "
                   "[default: those of agg,coles,llm4es,coles+llm4es,coles+agg that are published; the others are "
                   "named as missing]")
@click.option("--protocol", "protocols", type=click.Choice(["paper", "cv"]), multiple=True,
              help="paper: 10% test set, 5 fold models; cv: repeated stratified k-fold over all users. "
                   "[default: both]")
@click.option("--folds", type=click.IntRange(2), default=V.folds, show_default=True)
@click.option("--cv-repeats", type=click.IntRange(1), default=V.cv_repeats, show_default=True)
@click.option("--seed", type=int, default=V.seed, show_default=True)
@click.option("--label-time", type=click.DateTime(), default=V.label_time,
              help="When the labels are known (features must be older). Default: the dataset's last event.")
@click.option("--no-epoch-selection", is_flag=True, help="Use the default LLM4ES view, not the best epoch.")
@click.option("--no-linear-probe", is_flag=True,
              help="LightGBM only: skip the second reader (standardized logistic regression / ridge), "
                   "reported as '<set> (linear)' rows.")
@click.option("--fusion", "fusions", type=click.Choice(["stack", "mean", "none"]), multiple=True,
              help="Late fusion rows for each ensemble (a+b): stack (non-negative weights per member and reader, "
                   "fitted on inner out-of-fold predictions), mean (equal weights, the better reader per member), "
                   "none (concatenation only). Repeatable. [default: stack]")
@pass_pipeline
@handle_errors
def evaluate(p: Pipeline, dataset: str, targets: tuple[str, ...], features: str | None, protocols: tuple[str, ...],
             folds: int, cv_repeats: int, seed: int, label_time: datetime | None, no_epoch_selection: bool,
             no_linear_probe: bool, fusions: tuple[str, ...]) -> None:
    """Downstream LightGBM and a linear probe on features fetched from Feast, mean ± std per feature set.

    Needs `llm4es publish DATASET` first. Metrics: ROC-AUC and accuracy (binary), accuracy
    (multiclass), MAE (regression). With several epochs of a fine-tuning run published, the epoch
    is picked by validation score on the training folds, never the test set. Writes this call's
    report to reports/evaluate/<dataset>/runs/<UTC time>/ and updates the latest report
    reports/evaluate/<dataset>/evaluation.{json,md,png}: its rows for the feature sets evaluated now are
    replaced, the others kept (when the folds, seed and targets are the same; otherwise it starts anew).
    """
    chosen = tuple(f.strip() for f in (features or "").split(",") if f.strip())
    if features is not None and not chosen:
        raise click.BadParameter("give at least one feature set", param_hint="--features")
    from training.evaluate import EvaluateConfig

    config = EvaluateConfig(targets=targets, features=chosen, protocols=protocols or EvaluateConfig.protocols,
                            folds=folds, cv_repeats=cv_repeats, seed=seed,
                            label_time=label_time.replace(tzinfo=timezone.utc) if label_time else None,
                            select_epoch=not no_epoch_selection, linear_probe=not no_linear_probe,
                            fusion=_fusion(fusions))
    printers.print_evaluation(p.evaluate(dataset, config))


def _fusion(chosen: tuple[str, ...]) -> FusionConfig:
    from training.evaluate import FusionConfig

    if not chosen:
        return FusionConfig()
    if "none" in chosen and len(chosen) > 1:
        raise click.BadParameter("none cannot be combined with stack or mean", param_hint="--fusion")
    return replace(FusionConfig(), methods=tuple(dict.fromkeys(m for m in chosen if m != "none")))


@click.command("evaluate-crosschannel")
@dataset_arg
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="The `synth-clicks --app-users` folder (app_visits.csv, app_tiles.csv).")
@click.option("--folds", type=click.IntRange(2), default=5, show_default=True)
@pass_pipeline
@handle_errors
def evaluate_crosschannel(p: Pipeline, dataset: str, source: Path, folds: int) -> None:
    """Do web sessions help the app? Tile ranking and conversion with web features read from Feast at each
    app visit's time (training/evaluate/crosschannel.py); report under reports/crosschannel/."""
    from producers.synthetic.crosschannel import require_web_side_from
    from training.evaluate.crosschannel import evaluate_command

    require_web_side_from(p.home, dataset, source)
    for line in evaluate_command(p.home, dataset, source, folds, log=p.log):
        printers.console.print(line, soft_wrap=True, markup=False)
