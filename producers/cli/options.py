"""Options several commands share, and the group class that lists commands in pipeline order.

Defaults come from the stages' config dataclasses, so `--help` shows what the library does.
"""
from __future__ import annotations

from pathlib import Path

import click

from producers.enrich.options import LLMOptions
from producers.intents.config import TextConfig
from producers.sessions.config import SessionEncoderConfig
from producers.shared.models import DEFAULT_MODEL
from validation.run import ValidateConfig


class PipelineOrder(click.Group):
    """Lists commands in the order a pipeline runs them (the order they are added), not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


dataset_arg = click.argument("dataset")
mapping_opt = click.option("--mapping", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                           help="YAML file describing your own dataset (see README: 'Describing your own data').")
reject_opt = click.option("--max-reject-share", type=click.FloatRange(0, 1),
                          default=ValidateConfig.max_reject_share, show_default=True,
                          help="Largest share of malformed rows per file before the run fails.")
force_opt = click.option("--force", is_flag=True,
                         help="Run even though the dataset has not passed validation since it was ingested.")
model_opt = click.option("--model", default=DEFAULT_MODEL, show_default=True,
                         help="Registry name, local Hugging Face folder or hub id (its tokenizer counts tokens).")


def _apply(fn, options):
    for option in reversed(options):
        fn = option(fn)
    return fn


def encoder_options(fn):
    """`sessions train` and `sessions embed` take the same encoder options (the run is keyed by them)."""
    C = SessionEncoderConfig
    return _apply(fn, [
        click.option("--epochs", type=click.IntRange(1), default=C.epochs, show_default=True,
                     help="Training epochs; asking a finished run for more continues it."),
        click.option("--batch-size", type=click.IntRange(2), default=C.batch_size, show_default=True,
                     help="Sessions per batch (the others in a batch are the contrastive negatives)."),
        click.option("--lr", type=click.FloatRange(0, min_open=True), default=C.lr, show_default=True),
        click.option("--d-model", type=click.IntRange(8), default=C.d_model, show_default=True,
                     help="Transformer width = the embedding's dimension."),
        click.option("--layers", "n_layers", type=click.IntRange(1), default=C.n_layers, show_default=True),
        click.option("--max-events", type=click.IntRange(2), default=C.max_events, show_default=True,
                     help="A longer session keeps its last N events."),
        click.option("--seed", type=int, default=C.seed, show_default=True),
        click.option("--device", default=C.device, show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--threads", type=click.IntRange(1), default=C.threads, show_default=True,
                     help="torch CPU threads (1 is fastest for this small model on a busy CPU)."),
        force_opt,
    ])


def llm_options(fn):
    """The intent commands' LLM: back end, model, endpoint, and how much of a session a prompt shows."""
    L = LLMOptions
    return _apply(fn, [
        click.option("--llm-backend", type=click.Choice(["local", "openai", "lexical"]), default=L.backend,
                     show_default=True,
                     help="local: a transformers model on this machine; openai: an OpenAI-compatible server; "
                          "lexical (label only): no LLM, the label whose description shares the most words "
                          "with the session, a free baseline."),
        click.option("--llm-model", default=L.model, show_default=True,
                     help="local: registry name, folder or hub id; openai: the served model's name."),
        click.option("--endpoint", default=L.endpoint,
                     help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1."),
        click.option("--concurrency", type=click.IntRange(1), default=L.concurrency, show_default=True,
                     help="Requests in flight (openai)."),
        click.option("--timeout", "timeout_s", type=click.FloatRange(1), default=L.timeout_s, show_default=True,
                     help="Seconds per attempt of a request (openai)."),
        click.option("--max-chars", type=click.IntRange(200), default=TextConfig.max_chars, show_default=True,
                     help="A session's text in a prompt is cut to this many characters."),
        click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal)."),
    ])


def with_llm(defaults: LLMOptions, llm_backend: str, llm_model: str, endpoint: str | None, concurrency: int,
             timeout_s: float) -> LLMOptions:
    """A command's LLM options over a config's own (its temperature and token limits stay)."""
    from dataclasses import replace

    return replace(defaults, backend=llm_backend, model=llm_model, endpoint=endpoint, concurrency=concurrency,
                   timeout_s=timeout_s)
