"""Options several commands share, the group class that lists commands in pipeline order, and how a
command gets its Pipeline.

Defaults come from the stages' config dataclasses, so `--help` shows what the library does; they are
read from the configs' source (defaults.py), so neither `--help` nor a wrong option imports a stage.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from producers.cli.defaults import config_defaults, module_constant

if TYPE_CHECKING:
    from producers.enrich.options import LLMOptions
    from producers.pipeline import Pipeline

DEFAULT_MODEL = module_constant("producers.shared.models", "DEFAULT_MODEL")
VALIDATE = config_defaults("validation.run", "ValidateConfig")
TEXT = config_defaults("producers.intents.config", "TextConfig")


class TokensOrAuto(click.ParamType):
    """A token budget of at least `minimum`, or `auto` (sized to the GPU's free memory)."""

    name = "N|auto"

    def __init__(self, minimum: int):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        if value is None or value == "auto" or isinstance(value, int) and value >= self.minimum:
            return value
        try:
            number = int(str(value).replace("_", ""))
        except ValueError:
            self.fail(f"{value!r} is neither a number of tokens nor 'auto'", param, ctx)
        if number < self.minimum:
            self.fail(f"{number} is below the smallest budget, {self.minimum}", param, ctx)
        return number


class PipelineOrder(click.Group):
    """Lists commands in the order a pipeline runs them (the order they are added), not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


class PipelineRecipe:
    """What the root group knows of the Pipeline (--home, --cache, the log); it is made on first use.

    click runs the group's callback before a subcommand parses its options, and making a Pipeline
    imports every stage: made there, `llm4es embed --help` or a mistyped option would wait seconds.
    """

    def __init__(self, home: Path | None, cache_dir: Path | None, log: Callable[[str], None]):
        self.home, self.cache_dir, self.log = home, cache_dir, log
        self._pipeline: Pipeline | None = None

    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            from producers.pipeline import Pipeline

            self._pipeline = Pipeline.create(self.home, self.cache_dir, log=self.log)
        return self._pipeline


def pass_pipeline(fn):
    """`click.pass_obj` for the Pipeline: made from the root group's recipe when the command runs.
    A caller that invokes a command on its own may give the Pipeline (or a stand-in) as `obj`."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        ctx = click.get_current_context()
        obj = ctx.obj.pipeline() if isinstance(ctx.obj, PipelineRecipe) else ctx.obj
        return ctx.invoke(fn, obj, *args, **kwargs)

    return run


dataset_arg = click.argument("dataset")
mapping_opt = click.option("--mapping", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                           help="YAML file describing your own dataset (see README: 'Describing your own data').")
reject_opt = click.option("--max-reject-share", type=click.FloatRange(0, 1),
                          default=VALIDATE.max_reject_share, show_default=True,
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
    C = config_defaults("producers.sessions.config", "SessionEncoderConfig")
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
    L = config_defaults("producers.enrich.options", "LLMOptions")
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
        click.option("--max-chars", type=click.IntRange(200), default=TEXT.max_chars, show_default=True,
                     help="A session's text in a prompt is cut to this many characters."),
        click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal)."),
    ])


def with_llm(defaults: LLMOptions, llm_backend: str, llm_model: str, endpoint: str | None, concurrency: int,
             timeout_s: float) -> LLMOptions:
    """A command's LLM options over a config's own (its temperature and token limits stay)."""
    from dataclasses import replace

    return replace(defaults, backend=llm_backend, model=llm_model, endpoint=endpoint, concurrency=concurrency,
                   timeout_s=timeout_s)
