"""Fit each user's text into a token budget by dropping the oldest events; the header always stays.

Counting is exact for the tokenizer in use, and costs about what the kept text costs, not the
whole history:

- With a byte-level BPE tokenizer (GPT-2 style regex pre-tokenizer, no normalizer: SmolLM2,
  Llama 3, Qwen, GPT-2...) a line break that follows a non-space character always starts a new
  pre-token, and BPE never merges across pre-tokens. So a text's count is the sum of the counts
  of its pieces ("\n" + line), pieces repeat across texts (`"Channel": "pos",`, `<td>Comedy</td>`)
  and are counted once each in a batch (`TokenCounter`), and the budget is fitted by counting
  lines from the newest back until the budget is spent (`fit_texts`), never the dropped part.
- Any other tokenizer: each text is tokenized once, with character offsets, which tell how many
  tokens every suffix of the event lines takes; where BPE merges across the cut change the
  count, the cut text is tokenized once more and moved on by one line until it fits (rare).

Both give the same texts and counts (tests/producers/test_serialize.py compares them).
"""
from __future__ import annotations

import bisect
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

# Where a text may be cut into independently counted pieces: before a line break that follows a
# non-space character (after a space, the break may join a whitespace pre-token).
_PIECE_BREAK = re.compile(r"(?<=\S)(?=\n)")


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


class TokenCounter:
    """Exact token counts of many texts, each distinct piece counted once (see the module docstring).

    Falls back to tokenizing every text whole when the tokenizer does not split at line breaks.
    Keep one per stage run: the memo is what makes repeated lines free."""

    def __init__(self, tokenizer: Any, max_memo: int = 2_000_000):
        self.tokenizer = tokenizer
        self.by_piece = splits_at_line_breaks(tokenizer)
        self.max_memo = max_memo
        self.memo: dict[str, int] = {}

    def pieces(self, pieces: Sequence[str]) -> list[int]:
        """The count of each piece (each must start at a cut point: a text's start or a "\n")."""
        memo = self.memo
        new = list({p for p in pieces if p not in memo})
        if new:
            if len(memo) + len(new) > self.max_memo:
                memo.clear()
            fast = self.tokenizer.backend_tokenizer.encode_batch_fast
            for piece, encoding in zip(new, fast(new, add_special_tokens=False)):
                memo[piece] = len(encoding.ids)
        return [memo[p] for p in pieces]

    def __call__(self, texts: Sequence[str]) -> list[int]:
        if not self.by_piece:
            return count_tokens(self.tokenizer, texts)
        split = [_PIECE_BREAK.split(t) for t in texts]
        counts = self.pieces([p for parts in split for p in parts])
        out, at = [], 0
        for parts in split:
            out.append(sum(counts[at:at + len(parts)]))
            at += len(parts)
        return out


def fit_texts(tokenizer: Any, header: str, bodies: Sequence[str], budget: int,
              counter: TokenCounter | None = None) -> list[Fitted]:
    """`header + "\n" + body` for each body, cut to at most `budget` tokens (0: no budget)."""
    counter = counter or TokenCounter(tokenizer)
    if counter.by_piece and budget > 0 and header.strip() and not header[-1].isspace():
        return _fit_by_lines(counter, header, bodies, budget)
    return _fit_by_offsets(tokenizer, header, bodies, budget)


def _fit_by_lines(counter: TokenCounter, header: str, bodies: Sequence[str], budget: int) -> list[Fitted]:
    """Count each body's lines from the newest back, in batched rounds, until the budget is spent.

    A body with a line ending in a space (where counts may not add up) is fitted by offsets."""
    header_tokens = counter.pieces([header])[0]
    room = budget - header_tokens
    out: list[Fitted | None] = [None] * len(bodies)
    lines = {}
    for i, body in enumerate(bodies):
        if not body:
            out[i] = Fitted(header, 0, header_tokens)
            continue
        split = body.split("\n")
        if any(line[-1:].isspace() or not line for line in split):
            out[i] = _fit_by_offsets(counter.tokenizer, header, [body], budget)[0]
            continue
        lines[i] = split
    # Round 1 counts about the lines the budget can hold (from the mean characters per token of a
    # sample), later rounds twice as many; a line costs at least one token, so it ends.
    sample = [line for split in list(lines.values())[:50] for line in split[-20:]]
    chars_per_token = (sum(map(len, sample)) / max(1, sum(counter.pieces(["\n" + x for x in sample])))
                       if sample else 4.0)
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
        counts = counter.pieces(["\n" + line for _, take in asks for line in take])
        at, nxt = 0, {}
        for i, take in asks:
            done, used, chunk = state[i]
            split = lines[i]
            these = counts[at:at + len(take)]
            at += len(take)
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
