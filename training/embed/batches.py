"""How texts are cut into batches: by a token budget, longest first; "auto" sizes the budget to the GPU."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from training.embed.config import AUTO_MAX_TOKENS, CPU_BATCH_TOKENS, EmbedError, Log

if TYPE_CHECKING:
    from training.embed.embedder import Embedder


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices into `lengths`, longest first, cut so that batch size x longest length <= batch_tokens.

    The longest batch comes first, so running out of memory shows at once, not at the end.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        if current and (len(current) + 1) * longest > batch_tokens:
            batches.append(current)
            current = []
        if not current:
            longest = max(int(lengths[i]), 1)
        current.append(i)
    if current:
        batches.append(current)
    return batches


def choose_batch_tokens(requested: int | str, embedder: Embedder, say: Log = lambda _: None) -> int:
    """`requested`, or for "auto" CPU_BATCH_TOKENS off the GPU and on it `measure_batch_tokens`.
    Not in the run key: batches change the vectors only within the dtype's tolerance."""
    if requested != "auto":
        return int(requested)
    if embedder.device.type != "cuda":
        return CPU_BATCH_TOKENS
    from training.memory_fit import NotEnoughMemory

    try:
        fit = measure_batch_tokens(embedder)
    except NotEnoughMemory as e:
        raise EmbedError(f"the model does not fit for embedding at --max-length {embedder.max_length} on this GPU: "
                         f"{e}. Try a smaller --max-length or --dtype bfloat16") from None
    say(fit.summary())
    return fit.tokens


def measure_batch_tokens(embedder: Embedder, meter=None):
    """The `training.memory_fit.BatchFit` of `embedder` on its GPU: `encode_ids` probed on rows of
    max_length random tokens (the model is loaded already: the free memory is what batches can use)."""
    import numpy as np
    import torch

    from training.memory_fit import CudaMeter, probe_line, tokens_that_fit

    meter = meter or CudaMeter(embedder.device)
    free = meter.start()
    rng = np.random.default_rng(0)
    vocab = embedder.base.get_input_embeddings().num_embeddings
    n = embedder.max_length

    def step(rows: int) -> None:
        embedder.encode_ids([rng.integers(3, vocab, n).tolist() for _ in range(rows)])

    try:
        line = probe_line(step, n, meter, (torch.OutOfMemoryError,))
    finally:
        if embedder.device.type == "cuda":
            torch.cuda.empty_cache()
    return tokens_that_fit(line, free, 0.0, n, AUTO_MAX_TOKENS)
