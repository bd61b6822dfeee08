"""Fine-tuning data: the mixture's texts, tokenized once, batched as a pure function of (seed, epoch).

Token ids live in one flat int32 array plus offsets (a list of Python ints per text would take
~7x the memory on the larger datasets). A training *item* is a tuple of text indices: one text
without packing, several texts concatenated up to `max_length` with packing. Batches of items
are recomputed from `(seed, epoch)` alone, so a resumed run replays exactly the batches an
uninterrupted run would have seen.

torch is imported lazily (only `collate` needs it).
"""
from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from producers.shared.mixture import Mixture, MixtureError, check_available
from producers.stores.warehouse import WarehouseError, table_exists

IGNORE_INDEX = -100
"""Label value the causal-LM loss skips (padding, and the first token of every packed text)."""


@dataclass
class MixtureTexts:
    """Provenance of the texts one mixture selects, read in `ORDER BY user_id, kind, variant`."""

    n_texts: int
    per_kind: dict[str, int]
    source_hashes: list[str]
    sha256: str  # of the selected rows, so a resume can tell the data changed


@dataclass
class TokenizedTexts:
    """Text `i` is `ids[offsets[i]:offsets[i + 1]]`, EOS included."""

    ids: np.ndarray  # int32, all texts back to back
    offsets: np.ndarray  # int64, len(texts) + 1
    n_truncated: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def text(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]


def read_mixture_tokens(con, schema: str, mixture: Mixture, tokenizer, max_length: int,
                        chunk: int = 1000) -> tuple[MixtureTexts, TokenizedTexts]:
    """Stream the mixture's texts out of the warehouse and tokenize them chunk by chunk.

    Only token ids are kept: the texts of the larger datasets (hundreds of thousands of
    2048-token texts) would take as much memory again as Python strings.
    """
    if not table_exists(con, schema, "texts"):
        raise WarehouseError(f"{schema} has no texts table: run `llm4es serialize` (and `llm4es enrich`) first")
    per_kind = check_available(con, schema, mixture)
    digest, source_hashes = hashlib.sha256(), set()

    def chunks() -> Iterator[list[str]]:
        cursor = con.execute(f'SELECT user_id, kind, variant, text, source_hash FROM "{schema}".texts '
                             f"WHERE {mixture.where()} ORDER BY user_id, kind, variant")
        while rows := cursor.fetchmany(chunk):
            for user_id, kind, variant, text, source_hash in rows:
                digest.update(f"{user_id}\x1f{kind}\x1f{variant}\x1f{text}\x1e".encode())
                source_hashes.add(source_hash)
            yield [row[3] for row in rows]

    tokens = tokenize_texts(tokenizer, chunks(), max_length)
    if not len(tokens):
        raise MixtureError(f"mixture {mixture} selects no texts in {schema}")
    info = MixtureTexts(n_texts=len(tokens), per_kind=per_kind,
                        source_hashes=sorted(h for h in source_hashes if h is not None), sha256=digest.hexdigest())
    return info, tokens


def tokenize_texts(tokenizer, chunks: Iterable[Sequence[str]], max_length: int) -> TokenizedTexts:
    """Tokenize with the tokenizer's own special tokens (BOS where it adds one), cut to
    `max_length - 1` tokens from the right and end every text with EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; fine-tuning appends one to every text")
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    eos = tokenizer.eos_token_id
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    n_truncated = 0
    for texts in chunks:
        for ids in tokenizer(list(texts))["input_ids"]:
            if len(ids) > max_length - 1:
                n_truncated += 1
                ids = ids[:max_length - 1]
            pieces.append(np.asarray([*ids, eos], dtype=np.int32))
            lengths.append(len(ids) + 1)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return TokenizedTexts(ids=flat, offsets=offsets, n_truncated=n_truncated)


def single_items(n_texts: int) -> list[tuple[int, ...]]:
    return [(i,) for i in range(n_texts)]


def pack_items(lengths: np.ndarray, max_length: int) -> list[tuple[int, ...]]:
    """Best-fit decreasing: each text, longest first, goes into the fullest pack it still fits.

    Deterministic (ties by text index) and independent of seed and epoch, so every epoch has
    the same number of packs; which packs form a batch still changes per epoch.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, pack index), sorted
    for i in order:
        n = int(lengths[i])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, p = free.pop(at)
        else:
            room, p = max_length, len(packs)
            packs.append([])
        packs[p].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, p))
    return [tuple(sorted(p)) for p in packs]


def epoch_batches(item_lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                  group_by_length: bool, batch_tokens: int | None = None) -> list[list[int]]:
    """Batches of item indices for one epoch; a pure function of its arguments.

    With `group_by_length`, items are shuffled, stably sorted by length (so equal lengths mix
    differently every epoch), cut into batches of similar lengths, and the full batches shuffled.
    With `batch_tokens` (which needs `group_by_length`), a batch is as many items as fit
    rows x longest <= batch_tokens (one item at least), so short texts come many to a batch; the
    cuts fall at the same lengths every epoch, so every epoch has the same number of batches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(item_lengths))
    if group_by_length:
        order = order[np.argsort(item_lengths[order], kind="stable")]
    if batch_tokens is not None:
        if not group_by_length:
            raise ValueError("batch_tokens needs group_by_length (batches of similar lengths)")
        cuts = token_budget_cuts(item_lengths[order], batch_tokens)
        batches = [order[a:b].tolist() for a, b in zip(cuts, cuts[1:])]
        return [batches[j] for j in rng.permutation(len(batches))]
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if group_by_length:
        # A short last batch stays last: accelerate's multi-process sharding expects that.
        full = len(order) // batch_size
        batches = [batches[j] for j in rng.permutation(full)] + batches[full:]
    return batches


def token_budget_cuts(sorted_lengths: np.ndarray, batch_tokens: int) -> list[int]:
    """Boundaries [0, ..., n] cutting ascending lengths into runs of rows x longest <= batch_tokens."""
    cuts, start = [0], 0
    for i, n in enumerate(sorted_lengths):
        if i > start and (i - start + 1) * int(n) > batch_tokens:
            cuts.append(i)
            start = i
    if cuts[-1] != len(sorted_lengths):
        cuts.append(len(sorted_lengths))
    return cuts


class EpochBatchSampler:
    """A batch sampler whose batches `epoch_batches` decides; `set_epoch` picks the epoch.

    accelerate shards it across processes (and `skip_first_batches` wraps it) by iterating it,
    so setting the epoch on this object reaches every wrapper.
    """

    def __init__(self, item_lengths: np.ndarray, batch_size: int, seed: int, group_by_length: bool,
                 batch_tokens: int | None = None):
        self.item_lengths = item_lengths
        # accelerate's BatchSamplerShard reads batch_size; None tells it batches vary in size
        self.batch_size = None if batch_tokens is not None else batch_size
        self._rows, self.batch_tokens = batch_size, batch_tokens
        self.seed, self.group_by_length = seed, group_by_length
        self.epoch = 0
        self.drop_last = False  # read by accelerate's BatchSamplerShard

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(epoch_batches(self.item_lengths, self._rows, self.seed, self.epoch, self.group_by_length,
                                  self.batch_tokens))

    def __len__(self) -> int:
        if self.batch_tokens is not None:
            return len(token_budget_cuts(np.sort(self.item_lengths), self.batch_tokens)) - 1
        return (len(self.item_lengths) + self._rows - 1) // self._rows


class ItemDataset:
    """Map-style dataset: item `k` is the list of token arrays of its texts."""

    def __init__(self, tokens: TokenizedTexts, items: list[tuple[int, ...]]):
        self.tokens, self.items = tokens, items
        self.lengths = np.array([sum(int(tokens.lengths[i]) for i in item) for item in items], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> list[np.ndarray]:
        return [self.tokens.text(i) for i in self.items[k]]


def make_collate(pad_id: int, packed: bool, padding_mask: bool = False) -> Callable[[list[list[np.ndarray]]], dict]:
    """Right-padded batches; labels are -100 on padding (by position, not by id: pad may equal EOS).

    Without packing: `input_ids`, `labels`, and an `attention_mask` only with `padding_mask`: under
    a causal mask a real token never sees the padding to its right and padding carries no label, so
    the loss is the same without it, and without it SDPA takes its causal kernel (flash on GPUs)
    instead of building a 4-D mask. With packing: `input_ids`,
    `position_ids` restarting at 0 for every text (and for the padding tail), `labels` with the
    first token of every text masked so no text is trained to follow another, and no
    `attention_mask`: from restarting position ids transformers 5 builds a block-diagonal
    causal mask itself (eager and sdpa alike; `masking_utils.find_packed_sequence_indices`),
    provided the forward gets `use_cache=False` (with a cache it assumes one sequence per row).
    `n_tokens` counts real (non-pad) tokens and is not a model input.
    """

    def collate(batch: list[list[np.ndarray]]) -> dict:
        import torch

        width = max(sum(len(t) for t in texts) for texts in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        for row, texts in enumerate(batch):
            at = 0
            for t in texts:
                n = len(t)
                ids[row, at:at + n] = torch.from_numpy(t.astype(np.int64))
                labels[row, at + 1:at + n] = ids[row, at + 1:at + n]
                positions[row, at:at + n] = torch.arange(n)
                at += n
            mask[row, :at] = 1
            positions[row, at:] = torch.arange(width - at)
        out = {"input_ids": ids, "labels": labels, "n_tokens": mask.sum()}
        if packed:
            out["position_ids"] = positions
        elif padding_mask:
            out["attention_mask"] = mask
        return out

    return collate
