"""`llm4es`: one thin command per pipeline stage.

Each command parses its options, makes one call on the `Pipeline` facade and prints the result.
Domain errors become a readable message and exit code 1 in one place (`_errors`).
"""
from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from producers.pipeline import Pipeline

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

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


def _errors(fn):
    """Map every domain error to a short message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from producers.stores.cache import FetchError
        from producers.datasets.definition import DefinitionError
        from producers.ingest import IngestError
        from producers.ingest.source_files import SourceError
        from producers.shared.mixture import MixtureError
        from training.embed import EmbedError
        from producers.coles.config import ColesError
        from producers.sessions.config import SessionsError
        from producers.intents.config import IntentsError
        from producers.publish import PublishError
        from training.evaluate.run import EvaluateError
        from training.finetune import FinetuneError
        from producers.serialize.run import SerializeError
        from producers.stores.warehouse import WarehouseError
        from producers.enrich.base import EnrichError
        from producers.shared.redact import redact_text
        from validation.gate import ValidationGateError

        import duckdb

        def fail(message: str) -> None:
            # Messages may quote an endpoint URL: never print its credentials.
            err_console.print(f"[bold red]error:[/] {redact_text(message)}", soft_wrap=True)
            sys.exit(1)

        try:
            return fn(*args, **kwargs)
        except (DefinitionError, IngestError, SourceError, FetchError, WarehouseError, ValidationGateError,
                SerializeError, MixtureError, FinetuneError, EmbedError, EvaluateError,
                PublishError, ColesError, SessionsError, IntentsError, EnrichError) as e:
            fail(str(e))
        except Exception as e:
            if (full := _disk_full(e)) is not None:
                home = args[0].home.root if args and hasattr(args[0], "home") else "the llm4es home"
                detail = str(full).strip().splitlines()[0] if str(full).strip() else repr(full)
                fail(f"no space left on the device holding {home} (data, reports and temporary files are "
                     f"written there): free some space or point --home / LLM4ES_HOME elsewhere, then run the "
                     f"command again. Tables and files are written to a staging copy first, so the previous "
                     f"results are intact. ({type(full).__name__}: {detail})")
            if isinstance(e, (duckdb.IOException, duckdb.ConnectionException)):
                if "lock" in str(e).lower():  # a connection opened without Home.connect
                    from producers.stores.warehouse import locked_message

                    fail(locked_message(_warehouse_of(args), str(e)))
                fail(f"cannot open the warehouse: {e}")
            raise

    return wrapper


def _disk_full(e: BaseException) -> BaseException | None:
    """The error in `e`'s chain that says the disk is full: ENOSPC from Python, or DuckDB's
    'No space left on device' (an IOException, or another error quoting it); else None."""
    import errno

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or "no space left on device" in str(e).lower():
            return e
        e = e.__cause__ or e.__context__
    return None


def _warehouse_of(args) -> Path | str:
    """The warehouse path of the command's Pipeline (its first argument), for messages."""
    home = getattr(args[0], "home", None) if args else None
    return home.warehouse_path if home is not None else "warehouse"


class PipelineOrder(click.Group):
    """Lists commands in the order a pipeline runs them, not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=PipelineOrder, help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="LLM4ES_HOME",
              help="Where data/ and reports/ live. [default: $LLM4ES_HOME or .]")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), envvar="LLM4ES_CACHE",
              help="Download cache. [default: $LLM4ES_CACHE or ~/.cache/llm4es]")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, cache_dir: Path | None) -> None:
    from producers.shared.redact import redact_text

    # Progress lines may quote an endpoint URL: its credentials are never printed.
    ctx.obj = Pipeline.create(home, cache_dir, log=lambda msg: err_console.print(f"[dim]· {redact_text(msg)}[/]"))


dataset_arg = click.argument("dataset")
mapping_opt = click.option("--mapping", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                           help="YAML file describing your own dataset (see README: 'Describing your own data').")
reject_opt = click.option("--max-reject-share", type=click.FloatRange(0, 1), default=0.01, show_default=True,
                          help="Largest share of malformed rows per file before the run fails.")


@cli.command()
@click.pass_obj
@_errors
def datasets(p: Pipeline) -> None:
    """List built-in datasets and what the warehouse holds."""
    from producers.datasets.definition import builtin_names, load_builtin
    from producers.stores.warehouse import ingested_datasets

    table = Table("dataset", "kind", "in warehouse", "description")
    present = set()
    if p.home.warehouse_path.exists():
        con = p.home.connect(read_only=True)
        present = set(ingested_datasets(con))
        con.close()
    for name in builtin_names():
        table.add_row(name, "built-in", "yes" if name in present else "", load_builtin(name).description)
    for name in sorted(present - set(builtin_names())):
        table.add_row(name, "mapping", "yes", "")
    console.print(table)


@cli.command()
@click.option("--model", default=None, help="Registry name of the model to cache. [default: smollm2-135m]")
@click.pass_obj
@_errors
def fetch(p: Pipeline, model: str | None) -> None:
    """Download the default dataset and model into the cache (safe to re-run)."""
    for name, path in p.fetch(model).items():
        console.print(f"[green]✓[/] {name}: {path}")


@cli.command("synth-clicks")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--visitors", type=click.IntRange(1), default=2000, show_default=True, help="Visitors to generate.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Same seed and options: the same files, byte for byte.")
@click.option("--days", type=click.IntRange(1, 1000), default=60, show_default=True,
              help="Days from 2024-01-01 that sessions start on.")
def synth_clicks(out_dir: Path, visitors: int, seed: int, days: int) -> None:
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
    from producers.synthetic.clickstream import ClickstreamConfig, ClickstreamError, write_clickstream

    try:
        r = write_clickstream(out_dir, ClickstreamConfig(visitors=visitors, seed=seed, days=days))
    except ClickstreamError as e:
        err_console.print(f"[bold red]error:[/] {e}")
        sys.exit(1)
    intents = ", ".join(f"{name} {n:,}" for name, n in r.sessions_by_intent.items())
    console.print(f"[green]✓[/] {r.out_dir}: {r.n_visitors:,} visitors, {r.n_sessions:,} sessions, {r.n_events:,} "
                  f"clicks in {r.seconds:.1f}s ({r.noise_share:.0%} noise clicks, {r.opened_share:.0%} opened a "
                  f"product)", soft_wrap=True)
    console.print(f"planted intents (sessions): {intents}", soft_wrap=True)
    console.print(f"next: llm4es ingest bank-clickstream --source {r.out_dir}", soft_wrap=True)


@cli.command()
@dataset_arg
@click.option("--source", type=click.Path(exists=True, path_type=Path),
              help="Folder or zip with the dataset's raw files. [default: the cached copy, where one exists]")
@mapping_opt
@reject_opt
@click.option("--force", is_flag=True, help="Re-ingest even if this exact source was already ingested.")
@click.option("--max-line-size", type=click.IntRange(1024), default=None,
              help="Longest CSV line accepted, in bytes (a longer line is a rejected row). [default: DuckDB's 2000000]")
@click.option("--allow-shrink", is_flag=True,
              help="Replace the data even when events or users drop by more than half against the last ingest "
                   "(or to none).")
@click.pass_obj
@_errors
def ingest(p: Pipeline, dataset: str, source: Path | None, mapping: Path | None, max_reject_share: float,
           force: bool, max_line_size: int | None, allow_shrink: bool) -> None:
    """Load DATASET's raw files into the warehouse (atomic: all tables or none).

    DATASET is a built-in name (see `llm4es datasets`) or, with --mapping, the name your
    mapping file declares. Malformed rows go to the `rejects` table with a reason.
    """
    t0 = time.perf_counter()
    r = p.ingest(dataset, source, mapping, max_reject_share, force, max_line_size=max_line_size,
                 allow_shrink=allow_shrink)
    verb = "already ingested" if r.skipped else f"ingested in {time.perf_counter() - t0:.1f}s"
    console.print(f"[green]✓[/] {r.dataset}: {r.n_events:,} events, {r.n_users:,} users, "
                  f"{r.n_rejects:,} rejected rows ({verb}; ingest {r.ingest_id}, data {r.source_hash})")
    table = Table("file", "rows read", "rejected", "share", title="source files", title_justify="left")
    for f in r.files:
        table.add_row(f.file, f"{f.rows_read:,}", f"{f.rows_rejected:,}", f"{f.reject_share:.2%}")
    console.print(table)
    if r.n_rejects:
        console.print(f"rejected rows are in table {r.schema}.rejects (source, row_number, raw_record, reason)")


@cli.command()
@dataset_arg
@reject_opt
@click.option("--chunk-rows", type=click.IntRange(1000), default=2_000_000, show_default=True,
              help="Events validated per chunk (chunks hold whole users).")
@click.option("--no-data-docs", is_flag=True, help="Skip writing GX's HTML Data Docs.")
@click.pass_obj
@_errors
def validate(p: Pipeline, dataset: str, max_reject_share: float, chunk_rows: int, no_data_docs: bool) -> None:
    """Run DATASET's data-quality checks (Great Expectations) on the warehouse.

    Prints a table of checks, writes a JSON result and HTML Data Docs under
    reports/validation/, and exits 1 if any check fails. Later stages refuse to run on a
    dataset whose last validation failed.
    """
    report = p.validate(dataset, max_reject_share, chunk_rows, not no_data_docs)
    print_validation(report)
    if not report.success:
        sys.exit(1)


def print_validation(report) -> None:
    table = Table("", "check", "table", "checked", "failed", "examples", title=f"validation of {report.dataset}",
                  title_justify="left")
    for r in report.results:
        mark = "[green]✓[/]" if r.success else "[red]✗[/]"
        examples = r.error or _examples(r)
        table.add_row(mark, r.check, r.batch, f"{r.checked:,}", f"{r.failed:,}" if r.failed else "", examples)
    console.print(table)
    verdict = "[green]passed[/]" if report.success else f"[red]FAILED[/] ({len(report.failed)} checks)"
    console.print(f"{report.dataset}: {verdict}; result {report.json_path}", soft_wrap=True)
    if report.data_docs:
        console.print(f"Data Docs: {report.data_docs}", soft_wrap=True)


def _examples(r) -> str:
    """Failing values, each with the key of its row where GX gave one: `user_id=13: 5`."""
    def text(v) -> str:
        return "null" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    if r.where:
        parts = []
        for row in r.where:
            key = ", ".join(f"{k}={text(v)}" for k, v in row.items() if k != r.column)
            parts.append(f"{key}: {text(row.get(r.column))}" if r.column in row else key)
        return "; ".join(parts)
    return ", ".join(text(x) for x in r.examples)


force_opt = click.option("--force", is_flag=True,
                         help="Run even though the dataset has not passed validation since it was ingested.")
model_opt = click.option("--model", default="smollm2-135m", show_default=True,
                         help="Registry name, local Hugging Face folder or hub id (its tokenizer counts tokens).")


@cli.command()
@dataset_arg
@model_opt
@click.option("--max-tokens", type=click.IntRange(0), default=2048, show_default=True,
              help="Token budget per user (0: none). The oldest events are dropped first; the header stays.")
@click.option("--time-format", type=click.Choice(["readable", "day-index"]), default="readable", show_default=True,
              help="Dates as the definition displays them, or the paper's raw day index.")
@click.option("--format", "fmt", type=click.Choice(["paper", "compact"]), default="paper", show_default=True,
              help="compact: one line per day, the date once, runs of identical events collapsed with their "
                   "count (about 2x the events per token); paper: one line per event with its full timestamp.")
@force_opt
@click.pass_obj
@_errors
def serialize(p: Pipeline, dataset: str, model: str, max_tokens: int, time_format: str, fmt: str,
              force: bool) -> None:
    """Write each user's history as text (the `serialized` rows of the texts table).

    A header line names the fields, then the events in time order, values separated by ", ",
    codes replaced by their descriptions: --format compact writes one line per day
    (`1997-11-03: Evil Dead II, 1987, Action, Horror, 3; Four Rooms, 1995, Thriller, 4`) and
    collapses runs of identical consecutive events (`<event> x12`, with the first and last
    date when the run spans days); --format paper writes one line per event with its timestamp.
    Also written to data/<schema>/texts.parquet.
    """
    t0 = time.perf_counter()
    r = p.serialize(dataset, model, max_tokens, time_format, force, fmt)
    console.print(f"[green]✓[/] {r.dataset}: {r.n_texts:,} texts from {r.n_events:,} of {r.n_events_total:,} events "
                  f"in {time.perf_counter() - t0:.1f}s; {r.n_cut:,} users cut to the {max_tokens}-token budget "
                  f"(largest text {r.max_tokens_seen:,} tokens)")
    console.print(f"header: {r.header}", soft_wrap=True)
    console.print(f"texts: table texts, {r.parquet}", soft_wrap=True)


@cli.command()
@dataset_arg
@click.option("--top-n", type=click.IntRange(0), default=20, show_default=True,
              help="Most frequent values of each categorical (or multi-valued / low-cardinality text) field "
                   "that get their own columns.")
@click.option("--as-of", type=click.DateTime(), default=None,
              help="Snapshot time (UTC, e.g. 1998-03-01T00:00:00): later events are ignored. "
                   "[default: the dataset's last event]")
@click.option("--amount-field", default=None,
              help="Numeric field summed per category. [default: a numeric field named `amount`, if any]")
@force_opt
@click.pass_obj
@_errors
def aggregate(p: Pipeline, dataset: str, top_n: int, as_of, amount_field: str | None, force: bool) -> None:
    """Compute aggregate features per user (the paper's "agg" baseline) in SQL.

    One row per user with events up to --as-of, stamped feature_timestamp = as-of:
    activity (n_events, active_days, span_days, events_per_active_day, recency_days);
    count, mean, std, min, max and sum of each numeric field; for each categorical field (and
    each text field that is multi-valued, split as the dataset's summary splits it, or has at
    most 50 distinct values), the number of distinct values and, for its --top-n most frequent
    values, the user's event count and share, amount sum, and mean of every numeric field in
    each (mean rating per genre). Free text (titles) is not used. Written to table
    agg_features (what produced it: agg_features_meta) and data/<schema>/agg_features.parquet.
    """
    t0 = time.perf_counter()
    r = p.aggregate(dataset, top_n, as_of, amount_field, force)
    console.print(f"[green]✓[/] {r.dataset}: {r.n_users:,} rows (users), {r.n_features} features as of {r.as_of} "
                  f"in {time.perf_counter() - t0:.1f}s", soft_wrap=True)
    console.print(f"features: table {r.table}, {r.parquet_path}", soft_wrap=True)


@cli.command()
@dataset_arg
@click.option("--enricher", type=click.Choice(["template", "llm"]), default="template", show_default=True,
              help="template: deterministic formats (JSON, tables, YAML, XML, CSV, prose) with paraphrased names; "
                   "llm: an instruct model rewrites each history (the paper's Table 1 prompt).")
@click.option("--variants", type=click.IntRange(1, 50), default=7, show_default=True,
              help="Rewrites per user (the paper found 7 mixed formats best).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit-users", type=click.IntRange(1), default=None, help="Only the first N users (to try the LLM).")
@click.option("--tokenizer", "tokenizer", default="smollm2-135m", show_default=True,
              help="Model whose tokenizer counts the rewrites' tokens.")
@click.option("--llm-backend", type=click.Choice(["local", "openai"]), default="local", show_default=True,
              help="local: a transformers model on this machine; openai: any OpenAI-compatible server "
                   "(vLLM, llama.cpp server, Ollama).")
@click.option("--llm-model", default="smollm2-135m", show_default=True,
              help="local: registry name, folder or hub id; openai: the served model's name.")
@click.option("--endpoint", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")
@click.option("--concurrency", type=click.IntRange(1), default=4, show_default=True, help="Requests in flight (openai).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(1), default=30.0, show_default=True,
              help="Seconds per attempt of a request (openai).")
@click.option("--retries", type=click.IntRange(0), default=2, show_default=True,
              help="Further attempts of a failed request, with exponential backoff (openai).")
@click.option("--max-fallback-share", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="llm: fail, writing nothing, when more than this share of the texts would be template "
                   "fallbacks (refused or failed LLM outputs); 1 keeps them all, marked fallback = true.")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True, help="Prompts per batch (local).")
@click.option("--temperature", type=click.FloatRange(0), default=0.8, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1), default=0.95, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(16), default=1024, show_default=True)
@force_opt
@click.pass_obj
@_errors
def enrich(p: Pipeline, dataset: str, enricher: str, variants: int, seed: int, limit_users: int | None,
           tokenizer: str, llm_backend: str, llm_model: str, endpoint: str | None, concurrency: int,
           timeout_s: float, retries: int, max_fallback_share: float, batch_size: int, temperature: float,
           top_p: float, max_new_tokens: int, force: bool) -> None:
    """Rewrite every user's serialized history into VARIANTS diverse texts (needs `serialize`).

    LLM outputs are cached per (user, variant, model, prompt), so an interrupted run resumes
    where it stopped; outputs that fail the checks (empty, too short or long, an echo of the
    input) or whose request failed are replaced by a template rewrite, counted and marked
    (`fallback` in the texts table); past --max-fallback-share the run fails and writes nothing.
    """
    from producers.enrich.options import LLMOptions
    from producers.enrich.run import EnrichConfig

    if llm_backend == "openai" and enricher == "llm" and not endpoint:
        raise click.UsageError("--llm-backend openai needs --endpoint")
    llm = LLMOptions(backend=llm_backend, model=llm_model, endpoint=endpoint, concurrency=concurrency,
                     timeout_s=timeout_s, retries=retries, batch_size=batch_size, temperature=temperature,
                     top_p=top_p, max_new_tokens=max_new_tokens)
    r = p.enrich(dataset, EnrichConfig(enricher=enricher, variants=variants, seed=seed, limit_users=limit_users,
                                       tokenizer=tokenizer, llm=llm, max_fallback_share=max_fallback_share,
                                       force=force))
    console.print(f"[green]✓[/] {r.dataset}: {r.written:,} {r.enricher} texts for {r.users:,} users "
                  f"x {r.variants} variants in {r.seconds:.1f}s")
    console.print("formats: " + ", ".join(f"{k} {v:,}" for k, v in sorted(r.by_format.items())))
    if r.enricher == "llm":
        refusals = ", ".join(f"{k} {v}" for k, v in sorted(r.refusals.items())) or "none"
        console.print(f"LLM: {r.generated:,} generated, {r.cached:,} from the cache, {r.fallbacks:,} fell back to "
                      f"a template (refused: {refusals})")
        if r.fallbacks:
            err_console.print(f"[bold yellow]warning:[/] {r.fallbacks:,} of {r.users * r.variants:,} llm texts "
                              f"({r.fallback_share:.0%}) are template fallbacks, not LLM output (marked fallback = "
                              f"true in the texts table)" + (f"; first back-end error: {r.first_error}"
                                                             if r.first_error else ""), soft_wrap=True)


@cli.command()
@dataset_arg
@model_opt
@click.option("--mixture", default="template:7", show_default=True,
              help="Texts to train on, KIND:N,... over serialized/template/llm (the paper's best: template:7).")
@click.option("--epochs", type=click.IntRange(1), default=1, show_default=True)
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Stop after this many optimizer steps.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-4, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True, help="Texts per device per step.")
@click.option("--grad-accum", type=click.IntRange(1), default=1, show_default=True)
@click.option("--batch-tokens", type=click.IntRange(16), default=None,
              help="Token budget per device and step: as many similar-length texts as fit rows x longest <= N "
                   "(replaces --batch-size; e.g. 65536 for SmolLM2-135M on an 80 GB GPU).")
@click.option("--max-length", type=click.IntRange(16), default=2048, show_default=True)
@click.option("--packing", is_flag=True, help="Pack texts into max-length rows (attention never crosses texts).")
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--trainable-layers", type=click.IntRange(1), default=None,
              help="Train only the top N blocks (CPU-friendly). Default: full fine-tuning, as in the paper.")
@click.option("--lora-r", type=click.IntRange(1), default=None, help="LoRA rank (peft); the paper found LoRA worse.")
@click.option("--save-every-steps", type=click.IntRange(1), default=None, help="Checkpoint every N steps too.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--run-name", default=None, help="Folder under runs/<dataset>/; re-running a name resumes it.")
@click.option("--device", default="auto", show_default=True,
              help="auto (the GPU when there is one; LLM4ES_DEVICE overrides), cpu or cuda.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (GPU; compiling takes a minute).")
@force_opt
@click.pass_obj
@_errors
def finetune(p: Pipeline, dataset: str, model: str, mixture: str, epochs: int, max_steps: int | None, lr: float,
             batch_size: int, grad_accum: int, batch_tokens: int | None, max_length: int, packing: bool,
             gradient_checkpointing: bool, trainable_layers: int | None, lora_r: int | None, save_every_steps: int | None, seed: int,
             run_name: str | None, device: str, compile_: bool, force: bool) -> None:
    """Fine-tune a causal LLM on DATASET's texts with the next-token loss (the GPU job).

    Runs through accelerate: CPU, one GPU, or several with `accelerate launch -m producers.cli
    finetune ...`; bf16 autocast on GPU. A checkpoint is saved at every epoch end (and every
    --save-every-steps); re-running the same --run-name resumes from the last one. Each epoch's
    model goes to runs/<dataset>/<run>/models/epoch-E for `llm4es embed`.
    """
    from training.finetune import FinetuneConfig

    config = FinetuneConfig(model=model, mixture=mixture, epochs=epochs, max_steps=max_steps, lr=lr,
                            batch_size=batch_size, grad_accum=grad_accum, batch_tokens=batch_tokens,
                            max_length=max_length, packing=packing,
                            gradient_checkpointing=gradient_checkpointing, trainable_layers=trainable_layers,
                            lora_r=lora_r, save_every_steps=save_every_steps, seed=seed, run_name=run_name,
                            device=device, compile=compile_, force=force)
    r = p.finetune(dataset, config)
    from training.finetune import _epochs_text

    mfu = "" if r.mfu is None else f", MFU {r.mfu:.1%}"
    console.print(f"[green]✓[/] {r.dataset}: {r.steps} steps ({_epochs_text(r.steps, r.steps_per_epoch or r.steps)}, "
                  f"{r.epochs_done} complete) on {r.n_texts:,} texts, final loss {r.final_loss:.4f}, "
                  f"{r.tokens_per_second:,.0f} tokens/s{mfu}"
                  f"{f' (resumed from {r.resumed_from})' if r.resumed_from else ''}")
    console.print(f"run: {r.run_dir}", soft_wrap=True)
    for m in r.models:
        console.print(f"model: {m}", soft_wrap=True)


@cli.command()
@dataset_arg
@model_opt
@click.option("--checkpoint", default=None,
              help="A model folder (runs/<dataset>/<run>/models/epoch-E or step-N), or a run folder for every "
                   "model the run saved. "
                   "Default: the base model (LLM4ES without fine-tuning).")
@click.option("--kind", type=click.Choice(["serialized", "template", "llm"]), default="serialized",
              show_default=True, help="Which texts to embed (variant 0).")
@click.option("--layers", default="9:", show_default=True,
              help="Hidden states averaged: '9:' (the authors' code: index 9 to the last), '-4:', 'a:b', 'all', "
                   "'last' or one index.")
@click.option("--max-length", type=click.IntRange(16), default=2048, show_default=True,
              help="Tokens per text; longer texts keep their end (the most recent events), see --truncation-side.")
@click.option("--truncation-side", type=click.Choice(["left", "right"]), default="left", show_default=True,
              help="Which end a long text loses: left keeps its last tokens (the most recent events), right its first.")
@click.option("--pooling", default="mean", show_default=True,
              help="Tokens averaged: 'mean' (every token), 'last' (the last token) or 'lines:K' (the last K lines, "
                   "i.e. events). Measured in benchmarks/embed_choices.py (RESULTS.md).")
@click.option("--batch-tokens", type=click.IntRange(256), default=16384, show_default=True,
              help="Padded tokens per batch (texts sorted by length).")
@click.option("--limit-users", type=click.IntRange(1), default=None, help="Only the first N users.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="auto: bfloat16 on GPU, float32 on CPU (exact batch invariance). bfloat16 is "
                                      "~2-3x faster on CPUs with AMX/avx512_bf16, vectors then agree to ~1e-3.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="CPU only, float32: int8 dynamic quantization of the linear layers, for CPUs without bf16 "
                   "(see benchmarks/RESULTS.md for its speed and how close the vectors stay).")
@click.option("--device", default="auto", show_default=True,
              help="auto (each process's GPU when there is one; LLM4ES_DEVICE overrides), cpu, cuda or cuda:N. "
                   "Several processes: torchrun --nproc-per-node N -m producers.cli embed ...")
@force_opt
@click.pass_obj
@_errors
def embed(p: Pipeline, dataset: str, model: str, checkpoint: str | None, kind: str, layers: str, max_length: int,
          truncation_side: str, pooling: str, batch_tokens: int, limit_users: int | None, dtype: str, quantize: str | None, device: str,
          force: bool) -> None:
    """One vector per user: hidden states averaged over --layers, mean-pooled over the text's tokens.

    Batches are sorted by length and written as they finish, so a killed run resumes where it
    stopped. Output: the embeddings table and a Parquet file per (model, checkpoint, layers,
    kind) under data/<schema>/, with what produced them.
    """
    from training.embed import EmbedConfig

    r = p.embed(dataset, EmbedConfig(model=model, checkpoint=checkpoint, kind=kind, layers=layers,
                                     max_length=max_length, truncation_side=truncation_side, pooling=pooling,
                                     batch_tokens=batch_tokens, limit_users=limit_users, dtype=dtype, quantize=quantize, device=device, force=force))
    if int(os.environ.get("RANK", "0")) != 0:
        return  # process 0 reports for the whole job
    for s in r.sets:
        console.print(f"[green]✓[/] {r.dataset}: {s.n_users:,} vectors of size {s.dim} ({s.checkpoint}, layers "
                      f"{s.layers}, {s.text_kind}); {s.n_computed:,} computed at {s.tokens_per_s:,.0f} tokens/s"
                      f"{f' ({s.compute_tokens_per_s:,.0f} in the model' if s.compute_tokens_per_s else ''}"
                      f"{f', MFU {s.mfu:.1%})' if s.mfu is not None else (')' if s.compute_tokens_per_s else '')}"
                      f"{f', {s.n_resumed:,} resumed' if s.n_resumed else ''}")
        console.print(f"  {s.parquet}", soft_wrap=True)


@cli.command()
@dataset_arg
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True,
              help="Training epochs; asking a finished run for more continues it.")
@click.option("--hidden-size", type=click.IntRange(1), default=256, show_default=True,
              help="GRU hidden size = the embedding's dimension.")
@click.option("--batch-size", type=click.IntRange(2), default=64, show_default=True, help="Users per batch.")
@click.option("--lr", type=float, default=0.002, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--as-of", type=click.DateTime(), default=None,
              help="Only events up to this time (UTC). Default: the dataset's last event.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--max-batches-per-epoch", type=click.IntRange(1), default=100, show_default=True,
              help="Cap on an epoch: bigger datasets see a fresh random sample of users each epoch.")
@click.option("--restart", is_flag=True, help="Train from scratch even if a run with the same settings exists.")
@force_opt
@click.pass_obj
@_errors
def coles(p: Pipeline, dataset: str, epochs: int, hidden_size: int, batch_size: int, lr: float, seed: int, as_of,
          device: str, max_batches_per_epoch: int, restart: bool, force: bool) -> None:
    """CoLES user embeddings (the paper's strongest baseline), trained with pytorch-lifestream.

    A GRU over each user's events (categorical fields embedded, numeric fields and the time since
    the previous event as inputs), trained with CoLES's contrastive loss on random sub-sequences;
    one vector per user. Checkpoints every epoch under runs/<dataset>/coles/<run>/; the same
    command after an interruption resumes. Output: coles_embeddings table and Parquet file.

    \b
    Caps and rules:
      - each categorical field: its 1,000 most frequent values get codes, the rest one "other" code;
      - each user: the last 1,000 events are used (training and embedding);
      - sub-sequences of 15 to 100 events are contrasted: a user with fewer than 15 events is
        warned about (count and share); when at least two batches of users have 15 events or
        more, only they train (everyone is embedded);
      - an epoch is at most --max-batches-per-epoch batches of --batch-size users.
    """
    from datetime import timezone

    from producers.coles import ColesConfig

    config = ColesConfig(epochs=epochs, hidden_size=hidden_size, batch_size=batch_size, lr=lr, seed=seed,
                         as_of=as_of.replace(tzinfo=timezone.utc) if as_of else None, device=device,
                         max_batches_per_epoch=max_batches_per_epoch, resume=not restart, force=force)
    r = p.coles(dataset, config)
    trained = (f"{r.epochs_trained} epochs trained" if r.epochs_trained else "a finished run reused")
    console.print(f"[green]✓[/] {r.dataset}: {r.n_users:,} vectors of size {r.dim} ({r.model}, epoch {r.epoch}; "
                  f"{trained}{f', resumed from epoch {r.resumed_from}' if r.resumed_from else ''}"
                  f"{f', final loss {r.final_loss:.4f}' if r.final_loss is not None else ''}) in {r.seconds:.0f}s")
    console.print(f"  {r.parquet_path}", soft_wrap=True)


@cli.group(cls=PipelineOrder)
def sessions() -> None:
    """Session embeddings: cut events into sessions, train a session encoder, embed every session.

    \b
      llm4es sessions build DATASET    sessions table (explicit session column or inactivity gap)
      llm4es sessions train DATASET    self-supervised Transformer, checkpoint per epoch, resumable
      llm4es sessions embed DATASET    one vector per session -> session_embeddings (then `publish`)
    """


@sessions.command("build")
@dataset_arg
@click.option("--gap-minutes", type=click.FloatRange(0, min_open=True), default=None,
              help="Inactivity that starts a new session. Default: the dataset definition's events.sessions "
                   "(30 minutes unless it says otherwise; MovieLens: a day). Ignored where the definition names "
                   "an explicit session column.")
@force_opt
@click.pass_obj
@_errors
def sessions_build(p: Pipeline, dataset: str, gap_minutes: float | None, force: bool) -> None:
    """Cut DATASET's events into sessions: tables sessions and session_events in the warehouse.

    Checked with Great Expectations before they replace the previous tables (ids unique and not
    empty, every event in exactly one session, a session never spans two users); a failure
    prints which check and examples, and leaves the previous tables as they were.
    """
    from producers.sessions import SessionsConfig

    r = p.sessions_build(dataset, SessionsConfig(gap_minutes=gap_minutes, force=force))
    how = f"column {r.spec.get('column')}" if r.mode == "column" else f"a gap of {r.spec.get('gap_minutes'):g} minutes"
    e = r.events_per_session
    console.print(f"[green]✓[/] {r.dataset}: {r.n_sessions:,} sessions of {r.n_events:,} events by {how} "
                  f"(events per session: median {e['median']:g}, p90 {e['p90']:g}, max {e['max']:g}) in "
                  f"{r.seconds:.1f}s; checks passed", soft_wrap=True)
    console.print(f"  checks: {r.validation_path}", soft_wrap=True)


def _encoder_options(fn):
    from producers.sessions import SessionEncoderConfig as C

    options = [
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
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _encoder_config(**kw):
    from producers.sessions import SessionEncoderConfig

    return SessionEncoderConfig(**kw)


@sessions.command("train")
@dataset_arg
@_encoder_options
@click.pass_obj
@_errors
def sessions_train(p: Pipeline, dataset: str, **options) -> None:
    """Train the session encoder on DATASET's sessions (run `sessions build` first).

    A small Transformer over each session's events (categorical, numeric and text fields as the
    dataset definition types them, plus the time since the previous event), trained
    self-supervised: masked-event modelling (predict the fields of hidden events) plus a
    contrastive loss between two random crops of the same session (so the pooled vector itself
    summarises the session). Checkpoints every epoch under runs/<dataset>/sessions/<run>/; the
    same command after an interruption resumes, and a finished run is reused.
    """
    r = p.sessions_train(dataset, _encoder_config(**options))
    trained = f"{r.epochs_trained} epoch(s) trained" if r.epochs_trained else "a finished run reused"
    console.print(f"[green]✓[/] {r.dataset}: encoder at epoch {r.epochs} on {r.n_sessions:,} sessions ({trained}"
                  f"{f', resumed from epoch {r.resumed_from}' if r.resumed_from else ''}"
                  f"{f', loss {r.losses[0]:.3f} -> {r.final_loss:.3f}' if r.losses else ''}; "
                  f"{r.sessions_per_second:,.0f} sessions/s on {r.device}) in {r.seconds:.0f}s", soft_wrap=True)
    console.print(f"  {r.run_dir}", soft_wrap=True)
    console.print(f"next: llm4es sessions embed {dataset}")


@sessions.command("embed")
@dataset_arg
@_encoder_options
@click.pass_obj
@_errors
def sessions_embed(p: Pipeline, dataset: str, **options) -> None:
    """Embed every session of DATASET with the encoder `sessions train` trained (same options).

    Output: the session_embeddings table and data/<schema>/session_embeddings.parquet (with the
    run, epoch, config and data version in its metadata); `llm4es publish` serves them.
    """
    r = p.sessions_embed(dataset, _encoder_config(**options))
    console.print(f"[green]✓[/] {r.dataset}: {r.n_sessions:,} session vectors of size {r.dim} (epoch {r.epoch}) in "
                  f"{r.seconds:.1f}s", soft_wrap=True)
    console.print(f"  {r.parquet_path}", soft_wrap=True)
    console.print(f"next: llm4es intents build {dataset}, or llm4es publish {dataset}")


@cli.group(cls=PipelineOrder)
def intents() -> None:
    """Interpretable session intents: LLM taxonomy, LLM labels, a fast distilled classifier.

    \b
      llm4es intents build DATASET     the LLM proposes and refines a taxonomy (or --from-file)
      llm4es intents label DATASET     the LLM labels a sample of sessions (cached, resumable)
      llm4es intents distill DATASET   a classifier on session embeddings learns those labels
                                       -> session_intents (then `publish`)

    Needs `llm4es sessions build` (and `sessions embed` for distill). The LLM is a local model
    (default SmolLM2-135M-Instruct, too small for good taxonomies: use a bigger local model or
    an OpenAI-compatible server, e.g. vLLM, with --llm-backend openai --endpoint URL).
    """


def _llm_options(fn):
    options = [
        click.option("--llm-backend", type=click.Choice(["local", "openai", "lexical"]), default="local",
                     show_default=True,
                     help="local: a transformers model on this machine; openai: an OpenAI-compatible server; "
                          "lexical (label only): no LLM, the label whose description shares the most words "
                          "with the session, a free baseline."),
        click.option("--llm-model", default="smollm2-135m", show_default=True,
                     help="local: registry name, folder or hub id; openai: the served model's name."),
        click.option("--endpoint", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1."),
        click.option("--concurrency", type=click.IntRange(1), default=4, show_default=True,
                     help="Requests in flight (openai)."),
        click.option("--timeout", "timeout_s", type=click.FloatRange(1), default=30.0, show_default=True,
                     help="Seconds per attempt of a request (openai)."),
        click.option("--max-chars", type=click.IntRange(200), default=2500, show_default=True,
                     help="A session's text in a prompt is cut to this many characters."),
        click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _llm(defaults, llm_backend: str, llm_model: str, endpoint: str | None, concurrency: int, timeout_s: float):
    from dataclasses import replace

    return replace(defaults, backend=llm_backend, model=llm_model, endpoint=endpoint, concurrency=concurrency,
                   timeout_s=timeout_s)


@intents.command("build")
@dataset_arg
@click.option("--sample-size", type=click.IntRange(1), default=20, show_default=True,
              help="Sessions summarised per round.")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True,
              help="Round 1 proposes a taxonomy; each later round refines it on new sessions.")
@click.option("--max-labels", type=click.IntRange(2), default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Which sessions are sampled.")
@click.option("--from-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Store a taxonomy a person wrote or reviewed (`name: description` per line, or a "
                   "taxonomy-vN.md table) as the next version instead of asking the LLM.")
@_llm_options
@click.pass_obj
@_errors
def intents_build(p: Pipeline, dataset: str, sample_size: int, rounds: int, max_labels: int, seed: int,
                  from_file: Path | None, max_chars: int, progress: bool | None, **llm) -> None:
    """Build an intent taxonomy for DATASET's sessions (a new version in intent_taxonomies).

    The LLM summarises sampled sessions in one sentence each, proposes at most --max-labels labels
    (name and one-line description) and refines them over further samples. The taxonomy is
    versioned in the warehouse and written for people to read to
    reports/intents/<schema>/taxonomy-v<N>.md; review it, edit it, and store the edit with
    --from-file.
    """
    from dataclasses import replace

    from producers.intents import TaxonomyConfig

    if from_file is not None:
        r = p.intents_import(dataset, from_file, max_labels)
    else:
        base = TaxonomyConfig()
        config = TaxonomyConfig(sample_size=sample_size, rounds=rounds, max_labels=max_labels, seed=seed,
                                llm=_llm(base.llm, **llm), text=replace(base.text, max_chars=max_chars),
                                progress=progress)
        r = p.intents_build(dataset, config)
    console.print(f"[green]✓[/] {r.dataset}: taxonomy v{r.version}, {len(r.labels)} labels ({r.backend}, {r.model}; "
                  f"{r.llm_calls} LLM calls) in {r.seconds:.0f}s", soft_wrap=True)
    for label in r.labels:
        console.print(f"  {label['name']}: {label['description']}", soft_wrap=True)
    console.print(f"  {r.report_path}", soft_wrap=True)
    console.print(f"next: llm4es intents label {dataset}")


@intents.command("label")
@dataset_arg
@click.option("--sample-size", type=click.IntRange(0), default=1000, show_default=True,
              help="Sessions the LLM labels (0: all).")
@click.option("--mode", type=click.Choice(["generate", "score"]), default="generate", show_default=True,
              help="generate: the LLM writes a label name (parsed, checked against the taxonomy); score (local "
                   "back end): the label name the LLM finds most likely, always valid and cheaper on a CPU.")
@click.option("--taxonomy-version", type=click.IntRange(1), default=None, help="Default: the newest.")
@click.option("--seed", type=int, default=0, show_default=True)
@_llm_options
@click.pass_obj
@_errors
def intents_label(p: Pipeline, dataset: str, sample_size: int, mode: str, taxonomy_version: int | None, seed: int,
                  max_chars: int, progress: bool | None, **llm) -> None:
    """The LLM gives a sample of DATASET's sessions one taxonomy label each.

    Answers are checked against the taxonomy (one that names no label is kept with its raw
    text, label empty), cached in intent_llm_labels after every batch: the same command after an
    interruption asks only for what is missing.
    """
    from dataclasses import replace

    from producers.intents import LabelConfig

    base = LabelConfig()
    config = LabelConfig(sample_size=sample_size or None, taxonomy_version=taxonomy_version, mode=mode, seed=seed,
                         llm=_llm(base.llm, **llm), text=replace(base.text, max_chars=max_chars), progress=progress)
    r = p.intents_label(dataset, config)
    each = f"; {r.llm_seconds_per_session:.2f} s per session" if r.llm_seconds_per_session is not None else ""
    console.print(f"[green]✓[/] {r.dataset}: {r.labelled:,} of {r.sampled:,} sessions labelled with taxonomy "
                  f"v{r.taxonomy_version} ({r.mode}, {r.model}; {r.from_cache:,} from cache, {r.unparsable:,} "
                  f"unparsable, {r.failed:,} failed{each}) in {r.seconds:.0f}s", soft_wrap=True)
    console.print("  " + ", ".join(f"{k} {v:,}" for k, v in r.distribution.items()), soft_wrap=True)
    console.print(f"next: llm4es intents distill {dataset}")


@intents.command("distill")
@dataset_arg
@click.option("--classifier", type=click.Choice(["logreg", "lightgbm"]), default="logreg", show_default=True)
@click.option("--test-share", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.25,
              show_default=True, help="Held-out labelled sessions the agreement is measured on.")
@click.option("--llm-latency-sessions", type=click.IntRange(0), default=8, show_default=True,
              help="Held-out sessions sent through the LLM again, to time it in the same run (0: skip).")
@click.option("--taxonomy-version", type=click.IntRange(1), default=None, help="Default: the newest with labels.")
@click.option("--seed", type=int, default=0, show_default=True)
@_llm_options
@click.pass_obj
@_errors
def intents_distill(p: Pipeline, dataset: str, classifier: str, test_share: float, llm_latency_sessions: int,
                    taxonomy_version: int | None, seed: int, max_chars: int, progress: bool | None, **llm) -> None:
    """Distill the LLM's labels into a light classifier on session embeddings and cheap session features.

    Reports its agreement with the LLM on held-out sessions (micro and macro F1) and the latency
    per session of both, measured in this run; then labels every session: session_intents table
    and data/<schema>/session_intents.parquet (label and probabilities), served by `publish`.
    """
    from dataclasses import replace

    from producers.intents import DistillConfig

    base = DistillConfig()
    config = DistillConfig(classifier=classifier, test_share=test_share, llm_latency_sessions=llm_latency_sessions,
                           taxonomy_version=taxonomy_version, seed=seed, llm=_llm(base.llm, **llm),
                           text=replace(base.text, max_chars=max_chars), progress=progress)
    r = p.intents_distill(dataset, config)
    labeller = r.provenance.get("llm_model") or "LLM"
    llm_each = (f"{r.llm_seconds_per_session * 1000:,.3f} ms over {r.llm_sessions} held-out sessions"
                if r.llm_seconds_per_session is not None else "not measured")
    console.print(f"[green]✓[/] {r.dataset}: {r.classifier} on {r.n_train:,} sessions labelled by {labeller}; held "
                  f"out {r.n_test:,}: micro F1 {r.micro_f1:.3f}, macro F1 {r.macro_f1:.3f} against {labeller}",
                  soft_wrap=True)
    console.print(f"  latency per session: classifier {r.classifier_seconds_per_session * 1000:.3f} ms, "
                  f"{labeller} {llm_each}", soft_wrap=True)
    console.print(f"  report: {r.report_md}", soft_wrap=True)
    console.print(f"  {r.n_predicted:,} sessions labelled -> {r.parquet_path}", soft_wrap=True)
    console.print(f"next: llm4es publish {dataset}")


@cli.command()
@dataset_arg
@click.option("--llm4es-set", default=None,
              help="The LLM4ES embeddings set served as <dataset>__llm4es_embedding (a view label, set id, file "
                   "name or checkpoint). Default: the most recently produced set.")
@click.option("--online-store", type=click.Choice(["sqlite", "redis"]), default="sqlite", show_default=True,
              help="Whose registry to apply to (and materialize into with --materialize).")
@click.option("--redis-url", default=None, help="Redis as host:port[,db=N] [default: 127.0.0.1:6379]")
@click.option("--materialize", is_flag=True, help="Also fill the online store (materialize-incremental up to now).")
@click.option("--recent-sessions", type=click.IntRange(1), default=10, show_default=True,
              help="K of the session rollups: mean embedding and intent shares over a user's last K sessions.")
@click.option("--project", envvar="LLM4ES_FEAST_PROJECT", default=None,
              help="The Feast project (online rows and registry entries are kept per project). [default: "
                   "$LLM4ES_FEAST_PROJECT, the home's current one, else llm4es_<home folder>_<hash of its path>]")
@click.pass_obj
@_errors
def publish(p: Pipeline, dataset: str, llm4es_set: str | None, online_store: str, redis_url: str | None,
            materialize: bool, recent_sessions: int, project: str | None) -> None:
    """Serve DATASET's features through Feast: snapshot the files, write the repo's manifest, `feast apply`.

    Publishes what exists of agg_features, coles_embeddings and LLM4ES embeddings (every set: the
    default one as <schema>__llm4es_embedding, the others as <schema>__llm4es__<label>). Snapshots
    with other as-of times accumulate, so historical fetches stay point-in-time correct. Session
    embeddings and intents (`llm4es sessions embed`, `llm4es intents distill`) become the
    session-keyed views <schema>__session_embedding and __session_intent, and the user rollups
    __session_embedding_rollup and __intent_shares (one row per session end, so point in time).
    Then `feast -c feature_repo materialize-incremental <now>` (or --materialize) fills the online store.
    Safe under live readers: views are updated in place, never dropped, and a killed publish leaves the
    previous state serving (see README, "What publish guarantees to live readers").
    """
    from producers.publish import PublishConfig

    r = p.publish(dataset, PublishConfig(llm4es_set=llm4es_set, online_store=online_store, redis_url=redis_url,
                                         materialize=materialize, recent_sessions=recent_sessions,
                                         project=project))
    table = Table(title=f"{r.dataset}: Feast views ({r.online_store} online store)", title_justify="left")
    for column in ("view", "kind", "features", "produced by", "as of"):
        table.add_column(column)
    for v in r.views:
        what = v.model or ""
        if v.kind == "llm4es":
            what = f"{v.model} @ {v.checkpoint}, layers {v.layers}, {v.text_kind}"
        features = (f"vector[{v.dim}]" if v.dim and v.kind in ("coles", "llm4es") else
                    f"{', '.join(v.features)}" if len(v.features) <= 4 else f"{len(v.features)} columns")
        table.add_row(v.name + (" (default)" if v.is_default and v.kind == "llm4es" else ""), v.kind, features, what,
                      v.feature_timestamps[-1] if v.feature_timestamps else "")
    console.print(table)
    console.print(f"[green]✓[/] repo {r.repo} applied in {r.seconds:.1f}s"
                  f"{'; online store filled' if r.materialized else ''}", soft_wrap=True)
    if not r.materialized:
        console.print(f"next: feast -c {r.repo} materialize-incremental $(date -u +%Y-%m-%dT%H:%M:%S)", soft_wrap=True)


@cli.command()
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
@click.option("--folds", type=click.IntRange(2), default=5, show_default=True)
@click.option("--cv-repeats", type=click.IntRange(1), default=3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--label-time", type=click.DateTime(), default=None,
              help="When the labels are known (features must be older). Default: the dataset's last event.")
@click.option("--no-epoch-selection", is_flag=True, help="Use the default LLM4ES view, not the best epoch.")
@click.option("--no-linear-probe", is_flag=True,
              help="LightGBM only: skip the second reader (standardized logistic regression / ridge), "
                   "reported as '<set> (linear)' rows.")
@click.pass_obj
@_errors
def evaluate(p: Pipeline, dataset: str, targets: tuple[str, ...], features: str | None, protocols: tuple[str, ...],
             folds: int, cv_repeats: int, seed: int, label_time, no_epoch_selection: bool,
             no_linear_probe: bool) -> None:
    """Downstream LightGBM and a linear probe on features fetched from Feast, mean ± std per feature set.

    Needs `llm4es publish DATASET` first. Metrics: ROC-AUC and accuracy (binary), accuracy
    (multiclass), MAE (regression). With several epochs of a fine-tuning run published, the epoch
    is picked by validation score on the training folds, never the test set. Writes this call's
    report to reports/evaluate/<dataset>/runs/<UTC time>/ and updates the latest report
    reports/evaluate/<dataset>/evaluation.{json,md,png}: its rows for the feature sets evaluated now are
    replaced, the others kept (when the folds, seed and targets are the same; otherwise it starts anew).
    """
    from datetime import timezone

    from training.evaluate import EvaluateConfig

    chosen = tuple(f.strip() for f in (features or "").split(",") if f.strip())
    if features is not None and not chosen:
        raise click.BadParameter("give at least one feature set", param_hint="--features")
    config = EvaluateConfig(targets=targets, features=chosen,
                            protocols=protocols or ("paper", "cv"), folds=folds, cv_repeats=cv_repeats, seed=seed,
                            label_time=label_time.replace(tzinfo=timezone.utc) if label_time else None,
                            select_epoch=not no_epoch_selection, linear_probe=not no_linear_probe)
    r = p.evaluate(dataset, config)
    print_evaluation(r)


def print_evaluation(r) -> None:
    for protocol in r.report["config"]["protocols"]:
        rows = r.table(protocol)
        table = Table(title=f"{r.dataset}: {'paper protocol (test set)' if protocol == 'paper' else 'repeated CV'}",
                      title_justify="left")
        table.add_column("features")
        for column in rows[0][1]:
            table.add_column(column, justify="right")
        for name, cells in rows:
            table.add_row(name, *cells.values())
        console.print(table)
    for target, sets in r.report["results"].items():
        for name, entry in sets.items():
            if entry.get("chosen_view"):
                console.print(f"{target} / {name}: epoch view {entry['chosen_view']} chosen on the training folds")
    for name, reason in r.report.get("missing", {}).items():
        console.print(f"not evaluated: {name} ({reason})", soft_wrap=True)
    if r.merge_note:
        console.print(r.merge_note, soft_wrap=True)
    console.print(f"reports: {r.paths['markdown']} (+ .json, .png; this call: {r.paths['run_markdown'].parent}); "
                  f"{r.seconds:.0f}s", soft_wrap=True)


@cli.command()
@click.option("--dataset", default="movielens-100k", show_default=True)
@click.option("--hardware", type=click.Choice(["auto", "gpu", "cpu-bf16", "cpu"]), default="auto", show_default=True,
              help="Size the LLM stages for this machine class (auto: detect).")
@click.pass_obj
@_errors
def demo(p: Pipeline, dataset: str, hardware: str) -> None:
    """The whole pipeline end to end on the built-in dataset, then the results table and one online read.

    ingest -> validate -> serialize -> enrich (7 templates) -> aggregate -> fine-tune -> embed ->
    CoLES -> publish (Feast) -> materialize (SQLite) -> evaluate (LightGBM). On a CPU the LLM stages
    are cut to fit about 20 minutes on 2 cores (the output says how); on a GPU they run as in the
    paper. Stages that find their work done (ingest, fine-tuning and CoLES runs) reuse it.
    """
    from dataclasses import replace

    from producers import demo as demo_plan
    from producers.coles import ColesConfig
    from producers.publish import PublishConfig

    t0 = time.perf_counter()
    plan = demo_plan.plan(demo_plan.detect_hardware() if hardware == "auto" else hardware)
    steps = 12
    console.print(f"[bold]llm4es demo[/] on {dataset}, hardware class [bold]{plan.hardware}[/]")
    for cut in plan.cuts:
        console.print(f"[yellow]CPU budget:[/] {cut}")

    def step(i: int, title: str) -> None:
        console.rule(f"[bold]{i}/{steps} {title}[/] [dim]({time.perf_counter() - t0:.0f}s)[/]")

    step(1, f"ingest {dataset}")
    r = p.ingest(dataset)
    console.print(f"{r.n_events:,} events, {r.n_users:,} users, {r.n_rejects:,} rejected rows"
                  f"{' (unchanged source, reused)' if r.skipped else ''}")
    step(2, f"validate {dataset}")
    report = p.validate(dataset)
    print_validation(report)
    if not report.success:
        sys.exit(1)
    step(3, "serialize histories to text")
    s = p.serialize(dataset, plan.embed.model, plan.serialize_max_tokens, "readable", fmt=plan.serialize_format)
    console.print(f"{s.n_texts:,} texts from {s.n_events:,} of {s.n_events_total:,} events; {s.n_cut:,} users cut to "
                  f"the {plan.serialize_max_tokens}-token budget (largest text {s.max_tokens_seen:,} tokens)")
    step(4, "enrich: 7 template rewrites per user")
    e = p.enrich(dataset, plan.enrich)
    console.print(f"{e.written:,} texts in {e.seconds:.1f}s; formats: "
                  + ", ".join(f"{k} {v:,}" for k, v in sorted(e.by_format.items())))
    step(5, "aggregate features")
    a = p.aggregate(dataset)
    console.print(f"{a.n_users:,} users x {a.n_features} features as of {a.as_of}")
    if plan.finetune is None:
        step(6, "fine-tune: skipped on this hardware (see the CPU budget above)")
        checkpoint = None
    else:
        step(6, f"fine-tune {plan.finetune.model} on the {plan.finetune.mixture} mixture")
        f = p.finetune(dataset, plan.finetune)
        losses = f.losses
        console.print(f"{f.steps} steps, loss {losses[0]:.3f} -> {f.final_loss:.3f}, {f.tokens_per_second:,.0f} "
                      "tokens/s" if losses else f"{f.steps} steps")
        checkpoint = str(f.models[-1])
    step(7, f"embed every user with the {'base' if checkpoint is None else 'fine-tuned'} model")
    em = p.embed(dataset, replace(plan.embed, checkpoint=checkpoint))
    for es in em.sets:
        console.print(f"{es.n_users:,} vectors of size {es.dim} from {es.checkpoint} at {es.tokens_per_s:,.0f} tokens/s")
    step(8, "CoLES embeddings (pytorch-lifestream)")
    c = p.coles(dataset, ColesConfig(seed=plan.evaluate.seed + 42))
    console.print(f"{c.n_users:,} vectors of size {c.dim} ({c.model}, {c.epoch} epochs"
                  f"{', reused' if not c.epochs_trained else f', final loss {c.final_loss:.3f}'})")
    step(9, "publish to Feast (feast apply)")
    pub = p.publish(dataset, PublishConfig())
    console.print(f"{len(pub.views)} feature views: " + ", ".join(v.name for v in pub.views), soft_wrap=True)
    step(10, "materialize into the online store (SQLite)")
    p.materialize("sqlite")
    step(11, "evaluate: LightGBM and a linear probe on features fetched from Feast")
    ev = p.evaluate(dataset, plan.evaluate)
    print_evaluation(ev)
    step(12, "an online read, as a serving model would do it")
    user = p.first_user(dataset)
    online = p.online_features(dataset, ["llm4es_embedding", "coles_embedding", "agg_features"], [user])
    features = online.iloc[0].drop("user_id")
    is_vector = [hasattr(v, "__len__") and not isinstance(v, str) for v in features.values]
    console.print(f"get_online_features(user_id={user}):")
    for (column, value), vector in zip(features.items(), is_vector):
        if vector:
            console.print(f"  {column}: [{', '.join(f'{x:.3f}' for x in value[:4])}, ...] ({len(value)} floats)",
                          soft_wrap=True)
    console.print(f"  ... and {is_vector.count(False)} aggregate features", soft_wrap=True)
    console.print(f"done in {time.perf_counter() - t0:.0f}s; warehouse {p.home.warehouse_path}; "
                  f"report {ev.paths['markdown']}", soft_wrap=True)


def print_summary(s: dict) -> None:
    lo, med, hi = s["events_per_user"]
    console.print(f"{s['dataset']}: {s['events']:,} events by {s['users_with_events']:,} users "
                  f"({s['users']:,} in users), {s['first_event']} .. {s['last_event']}")
    console.print(f"events per user: min {lo}, median {med:g}, max {hi}; rejected rows: {s['rejects']}")
    console.print(f"event fields: {', '.join(s['fields'])}")
    for name, value in s["labels"].items():
        if isinstance(value, tuple):
            console.print(f"label {name}: mean {value[0]}, range {value[1]}..{value[2]}, {value[3]} users")
        else:
            console.print(f"label {name}: " + ", ".join(f"{k}={v}" for k, v in value))
    console.print(f"ingest {s['ingest_id']}, data version {s['source_hash']}")


def main() -> None:
    cli(prog_name="llm4es")


if __name__ == "__main__":  # `accelerate launch -m producers.cli finetune ...`
    main()
