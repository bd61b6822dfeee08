"""Getting data in: `datasets`, `fetch`, `synth-clicks`, `ingest`, `validate`."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from producers.cli import printers
from producers.cli.defaults import config_defaults
from producers.cli.errors import handle_errors
from producers.cli.options import DEFAULT_MODEL, VALIDATE, dataset_arg, mapping_opt, pass_pipeline, reject_opt

if TYPE_CHECKING:
    from producers.pipeline import Pipeline

CLICKS = config_defaults("producers.synthetic.clickstream", "ClickstreamConfig")
INGEST = config_defaults("producers.ingest.run", "IngestConfig")


@click.command()
@pass_pipeline
@handle_errors
def datasets(p: Pipeline) -> None:
    """List built-in datasets and what the warehouse holds."""
    from producers.datasets.definition import builtin_names, load_builtin
    from producers.stores.warehouse import ingested_datasets

    present = set()
    if p.home.warehouse_path.exists():
        con = p.home.connect(read_only=True)
        present = set(ingested_datasets(con))
        con.close()
    rows = [(name, "built-in", "yes" if name in present else "", load_builtin(name).description)
            for name in builtin_names()]
    rows += [(name, "mapping", "yes", "") for name in sorted(present - set(builtin_names()))]
    printers.print_datasets(rows)


@click.command()
@click.option("--model", default=None, help=f"Registry name of the model to cache. [default: {DEFAULT_MODEL}]")
@pass_pipeline
@handle_errors
def fetch(p: Pipeline, model: str | None) -> None:
    """Download the default dataset and model into the cache (safe to re-run)."""
    printers.print_fetched(p.fetch(model))


@click.command("synth-clicks")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--visitors", type=click.IntRange(1), default=CLICKS.visitors, show_default=True,
              help="Visitors to generate.")
@click.option("--seed", type=int, default=CLICKS.seed, show_default=True,
              help="Same seed and options: the same files, byte for byte.")
@click.option("--days", type=click.IntRange(1, 1000), default=CLICKS.days, show_default=True,
              help="Days from 2024-01-01 that sessions start on.")
@click.option("--app-users", type=click.FloatRange(0, 1), default=None,
              help="Also draw the app side (producers/synthetic/crosschannel.py): this share of people use the app; "
                   "their linked web sessions carry their customer id. [default: web only, as before]")
@click.option("--link-share", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="With --app-users: chance that an app user's web session is linked (logged in).")
@click.option("--tiles", type=click.IntRange(2, 7), default=4, show_default=True, help="With --app-users: K tiles.")
@click.option("--conversion-days", type=click.IntRange(1), default=14, show_default=True,
              help="With --app-users: a visit converts when a product is opened within N days.")
@handle_errors
def synth_clicks(out_dir: Path, visitors: int, seed: int, days: int, app_users: float | None, link_share: float,
                 tiles: int, conversion_days: int) -> None:
    """Generate a synthetic bank-website clickstream with planted session intents into OUT_DIR.

    Writes clicks.csv (one row per page view: visitor, session id, time, page type, page, seconds
    on page, search query, device), visitors.csv (the opened_product label, segment, region),
    planted_intents.csv (the true intent of every session: mortgage, credit card, savings and
    investing, loan shopping, account servicing, help and support; kept aside, the dataset never
    reads it) and README.txt (how it was drawn). Then:

    \b
      llm4es ingest bank-clickstream --source OUT_DIR
      llm4es validate bank-clickstream

    Without --source, `ingest bank-clickstream` generates the default set (2,000 visitors, seed 0)
    into the cache.
    """
    from producers.synthetic.clickstream import ClickstreamConfig, write_clickstream

    if app_users is not None:
        from producers.synthetic.crosschannel import synth_command

        lines = synth_command(out_dir, visitors, seed, days, app_users, link_share, tiles, conversion_days)
        printers.console.print("[green]✓[/] " + "\n".join(lines), soft_wrap=True)
        return
    r = write_clickstream(out_dir, ClickstreamConfig(visitors=visitors, seed=seed, days=days))
    printers.print_synth_clicks(r)


@click.command()
@dataset_arg
@click.option("--source", type=click.Path(exists=True, path_type=Path),
              help="Folder or zip with the dataset's raw files. [default: the cached copy, where one exists]")
@mapping_opt
@reject_opt
@click.option("--force", is_flag=True, help="Re-ingest even if this exact source was already ingested.")
@click.option("--max-line-size", type=click.IntRange(1024), default=INGEST.max_line_size,
              help="Longest CSV line accepted, in bytes (a longer line is a rejected row). [default: DuckDB's 2000000]")
@click.option("--allow-shrink", is_flag=True,
              help="Replace the data even when events or users drop by more than half against the last ingest "
                   "(or to none).")
@click.option("--append", is_flag=True,
              help="Add the new events in --source to the stored ones (deduplicated by the event key) instead of "
                   "replacing them.")
@pass_pipeline
@handle_errors
def ingest(p: Pipeline, dataset: str, source: Path | None, mapping: Path | None, max_reject_share: float,
           force: bool, max_line_size: int | None, allow_shrink: bool, append: bool) -> None:
    """Load DATASET's raw files into the warehouse (atomic: all tables or none).

    DATASET is a built-in name (see `llm4es datasets`) or, with --mapping, the name your
    mapping file declares. Malformed rows go to the `rejects` table with a reason.
    With --append, only events not stored yet are added, and the delta is logged.
    """
    t0 = time.perf_counter()
    if append:
        if source is None or force or allow_shrink:
            raise click.UsageError("--append needs --source NEW_FILES and takes neither --force nor --allow-shrink")
        printers.print_append(p.append(dataset, source, mapping, max_reject_share, max_line_size),
                              time.perf_counter() - t0)
        return
    r = p.ingest(dataset, source, mapping, max_reject_share, force, max_line_size=max_line_size,
                 allow_shrink=allow_shrink)
    printers.print_ingest(r, time.perf_counter() - t0)


@click.command()
@dataset_arg
@reject_opt
@click.option("--chunk-rows", type=click.IntRange(1000), default=VALIDATE.chunk_rows, show_default=True,
              help="Events validated per chunk (chunks hold whole users).")
@click.option("--no-data-docs", is_flag=True, help="Skip writing GX's HTML Data Docs.")
@click.option("--delta", is_flag=True,
              help="After `ingest --append`: check only the users it touched (their events and rows), when the "
                   "data before it passed; else every row.")
@pass_pipeline
@handle_errors
def validate(p: Pipeline, dataset: str, max_reject_share: float, chunk_rows: int, no_data_docs: bool,
             delta: bool) -> None:
    """Run DATASET's data-quality checks (Great Expectations) on the warehouse.

    Prints a table of checks, writes a JSON result and HTML Data Docs under
    reports/validation/, and exits 1 if any check fails. Later stages refuse to run on a
    dataset whose last validation failed.
    """
    report = p.validate(dataset, max_reject_share, chunk_rows, not no_data_docs, delta)
    printers.print_validation(report)
    if not report.success:
        sys.exit(1)
