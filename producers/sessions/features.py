"""Session encoder inputs, read from `"<schema>".session_events` with one DuckDB query.

Each events field by its definition `kind` (the session column itself is skipped):
- categorical: the `max_categories` most frequent values (over every session event; ties broken by
  value) get codes 2..K+1; any other value and NULL get 1 (OOV); 0 is padding;
- numeric (numeric dtype): sign(x) * ln(1 + |x|), standardised by its mean and standard deviation
  over every session event; NULL, NaN, infinities -> 0 with a missing flag 1;
- text: lower-cased words (split on blanks and punctuation), the first `max_tokens` of each value,
  each hashed (crc32) into 1..text_buckets; 0 is padding (the model averages them with an EmbeddingBag);
- the time since the previous event of the session: ln(1 + gap_s), standardised likewise.

A session longer than `max_events` keeps its last `max_events` events. Events are stored end to
end (`offsets` per session) and padded per batch by `collate`. The vocabularies and statistics
(`Vocab`) are fitted on the data and saved in the checkpoint; encoding for inference uses the
checkpoint's. `digest` hashes the encoded inputs: it is the data version of a run.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import duckdb
import numpy as np

from producers.datasets.definition import DatasetDefinition
from producers.sessions.config import SessionEncoderConfig, SessionsError


@dataclass
class Vocab:
    categorical: dict[str, list[str]]  # field -> values given codes 2.. in order
    numeric: dict[str, tuple[float, float]]  # field -> (mean, std) of sign*log1p
    text: list[str]  # text fields
    gap: tuple[float, float]  # (mean, std) of log1p(gap_s)
    text_buckets: int
    max_tokens: int
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Vocab":
        return cls(categorical={k: list(v) for k, v in d["categorical"].items()},
                   numeric={k: tuple(v) for k, v in d["numeric"].items()}, text=list(d["text"]),
                   gap=tuple(d["gap"]), text_buckets=d["text_buckets"], max_tokens=d["max_tokens"],
                   skipped=list(d.get("skipped", [])))

    def sizes(self) -> dict[str, int]:
        """Embedding rows per categorical field: padding, OOV, then the values."""
        return {k: len(v) + 2 for k, v in self.categorical.items()}


@dataclass
class Sessions:
    """Every session's kept events, end to end; arrays have one extra all-zero padding row at the end."""
    session_ids: list[str]
    user_ids: list[Any]
    ends: list[Any]  # sessions.end_time
    offsets: np.ndarray  # int64 [n_sessions + 1]
    n_events: np.ndarray  # events per session before cutting to max_events
    cat: np.ndarray  # int64 [E + 1, n_categorical]
    num: np.ndarray  # float32 [E + 1, 2 * n_numeric]: standardised values, then missing flags
    txt: np.ndarray  # int64 [E + 1, n_text, max_tokens]
    gap: np.ndarray  # float32 [E + 1]
    digest: str

    @property
    def n(self) -> int:
        return len(self.session_ids)

    @property
    def pad(self) -> int:
        return len(self.gap) - 1

    def events(self, i: int) -> np.ndarray:
        return np.arange(self.offsets[i], self.offsets[i + 1])


@dataclass
class Raw:
    """The query's result: values per event (flattened lists), before encoding."""
    session_ids: list[str]
    user_ids: list[Any]
    ends: list[Any]
    offsets: np.ndarray
    n_events: np.ndarray
    columns: dict[str, Any]  # field -> flat arrow array (text: a flat list<varchar> of words)
    gap_s: np.ndarray


def fields(d: DatasetDefinition) -> tuple[list[str], list[str], list[str], list[str]]:
    """(categorical, numeric, text, skipped descriptions) of the events fields the encoder reads."""
    cat, num, txt, skipped = [], [], [], []
    for f in d.events.fields:
        if f.name == d.events.sessions.column:
            skipped.append(f"{f.name} (the session column)")
        elif f.kind == "categorical":
            cat.append(f.name)
        elif f.is_number:
            num.append(f.name)
        elif f.kind == "numeric":
            skipped.append(f"{f.name} (numeric field of dtype {f.dtype})")
        else:
            txt.append(f.name)
    return cat, num, txt, skipped


def read_raw(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, config: SessionEncoderConfig,
             sessions: list[str] | None = None) -> Raw:
    """Every session's (or only these `sessions`') last `max_events` events, one LIST per field ordered by
    position, sessions by id."""
    cat, num, txt, _ = fields(d)
    s = f'"{d.schema}"'
    # fields are qualified (e.): an events field may share a name with a column of `sessions`
    lists = [f'list(CAST(e."{c}" AS VARCHAR) ORDER BY e.position) AS "c:{c}"' for c in cat]
    lists += [f'list(CAST(e."{c}" AS DOUBLE) ORDER BY e.position) AS "n:{c}"' for c in num]
    lists += [f"""list(coalesce(list_filter(string_split_regex(lower(e."{c}"), '[\\s[:punct:]]+'),
                      lambda w: w <> '')[1:{config.max_tokens}], []) ORDER BY e.position) AS "t:{c}\"""" for c in txt]
    try:
        table = con.sql(f"""
            SELECT e.session_id, any_value(s.user_id) AS user_id, any_value(s.end_time) AS end_time,
                   any_value(s.n_events) AS n_events, list(e.gap_s ORDER BY e.position) AS gap_s
                   {''.join(', ' + x for x in lists)}
            FROM {s}.session_events e JOIN {s}.sessions s USING (session_id)
            WHERE e.position > s.n_events - $max_events
                  {'' if sessions is None else 'AND e.session_id IN (SELECT unnest($sessions))'}
            GROUP BY e.session_id ORDER BY e.session_id""",
            params={"max_events": config.max_events, **({} if sessions is None else {"sessions": list(sessions)})}
        ).to_arrow_table()
    except duckdb.CatalogException as e:
        raise SessionsError(f"{d.name} has no sessions table: run `llm4es sessions build {d.name}` first ({e})") from e
    if table.num_rows == 0:
        raise SessionsError(f"{d.name} has no sessions" + ("" if sessions is None else " of those asked for"))
    if sessions is not None and table.num_rows != len(set(sessions)):
        got = set(table.column("session_id").to_pylist())
        raise SessionsError(f"{d.name}: {len(set(sessions)) - table.num_rows:,} sessions asked for are not in "
                            f"its sessions table (e.g. {sorted(set(sessions) - got)[:5]})")
    gap_col = table.column("gap_s").combine_chunks()
    offsets = gap_col.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    columns = {}
    for name in table.column_names:
        if name[:2] in ("c:", "n:", "t:"):
            columns[name] = table.column(name).combine_chunks().flatten()
    return Raw(session_ids=table.column("session_id").to_pylist(), user_ids=table.column("user_id").to_pylist(),
               ends=table.column("end_time").to_pylist(), offsets=offsets,
               n_events=table.column("n_events").to_numpy().astype(np.int64), columns=columns,
               gap_s=np.asarray(gap_col.flatten().to_numpy(zero_copy_only=False), dtype=np.float64))


def fit_vocab(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, config: SessionEncoderConfig) -> Vocab:
    """Vocabularies and statistics over every session event (not only the kept ones)."""
    cat, num, txt, skipped = fields(d)
    se = f'"{d.schema}".session_events'
    categorical = {}
    for c in cat:
        rows = con.execute(f"""SELECT CAST("{c}" AS VARCHAR) AS v FROM {se} WHERE "{c}" IS NOT NULL
                               GROUP BY 1 ORDER BY count(*) DESC, v LIMIT {config.max_categories}""").fetchall()
        categorical[c] = [r[0] for r in rows]
    numeric = {}
    for c in num:
        x = f'CAST("{c}" AS DOUBLE)'
        mean, std = con.execute(f"""SELECT avg(v), stddev_pop(v) FROM (SELECT sign({x}) * ln(1 + abs({x})) AS v
                                    FROM {se} WHERE isfinite({x}))""").fetchall()[0]
        numeric[c] = _stats(mean, std)
    mean, std = con.execute(f"SELECT avg(ln(1 + gap_s)), stddev_pop(ln(1 + gap_s)) FROM {se}").fetchall()[0]
    return Vocab(categorical=categorical, numeric=numeric, text=txt,
                 gap=_stats(mean, std), text_buckets=config.text_buckets,
                 max_tokens=config.max_tokens, skipped=skipped)


def _stats(mean: float | None, std: float | None) -> tuple[float, float]:
    """(mean, std) to 9 significant digits: DuckDB sums doubles in parallel, so the last bits differ
    between calls on the same data, and these values are part of the encoder's run key."""
    return float(f"{mean or 0.0:.9g}"), float(f"{std:.9g}") if std else 1.0


def encode(raw: Raw, vocab: Vocab) -> Sessions:
    """The raw values as model inputs, with the vocabulary and statistics of `vocab`."""
    import pandas as pd

    n_ev = len(raw.gap_s)
    cat = np.zeros((n_ev + 1, len(vocab.categorical)), dtype=np.int64)
    for j, (c, values) in enumerate(vocab.categorical.items()):
        col = pd.Series(raw.columns[f"c:{c}"].to_pandas(), dtype=object)
        codes = pd.Index(values).get_indexer(col)  # -1 where not in the vocabulary (or NULL)
        cat[:n_ev, j] = np.where(codes < 0, 1, codes + 2)
    num = np.zeros((n_ev + 1, 2 * len(vocab.numeric)), dtype=np.float32)
    k = len(vocab.numeric)
    for j, (c, (mean, std)) in enumerate(vocab.numeric.items()):
        x = np.asarray(raw.columns[f"n:{c}"].to_numpy(zero_copy_only=False), dtype=np.float64)
        ok = np.isfinite(x)
        v = np.sign(x) * np.log1p(np.abs(np.where(ok, x, 0.0)))
        num[:n_ev, j] = np.where(ok, (v - mean) / std, 0.0)
        num[:n_ev, k + j] = (~ok).astype(np.float32)
    txt = np.zeros((n_ev + 1, len(vocab.text), vocab.max_tokens), dtype=np.int64)
    for j, c in enumerate(vocab.text):
        words = raw.columns[f"t:{c}"]  # list<varchar> per event
        word_offsets = words.offsets.to_numpy().astype(np.int64)
        word_offsets = word_offsets - word_offsets[0]
        flat = words.flatten().to_numpy(zero_copy_only=False)
        if len(flat):
            uniques, inverse = np.unique(flat.astype(str), return_inverse=True)
            buckets = np.array([zlib.crc32(w.encode()) % vocab.text_buckets + 1 for w in uniques], dtype=np.int64)
            ids = buckets[inverse]
            lengths = np.diff(word_offsets)
            row = np.repeat(np.arange(n_ev), lengths)
            slot = np.arange(len(ids)) - np.repeat(word_offsets[:-1], lengths)
            keep = slot < vocab.max_tokens
            txt[row[keep], j, slot[keep]] = ids[keep]
    gap = np.zeros(n_ev + 1, dtype=np.float32)
    gap[:n_ev] = (np.log1p(np.maximum(raw.gap_s, 0.0)) - vocab.gap[0]) / vocab.gap[1]
    digest = hashlib.sha256()
    digest.update(json.dumps([raw.session_ids, vocab.as_dict()], default=str).encode())
    for a in (raw.offsets, cat, num, txt, gap):
        digest.update(np.ascontiguousarray(a).tobytes())
    return Sessions(session_ids=raw.session_ids, user_ids=raw.user_ids, ends=raw.ends, offsets=raw.offsets,
                    n_events=raw.n_events, cat=cat, num=num, txt=txt, gap=gap, digest=digest.hexdigest())


def collate(data: Sessions, rows: list[np.ndarray], max_len: int) -> dict[str, Any]:
    """Pad the given event-index lists (each into `data`'s arrays, at most max_len long) into tensors."""
    import torch

    length = max(len(r) for r in rows)
    assert length <= max_len
    idx = np.full((len(rows), length), data.pad, dtype=np.int64)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = r
    mask = idx != data.pad  # True at real events
    return {"cat": torch.from_numpy(data.cat[idx]), "num": torch.from_numpy(data.num[idx]),
            "txt": torch.from_numpy(data.txt[idx]), "gap": torch.from_numpy(data.gap[idx]),
            "mask": torch.from_numpy(mask)}


def load(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, config: SessionEncoderConfig,
         vocab: Vocab | None = None) -> tuple[Sessions, Vocab]:
    """Read and encode every session (fitting the vocabulary when none is given)."""
    vocab = vocab or fit_vocab(con, d, config)
    return encode(read_raw(con, d, config), vocab), vocab
