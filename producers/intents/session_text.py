"""One session as compact prompt text: a header line, then one line per event.

    Session of 7 website clicks on 2024-03-02, 4 min
    +0s | Page type: home
    +35s | Page type: product | Page: cards/cashback | Dwell: 42.00

Offsets count from the session's first event. Empty values and fields with `serialize: false`
are left out; codes are shown by their descriptions (the same SQL renderings as the serialized
user texts, `producers.serialize.render`). SQL fetches the rendered values, Python lays them out
(`format_session` is pure, `read_session_texts` reads).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import duckdb

from producers.datasets.definition import DatasetDefinition
from producers.intents.config import IntentsError, TextConfig
from producers.stores.warehouse import sql_str, table_exists
from producers.serialize.render import value_text

SEP = " | "


@dataclass(frozen=True)
class SessionEvent:
    offset_s: float  # seconds since the session's first event
    values: list[tuple[str, str]]  # (field label, rendered value), non-empty only


@dataclass(frozen=True)
class SessionHead:
    session_id: str
    start_time: datetime
    duration_s: float
    n_events: int


def format_offset(seconds: float) -> str:
    """+35s, +4m05s, +2h03m, +3d04h: short and sortable by eye."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"+{s}s"
    if s < 3600:
        return f"+{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"+{s // 3600}h{s % 3600 // 60:02d}m"
    return f"+{s // 86400}d{s % 86400 // 3600:02d}h"


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{int(round(seconds))} s"
    if seconds < 90 * 60:
        return f"{int(round(seconds / 60))} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_session(head: SessionHead, events: list[SessionEvent], event_noun: str = "events",
                   max_events: int = 30, max_chars: int = 2500) -> str:
    """Header + event lines; at most `max_events` lines and about `max_chars` characters.

    The first events are kept (a visitor's goal shows early); a last line says how many were cut.
    """
    noun = event_noun if head.n_events != 1 else event_noun.rstrip("s")
    lines = [f"Session of {head.n_events} {noun} on {head.start_time:%Y-%m-%d}, {format_duration(head.duration_s)}"]
    size = len(lines[0])
    shown = 0
    for event in events[:max_events]:
        line = SEP.join([format_offset(event.offset_s), *(f"{label}: {value}" for label, value in event.values)])
        if shown and size + 1 + len(line) > max_chars:
            break
        if not shown and size + 1 + len(line) > max_chars:  # one line alone too long: cut it
            line = line[: max(0, max_chars - size - 2)] + "…"
        lines.append(line)
        size += 1 + len(line)
        shown += 1
    if shown < head.n_events:
        lines.append(f"... ({head.n_events - shown} more)")
    return "\n".join(lines)


def require_session_tables(con: duckdb.DuckDBPyConnection, d: DatasetDefinition) -> None:
    for table in ("sessions", "session_events"):
        if not table_exists(con, d.schema, table):
            raise IntentsError(f"{d.name} has no {d.schema}.{table} table: run `llm4es sessions build {d.name}` first")


def read_session_texts(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, session_ids: list[str],
                       text: TextConfig = TextConfig()) -> dict[str, str]:
    """{session_id: text} for the given sessions (ids without a session are left out)."""
    require_session_tables(con, d)
    if not session_ids:
        return {}
    schema = f'"{d.schema}"'
    fields = d.serialized_fields
    joins, values = [], []
    for i, f in enumerate(fields):
        alias = None
        if f.codes:
            alias = f"c{i}"
            joins.append(f"LEFT JOIN {schema}.codes AS {alias} ON {alias}.code_table = {sql_str(f.codes)} "
                         f'AND {alias}.code = CAST(e."{f.name}" AS VARCHAR)')
        col = 'e."' + f.name + '"'
        values.append(f'{value_text(f, col, alias)} AS "v{i}"')
    ids = "SELECT DISTINCT unnest(CAST($ids AS VARCHAR[])) AS session_id"
    heads = con.execute(
        f"SELECT s.session_id, s.start_time, s.duration_s, s.n_events FROM {schema}.sessions AS s "
        f"JOIN ({ids}) AS i USING (session_id)", {"ids": list(session_ids)}).fetchall()
    rows = con.execute(
        f"SELECT e.session_id, e.position, epoch(e.event_time) - epoch(s.start_time) AS offset_s"
        f"{''.join(', ' + v for v in values)} "
        f"FROM {schema}.session_events AS e JOIN ({ids}) AS i USING (session_id) "
        f"JOIN {schema}.sessions AS s ON s.session_id = e.session_id {' '.join(joins)} "
        f"WHERE e.position <= $max_events ORDER BY e.session_id, e.position",
        {"ids": list(session_ids), "max_events": text.max_events}).fetchall()
    events: dict[str, list[SessionEvent]] = {}
    for session_id, _, offset, *rendered in rows:
        pairs = [(f.display, v.strip()) for f, v in zip(fields, rendered) if v is not None and v.strip()]
        events.setdefault(session_id, []).append(SessionEvent(float(offset or 0.0), pairs))
    return {sid: format_session(SessionHead(sid, start, float(duration or 0.0), int(n)), events.get(sid, []),
                                d.event_noun, text.max_events, text.max_chars)
            for sid, start, duration, n in heads}


def sample_sessions(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, n: int | None, seed: int,
                    min_events: int = 1, salt: str = "") -> list[str]:
    """A deterministic sample: sessions ordered by md5(session_id, seed, salt), the first n (None/0: all).

    md5 rather than random(): the same seed gives the same sessions on every machine and DuckDB
    version, and a larger n extends a smaller n's sample instead of drawing a new one.
    """
    require_session_tables(con, d)
    limit = f"LIMIT {int(n)}" if n else ""
    rows = con.execute(
        f'SELECT session_id FROM "{d.schema}".sessions WHERE n_events >= $min '
        f"ORDER BY md5(session_id || ':' || $key), session_id {limit}",
        {"min": min_events, "key": f"{seed}:{salt}"}).fetchall()
    return [r[0] for r in rows]
