"""Fit each user's text into a token budget by dropping the oldest events; the header always stays.

Counting is exact for the tokenizer in use: each text is tokenized once, with character offsets,
which tell how many tokens every suffix of the event lines takes. Where BPE merges across the cut
change the count, the cut text is tokenized once more and moved on by one line until it fits
(rare). So no text is tokenized many times over.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Fitted:
    text: str
    n_events: int
    n_tokens: int


def encode(tokenizer: Any, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(token ids, character offsets) per text, without special tokens (BOS/EOS are the trainer's business).

    Fast tokenizers go straight to their Rust backend: batched on all cores, and without
    transformers' warning about texts longer than the model's context (we are measuring them).
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)  # tokenizers >= 0.20: no offsets, ~2x faster
    if texts and fast is not None:
        return [len(e.ids) for e in fast(list(texts), add_special_tokens=False)]
    return [len(ids) for ids, _ in encode(tokenizer, texts)]


def fit_texts(tokenizer: Any, header: str, bodies: Sequence[str], budget: int) -> list[Fitted]:
    """`header + "\n" + body` for each body, cut to at most `budget` tokens (0: no budget)."""
    texts = [f"{header}\n{body}" if body else header for body in bodies]
    encoded = encode(tokenizer, texts)
    if budget <= 0:
        return [Fitted(t, _n_lines(b), len(ids)) for t, b, (ids, _) in zip(texts, bodies, encoded)]
    header_tokens = count_tokens(tokenizer, [header])[0]
    out: list[Fitted | None] = []
    pending: dict[int, tuple[str, list[int], int]] = {}  # index -> (text, newline positions, line to start at)
    for i, (text, body, (ids, offsets)) in enumerate(zip(texts, bodies, encoded)):
        if len(ids) <= budget:
            out.append(Fitted(text, _n_lines(body), len(ids)))
            continue
        breaks = [m.start() for m in re.finditer("\n", text)]
        starts = [start for start, _ in offsets]
        # The oldest line whose suffix fits, counting the tokens that start at or after its newline.
        k = next((j for j, pos in enumerate(breaks)
                  if header_tokens + len(ids) - bisect.bisect_left(starts, pos) <= budget), len(breaks))
        out.append(None)
        pending[i] = (text, breaks, k)
    # BPE merges across the cut can change the count: verify every cut text exactly, all in one
    # batch, and move the rare ones that do not fit on by a line.
    while pending:
        items = [(i, t, b, k) for i, (t, b, k) in pending.items()]
        candidates = [header + t[b[k]:] if k < len(b) else header for _, t, b, k in items]
        pending = {}
        for (i, text, breaks, k), candidate, n in zip(items, candidates, count_tokens(tokenizer, candidates)):
            if n <= budget or k >= len(breaks):
                out[i] = Fitted(candidate, len(breaks) - k, n)
            else:
                pending[i] = (text, breaks, k + 1)
    return out  # type: ignore[return-value]


def _n_lines(body: str) -> int:
    return body.count("\n") + 1 if body else 0
