"""`llm4es`: one thin command per pipeline stage.

Each command parses its typed options (defaults read from the stage's config dataclass), makes
one call on the `Pipeline` facade and hands the result to a printer (printers.py). `--help` and
option errors import no stage: defaults are read from the configs' source (defaults.py), the
Pipeline is made when a command runs (`pass_pipeline`), and a stage's classes are imported in the
command's body (tests/cli/test_help_imports.py checks it). Domain errors
(`producers.errors.Llm4esError`) become a readable message and their exit code in one place
(errors.py). Commands live in one module per group: data.py (datasets, fetch, synth-clicks,
ingest, validate), texts.py (serialize, enrich), features.py (aggregate, coles), llm.py
(finetune, embed, evaluate), sessions.py, intents.py, serving.py (publish), demo.py.

To add a command: write it in its group's module with `@click.command()` and `@pass_pipeline`
(stage modules imported inside its body) and add it to `COMMANDS` below, where it belongs in the
pipeline (`llm4es --help` lists them in this order).
"""
from __future__ import annotations

from pathlib import Path

import click

from producers.cli import (
    data,
    demo,
    features,
    intents,
    llm,
    printers,
    serving,
    sessions,
    texts,
)
from producers.cli.options import PipelineOrder, PipelineRecipe

HELP = """Turn raw user event histories into user embeddings served from a feature store.

\b
Typical run on the built-in MovieLens-100k dataset:
  llm4es ingest movielens-100k      load the raw files into the DuckDB warehouse
  llm4es validate movielens-100k    run the data-quality gate (Great Expectations)
  llm4es demo                       all of the above, with a summary

Data lives under --home (default: $LLM4ES_HOME or the current directory) in
data/warehouse.duckdb; reports under reports/. Downloads (default model and dataset)
are cached under --cache (default: $LLM4ES_CACHE or ~/.cache/llm4es).
"""


@click.group(cls=PipelineOrder, help=HELP,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="LLM4ES_HOME",
              help="Where data/ and reports/ live. [default: $LLM4ES_HOME or .]")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), envvar="LLM4ES_CACHE",
              help="Download cache. [default: $LLM4ES_CACHE or ~/.cache/llm4es]")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, cache_dir: Path | None) -> None:
    def log(msg: str) -> None:
        from producers.redact import redact_text

        # Progress lines may quote an endpoint URL: its credentials are never printed.
        printers.err_console.print(f"[dim]· {redact_text(msg)}[/]")

    # Made when a command runs, not here: `llm4es CMD --help` must not import the stages (options.py).
    ctx.obj = PipelineRecipe(home, cache_dir, log)


# Every command, registered here once, in the order a pipeline runs them.
COMMANDS: list[click.Command] = [
    data.datasets, data.fetch, data.synth_clicks, data.ingest, data.validate,
    texts.serialize, features.aggregate, texts.enrich,
    llm.finetune, llm.embed, features.coles,
    sessions.sessions, intents.intents,
    serving.publish, serving.refresh, llm.evaluate, llm.evaluate_crosschannel,
    demo.demo,
]
for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="llm4es")
