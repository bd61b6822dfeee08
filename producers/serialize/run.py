"""`llm4es serialize`: each user's history as text, cut to a token budget, into the `texts` table.

The lines are built in DuckDB (one ordered aggregation per user); Python only tokenizes the
finished texts to enforce the budget exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Callable

import pandas as pd

from producers.errors import Llm4esError
from producers.shared.models import DEFAULT_MODEL
from producers.stores.provenance import code_version
from producers.serialize.budget import count_tokens, fit_texts
from producers.serialize.render import FORMATS, Format, TimeFormat, header, user_bodies_sql
from producers.stores.texts import config_json, ensure_table, export_parquet, replace_kind, stage_frame
from producers.stores.warehouse import Home, last_ingest, stored_definition
from validation.gate import require_valid


class SerializeError(Llm4esError, ValueError):
    """The serialization cannot be done as asked (e.g. the budget is smaller than the header)."""


@dataclass(frozen=True)
class SerializeConfig:
    model: str = DEFAULT_MODEL  # whose tokenizer counts the budget
    max_tokens: int = 2048  # per user text; 0 = no budget
    time_format: TimeFormat = "readable"
    format: Format = "paper"  # how events render to lines (producers/serialize/render.py): "paper" or "compact"
    force: bool = False  # run even if the dataset failed validation
    users: tuple | None = None  # only these users (a refresh): their texts are replaced, the others' kept


@dataclass
class SerializeResult:
    dataset: str
    n_texts: int
    n_events: int  # events kept in texts
    n_events_total: int
    n_cut: int  # users whose oldest events were dropped to fit the budget
    max_tokens_seen: int
    parquet: str
    header: str


def serialize(home: Home, dataset: str, config: SerializeConfig, log: Callable[[str], None] = lambda _: None,
              tokenizer=None) -> SerializeResult:
    from producers.shared.models import load_tokenizer, resolve_model

    if config.format not in FORMATS:
        raise SerializeError(f"format must be one of {', '.join(FORMATS)}, not {config.format!r}")
    con = home.connect()
    try:
        require_valid(con, dataset, config.force)
        d = stored_definition(con, dataset)
        ingest = last_ingest(con, d.schema)
        if tokenizer is None:
            log(f"loading the tokenizer of {config.model}")
            tokenizer = load_tokenizer(resolve_model(config.model, progress=log))
        head = header(d)
        if config.max_tokens and count_tokens(tokenizer, [head])[0] >= config.max_tokens:
            raise SerializeError(f"the header alone takes {config.max_tokens} tokens or more; raise --max-tokens")
        # No text can hold more events than tokens, so the SQL already drops what cannot fit.
        max_lines = config.max_tokens or None
        log("building event lines in DuckDB")
        only = "e.user_id IN (SELECT unnest($users))" if config.users is not None else ""
        bodies = con.execute(user_bodies_sql(d, config.time_format, max_lines, where=only, fmt=config.format)
                             + " ORDER BY user_id", {"users": list(config.users)} if only else None).df()
        log(f"counting tokens for {len(bodies):,} texts")
        fitted = fit_texts(tokenizer, head, bodies["body"].tolist(), config.max_tokens)
        if "line_events" in bodies:  # a line may hold several events: the kept lines' events, not lines
            fitted = [replace(f, n_events=int(sum(per_line[len(per_line) - f.n_events:])) if f.n_events else 0)
                      for f, per_line in zip(fitted, bodies["line_events"])]
        rows = pd.DataFrame({
            "user_id": bodies["user_id"], "kind": "serialized", "variant": 0,
            "format": "plain" if config.format == "paper" else config.format,
            "text": [f.text for f in fitted], "n_events": [f.n_events for f in fitted],
            "n_tokens": [f.n_tokens for f in fitted], "tokenizer": config.model,
            "producer_version": code_version(), "source_hash": ingest["source_hash"],
            "config": config_json(replace(config, users=None)),  # the config of every text, not of this call
            "produced_at": datetime.now(timezone.utc).replace(tzinfo=None),
        })
        ensure_table(con, d.schema, d.events.user_dtype)
        replace_kind(con, d.schema, "serialized", stage_frame(con, "serialized_staging", rows),
                     only_staged_users=config.users is not None)
        parquet = export_parquet(home, con, d.schema)
        n_total = int(bodies["n_events_total"].sum())
        kept = int(rows["n_events"].sum())
        return SerializeResult(
            dataset=d.name, n_texts=len(rows), n_events=kept, n_events_total=n_total,
            n_cut=int((rows["n_events"].to_numpy() < bodies["n_events_total"].to_numpy()).sum()),
            max_tokens_seen=int(rows["n_tokens"].max()) if len(rows) else 0, parquet=str(parquet), header=head)
    finally:
        con.close()
