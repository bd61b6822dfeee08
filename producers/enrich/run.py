"""`llm4es enrich`: K rewrites of every user's history, written as `template` or `llm` texts.

The histories are the events the serialized texts kept (run `llm4es serialize` first), rendered
in DuckDB exactly as serialization renders them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Callable, Literal

import pandas as pd

from producers.enrich.base import EnrichError, EnrichReport, UserHistory
from producers.enrich.options import LLMOptions
from producers.shared.models import DEFAULT_MODEL
from producers.stores.provenance import code_version
from producers.serialize.budget import count_tokens
from producers.serialize.render import line_sql, rendered_events_sql
from producers.stores.texts import config_json, ensure_table, export_parquet, replace_kind, stage_frame
from producers.stores.warehouse import Home, WarehouseError, last_ingest, stored_definition, table_exists
from validation.gate import require_valid


@dataclass(frozen=True)
class EnrichConfig:
    enricher: Literal["template", "llm"] = "template"
    variants: int = 7
    seed: int = 0
    limit_users: int | None = None  # the first N users by id (trying the LLM on a few)
    tokenizer: str = DEFAULT_MODEL  # counts n_tokens of the rewrites
    max_tokens: int = 2048  # template rewrites drop their oldest events to fit (0: no budget)
    llm: LLMOptions = field(default_factory=LLMOptions)
    # llm: the run fails, writing nothing, when more of its texts than this share are template
    # fallbacks (refused or failed LLM outputs); 1 accepts any share.
    max_fallback_share: float = 0.1
    force: bool = False


def load_histories(con, dataset: str, limit_users: int | None = None) -> list[UserHistory]:
    """The events each serialized text kept, as rendered values, oldest first."""
    d = stored_definition(con, dataset)
    s = f'"{d.schema}"'
    if not table_exists(con, d.schema, "texts") or not con.execute(
            f"SELECT count(*) FROM {s}.texts WHERE kind = 'serialized'").fetchone()[0]:
        raise WarehouseError(f"{dataset} has no serialized texts: run `llm4es serialize {dataset}` first")
    columns = ["time", *(f.name for f in d.serialized_fields)]
    labels = [d.events.time.label, *(f.display for f in d.serialized_fields)]
    values = ", ".join(f'"t_{c}"' for c in columns)
    limit = f"LIMIT {int(limit_users)}" if limit_users else ""
    # The same order as serialization (time, then the line), so the kept events are the same ones.
    rows = con.execute(f"""
        WITH users AS (SELECT user_id, n_events, text FROM {s}.texts
                       WHERE kind = 'serialized' AND variant = 0 ORDER BY user_id {limit}),
             lines AS (SELECT r.*, {line_sql(d)} AS line FROM ({rendered_events_sql(d)}) r
                       WHERE r.user_id IN (SELECT user_id FROM users))
        SELECT user_id, n_events, text, list_slice(rows, len(rows) - n_events + 1, len(rows)) AS rows
        FROM (SELECT u.user_id, u.n_events, u.text, list([{values}] ORDER BY l.event_time, l.line) AS rows
              FROM users u JOIN lines l USING (user_id) GROUP BY ALL)
        ORDER BY user_id""").fetchall()
    # only the kept (most recent) events leave DuckDB: a long history is not copied into Python
    return [UserHistory(user_id, columns, labels, event_rows, text) for user_id, n, text, event_rows in rows]


def fit_rewrites(enricher, d, histories: list[UserHistory], variant: int, rewrites: list, counts: list[int],
                 budget: int, tokenizer) -> tuple[list[UserHistory], list, list[int]]:
    """Re-render over-budget rewrites from fewer (the most recent) events until they fit.

    Richer formats (JSON, XML) take up to 3x the tokens of the serialized text the history was
    cut for; fine-tuning would otherwise truncate them mid-structure. Each round keeps the
    share of events the budget allows, so it converges in two or three rounds.
    """
    kept, rewrites, counts = list(histories), list(rewrites), list(counts)
    for _ in range(6):
        over = [i for i, n in enumerate(counts) if n > budget and kept[i].rows]
        if not over:
            break
        for i in over:
            rows = kept[i].rows
            keep = min(len(rows) - 1, int(len(rows) * budget / counts[i] * 0.95))
            kept[i] = replace(kept[i], rows=rows[len(rows) - keep:] if keep > 0 else [])
        redone = enricher.rewrite(d, [kept[i] for i in over], variant)
        for i, r, n in zip(over, redone, count_tokens(tokenizer, [r.text for r in redone])):
            rewrites[i], counts[i] = r, n
    return kept, rewrites, counts


def refuse_fallbacks(report: EnrichReport, max_share: float) -> None:
    """Fail (before anything is written) when too many `llm` texts are template fallbacks."""
    if report.enricher != "llm" or report.fallback_share <= max_share:
        return
    total = report.users * report.variants
    why = ", ".join(f"{k} {v:,}" for k, v in sorted(report.refusals.items()))
    error = f"; first back-end error: {report.first_error}" if report.first_error else ""
    raise EnrichError(
        f"{report.dataset}: {report.fallbacks:,} of {total:,} llm texts ({report.fallback_share:.0%}) would be "
        f"template fallbacks, not LLM output ({why}){error}. Nothing was written (LLM outputs made so far are "
        f"cached). Fix the endpoint or model, or accept up to a share with --max-fallback-share "
        f"(now {max_share:g}; 1 keeps them all, marked fallback = true in the texts table)")


def make_enricher(config: EnrichConfig, home: Home, schema: str, log: Callable[[str], None]):
    from producers.enrich.templates import TemplateEnricher

    template = TemplateEnricher(seed=config.seed)
    if config.enricher == "template":
        return template
    from producers.enrich.llm import LLMEnricher

    return LLMEnricher(config.llm, fallback=template, home=home, schema=schema, seed=config.seed, log=log)


def enrich(home: Home, dataset: str, config: EnrichConfig, log: Callable[[str], None] = lambda _: None,
           tokenizer=None) -> EnrichReport:
    from producers.shared.models import load_tokenizer, resolve_model

    t0 = time.perf_counter()
    con = home.connect()
    try:
        require_valid(con, dataset, config.force)
        d = stored_definition(con, dataset)
        histories = load_histories(con, dataset, config.limit_users)
        log(f"{len(histories):,} user histories, {config.variants} variants each ({config.enricher})")
        if tokenizer is None:
            tokenizer = load_tokenizer(resolve_model(config.tokenizer, progress=log))
        enricher = make_enricher(config, home, d.schema, log)
        report = EnrichReport(d.name, config.enricher, len(histories), config.variants)
        frames = []
        for variant in range(config.variants):
            rewrites = enricher.rewrite(d, histories, variant)
            counts = count_tokens(tokenizer, [r.text for r in rewrites])
            kept = list(histories)
            if config.enricher == "template" and config.max_tokens:
                kept, rewrites, counts = fit_rewrites(enricher, d, histories, variant, rewrites, counts,
                                                      config.max_tokens, tokenizer)
            frames.append(pd.DataFrame({
                "user_id": [h.user_id for h in histories], "variant": variant,
                "format": [r.format for r in rewrites], "text": [r.text for r in rewrites],
                "n_events": [len(h.rows) for h in kept], "n_tokens": counts,
                "fallback": [r.fallback for r in rewrites],
            }))
            for r in rewrites:
                report.by_format[r.format] = report.by_format.get(r.format, 0) + 1
        for key, value in getattr(enricher, "stats", {}).items():
            setattr(report, key, value)
        report.first_error = getattr(enricher, "first_error", None)
        refuse_fallbacks(report, config.max_fallback_share)
        rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        ingest = last_ingest(con, d.schema)
        rows = rows.assign(kind=config.enricher, tokenizer=config.tokenizer, producer_version=code_version(),
                           source_hash=ingest["source_hash"], config=config_json(config),
                           produced_at=datetime.now(timezone.utc).replace(tzinfo=None))
        staging = stage_frame(con, "enriched_staging", rows)
        ensure_table(con, d.schema, d.events.user_dtype)  # adds `fallback` to a table made before it
        # A partial run (--limit-users) replaces only the rows it made; a full one replaces the kind.
        report.written = replace_kind(con, d.schema, config.enricher, staging,
                                      only_staged_users=config.limit_users is not None)
        export_parquet(home, con, d.schema)
        report.seconds = time.perf_counter() - t0
        return report
    finally:
        con.close()
