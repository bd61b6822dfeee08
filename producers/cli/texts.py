"""Histories as text: `serialize` (one text per user) and `enrich` (rewrites in many formats)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import click

from producers.cli import printers
from producers.cli.defaults import config_defaults
from producers.cli.errors import handle_errors
from producers.cli.options import dataset_arg, force_opt, model_opt, pass_pipeline

if TYPE_CHECKING:
    from producers.pipeline import Pipeline

S = config_defaults("producers.serialize.run", "SerializeConfig")
E = config_defaults("producers.enrich.run", "EnrichConfig")
L = config_defaults("producers.enrich.options", "LLMOptions")


@click.command()
@dataset_arg
@model_opt
@click.option("--max-tokens", type=click.IntRange(0), default=S.max_tokens, show_default=True,
              help="Token budget per user (0: none). The oldest events are dropped first; the header stays.")
@click.option("--time-format", type=click.Choice(["readable", "day-index"]), default=S.time_format,
              show_default=True, help="Dates as the definition displays them, or the paper's raw day index.")
@click.option("--format", "fmt", type=click.Choice(["paper", "compact"]), default=S.format, show_default=True,
              help="compact: one line per day, the date once, runs of identical events collapsed with their "
                   "count (about 2x the events per token); paper: one line per event with its full timestamp.")
@force_opt
@pass_pipeline
@handle_errors
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
    printers.print_serialize(r, max_tokens, time.perf_counter() - t0)


@click.command()
@dataset_arg
@click.option("--enricher", type=click.Choice(["template", "llm"]), default=E.enricher, show_default=True,
              help="template: deterministic formats (JSON, tables, YAML, XML, CSV, prose) with paraphrased names; "
                   "llm: an instruct model rewrites each history (the paper's Table 1 prompt).")
@click.option("--variants", type=click.IntRange(1, 50), default=E.variants, show_default=True,
              help="Rewrites per user (the paper found 7 mixed formats best).")
@click.option("--seed", type=int, default=E.seed, show_default=True)
@click.option("--limit-users", type=click.IntRange(1), default=E.limit_users,
              help="Only the first N users (to try the LLM).")
@click.option("--tokenizer", "tokenizer", default=E.tokenizer, show_default=True,
              help="Model whose tokenizer counts the rewrites' tokens.")
@click.option("--llm-backend", type=click.Choice(["local", "openai"]), default=L.backend, show_default=True,
              help="local: a transformers model on this machine; openai: any OpenAI-compatible server "
                   "(vLLM, llama.cpp server, Ollama).")
@click.option("--llm-model", default=L.model, show_default=True,
              help="local: registry name, folder or hub id; openai: the served model's name.")
@click.option("--endpoint", default=L.endpoint, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")
@click.option("--concurrency", type=click.IntRange(1), default=L.concurrency, show_default=True,
              help="Requests in flight (openai).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(1), default=L.timeout_s, show_default=True,
              help="Seconds per attempt of a request (openai).")
@click.option("--retries", type=click.IntRange(0), default=L.retries, show_default=True,
              help="Further attempts of a failed request, with exponential backoff (openai).")
@click.option("--max-fallback-share", type=click.FloatRange(0, 1), default=E.max_fallback_share, show_default=True,
              help="llm: fail, writing nothing, when more than this share of the texts would be template "
                   "fallbacks (refused or failed LLM outputs); 1 keeps them all, marked fallback = true.")
@click.option("--batch-size", type=click.IntRange(1), default=L.batch_size, show_default=True,
              help="Prompts per batch (local).")
@click.option("--temperature", type=click.FloatRange(0), default=L.temperature, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1), default=L.top_p, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(16), default=L.max_new_tokens, show_default=True)
@force_opt
@pass_pipeline
@handle_errors
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
    if llm_backend == "openai" and enricher == "llm" and not endpoint:
        raise click.UsageError("--llm-backend openai needs --endpoint")
    from producers.enrich.options import LLMOptions
    from producers.enrich.run import EnrichConfig

    llm = LLMOptions(backend=llm_backend, model=llm_model, endpoint=endpoint, concurrency=concurrency,
                     timeout_s=timeout_s, retries=retries, batch_size=batch_size, temperature=temperature,
                     top_p=top_p, max_new_tokens=max_new_tokens)
    r = p.enrich(dataset, EnrichConfig(enricher=enricher, variants=variants, seed=seed, limit_users=limit_users,
                                       tokenizer=tokenizer, llm=llm, max_fallback_share=max_fallback_share,
                                       force=force))
    printers.print_enrich(r)
