"""Fit each user's text into a token budget by dropping the oldest events; the header always stays.

Counting is exact for the tokenizer in use, and costs about what the kept text costs, not the
whole history:

- With a byte-level BPE tokenizer (GPT-2 style regex pre-tokenizer, no normalizer: SmolLM2,
  Llama 3, Qwen, GPT-2...) a line break that follows a non-space character always starts a new
  pre-token, and BPE never merges across pre-tokens: a text's count is the sum of its lines'
  counts (each with its leading "\n"). So lines are counted from the newest back, in batched
  rounds of about what the budget can hold, until the budget is spent (`_fit_by_lines`); the
  older part of a long history is never tokenized.
- Any other tokenizer: each text is tokenized once, with character offsets, which tell how many
  tokens every suffix of the event lines takes; where BPE merges across the cut change the
  count, the cut text is tokenized once more and moved on by one line until it fits (rare).

Both give the same texts and counts (tests/producers/test_serialize.py compares them). A text
format plugs in by rendering each event as one line (no line break inside an event), which is
what both paths cut at.
"""
from __future__ import annotations

import bisect
import json
import math
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


def splits_at_line_breaks(tokenizer: Any) -> bool:
    """Whether counts add up over pieces cut before "\n" (see the module docstring): a fast
    tokenizer with no normalizer, a byte-level regex pre-tokenizer (optionally after digit
    splitting) without a prefix space, and a BPE model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return False
    try:
        spec = json.loads(backend.to_str())
    except (ValueError, AttributeError):
        return False
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = [p for p in steps if p.get("type") == "ByteLevel"]
    return (spec.get("normalizer") is None and (spec.get("model") or {}).get("type") == "BPE"
            and len(byte_level) == 1 and all(p.get("type") in ("ByteLevel", "Digits") for p in steps)
            and byte_level[0].get("use_regex", True) and not byte_level[0].get("add_prefix_space", False))


def fit_texts(tokenizer: Any, header: str, bodies: Sequence[str], budget: int) -> list[Fitted]:
    """`header + "\n" + body` for each body, cut to at most `budget` tokens (0: no budget)."""
    if budget > 0 and header.strip() and not header[-1].isspace() and splits_at_line_breaks(tokenizer):
        return _fit_by_lines(tokenizer, header, bodies, budget)
    return _fit_by_offsets(tokenizer, header, bodies, budget)


def line_counts(tokenizer: Any, chunks: Sequence[list[str]]) -> list[list[int]]:
    """For each list of lines, the tokens of each line with its leading "\n" (exact where
    `splits_at_line_breaks`): one text per list, tokenized once with offsets."""
    texts = ["\n" + "\n".join(lines) for lines in chunks]
    out = []
    for lines, (_, offsets) in zip(chunks, encode(tokenizer, texts)):
        starts = [start for start, _ in offsets]
        at, bounds = 0, []
        for line in lines:
            bounds.append(bisect.bisect_left(starts, at))
            at += len(line) + 1
        bounds.append(len(starts))
        out.append([bounds[k + 1] - bounds[k] for k in range(len(lines))])
    return out


def _fit_by_lines(tokenizer: Any, header: str, bodies: Sequence[str], budget: int) -> list[Fitted]:
    """Count each body's lines from the newest back, in batched rounds, until the budget is spent.

    A body with an empty line or a line ending in a space (where counts may not add up) is
    fitted by offsets over the whole text."""
    header_tokens = count_tokens(tokenizer, [header])[0]
    room = budget - header_tokens
    out: list[Fitted | None] = [None] * len(bodies)
    lines = {}
    for i, body in enumerate(bodies):
        if not body:
            out[i] = Fitted(header, 0, header_tokens)
            continue
        split = body.split("\n")
        if any(line[-1:].isspace() or not line for line in split):
            out[i] = _fit_by_offsets(tokenizer, header, [body], budget)[0]
            continue
        lines[i] = split
    # Round 1 counts about the lines the budget can hold (from the mean characters per token of a
    # sample), later rounds twice as many; a line costs at least one token, so it ends.
    sample = [split[-20:] for split in list(lines.values())[:50]]
    sample_tokens = sum(map(sum, line_counts(tokenizer, sample)))
    chars_per_token = sum(len(x) for lines_ in sample for x in lines_) / max(1, sample_tokens) if sample else 4.0
    state = {i: (0, 0, 0) for i in lines}  # index -> (lines counted from the end, their tokens, next chunk)
    for i, split in lines.items():
        mean_chars = sum(map(len, split[-20:])) / min(20, len(split)) + 1
        state[i] = (0, 0, max(4, math.ceil(1.25 * room * chars_per_token / mean_chars)))
    while state:
        asks = []
        for i, (done, _, chunk) in state.items():
            split = lines[i]
            take = split[max(0, len(split) - done - chunk):len(split) - done]
            asks.append((i, take))
        nxt = {}
        for (i, _), these in zip(asks, line_counts(tokenizer, [take for _, take in asks])):
            done, used, chunk = state[i]
            split = lines[i]
            finished = False
            for n in reversed(these):
                if used + n > room:
                    finished = True
                    break
                used += n
                done += 1
            if finished or done == len(split):
                kept = split[len(split) - done:]
                text = header + "\n" + "\n".join(kept) if kept else header
                out[i] = Fitted(text, done, header_tokens + used)
            else:
                nxt[i] = (done, used, chunk * 2)
        state = nxt
    return out  # type: ignore[return-value]


def _fit_by_offsets(tokenizer: Any, header: str, bodies: Sequence[str], budget: int) -> list[Fitted]:
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
