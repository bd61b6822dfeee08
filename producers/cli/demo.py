"""`llm4es demo`: the whole pipeline on the built-in dataset (the plan and loop live in producers/demo.py)."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from producers.cli import printers
from producers.cli.errors import handle_errors
from producers.cli.options import pass_pipeline

if TYPE_CHECKING:
    from producers.pipeline import Pipeline


@click.command()
@click.option("--dataset", default="movielens-100k", show_default=True)
@click.option("--hardware", type=click.Choice(["auto", "gpu", "cpu-bf16", "cpu"]), default="auto", show_default=True,
              help="Size the LLM stages for this machine class (auto: detect).")
@pass_pipeline
@handle_errors
def demo(p: Pipeline, dataset: str, hardware: str) -> None:
    """The whole pipeline end to end on the built-in dataset, then the results table and one online read.

    ingest -> validate -> serialize -> enrich (7 templates) -> aggregate -> fine-tune -> embed ->
    CoLES -> publish (Feast) -> materialize (SQLite) -> evaluate (LightGBM). On a CPU the LLM stages
    are cut to fit about 20 minutes on 2 cores (the output says how); on a GPU they run as in the
    paper. Stages that find their work done (ingest, fine-tuning and CoLES runs) reuse it.
    """
    from producers import demo as demo_run  # imports the training configs: only when the demo runs

    plan = demo_run.plan(demo_run.detect_hardware() if hardware == "auto" else hardware)
    result = demo_run.run_demo(p, dataset, plan, printers.DemoPrinter())
    if not result.validated:
        sys.exit(1)
