"""Fit each user's text into a token budget by dropping the oldest events; the header always stays.

Counting is exact for the tokenizer in use: each text is tokenized once, with character offsets,
which tell how many tokens every suffix of the event lines takes. Where BPE merges across the cut
change the count, the cut text is tokenized once more and moved on by one line until it fits
(rare). So no text is tokenized many times over.
"""
from __future__ import annotations

import bisect
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
    return [len(ids) for ids, _ in encode(tokenizer, texts)]


def fit_texts(tokenizer: Any, header: str, bodies: Sequence[str], budget: int) -> list[Fitted]:
    """`header + "\\n" + body` for each body, cut to at most `budget` tokens (0: no budget)."""
    texts = [f"{header}\n{body}" if body else header for body in bodies]
    if budget <= 0:
        return [Fitted(t, _n_lines(b), n) for t, b, n in zip(texts, bodies, count_tokens(tokenizer, texts))]
    header_tokens = count_tokens(tokenizer, [header])[0]
    out = []
    for text, body, (ids, offsets) in zip(texts, bodies, encode(tokenizer, texts)):
        if len(ids) <= budget:
            out.append(Fitted(text, _n_lines(body), len(ids)))
        else:
            out.append(_cut(tokenizer, header, header_tokens, text, offsets, budget))
    return out


def _cut(tokenizer: Any, header: str, header_tokens: int, text: str, offsets: Sequence[tuple[int, int]],
         budget: int) -> Fitted:
    # Each event line starts right after a newline; the kept text is header + text[newline:].
    breaks = [i for i, ch in enumerate(text) if ch == "\n"]
    starts = [start for start, _ in offsets]
    n_tokens = len(offsets)
    # The first line whose suffix fits: suffix tokens = tokens starting at or after its newline.
    k = len(breaks)
    for j, pos in enumerate(breaks):
        if header_tokens + n_tokens - bisect.bisect_left(starts, pos) <= budget:
            k = j
            break
    while k < len(breaks):
        candidate = header + text[breaks[k]:]
        n = count_tokens(tokenizer, [candidate])[0]
        if n <= budget:
            return Fitted(candidate, len(breaks) - k, n)
        k += 1
    return Fitted(header, 0, header_tokens)  # not even the newest event fits


def _n_lines(body: str) -> int:
    return body.count("\n") + 1 if body else 0
