"""Small helpers the intent stages share: back-end calls in batches, names, paths."""
from __future__ import annotations

import time
from typing import Any, Callable

from producers.enrich.backends import Backend, GenerationError, make_backend
from producers.enrich.options import LLMOptions

Log = Callable[[str], None]


def backend_for(options: LLMOptions, backend: Backend | None, log: Log) -> Backend:
    if backend is not None:
        return backend
    if options.backend == "lexical":  # the word-overlap labeller (producers.intents.lexical), not an LLM
        from producers.intents.lexical import LexicalBackend

        return LexicalBackend()
    return make_backend(options, log=log)


def model_name(options: LLMOptions, backend: Backend) -> str:
    """What the cache and reports record as the model: a test back end may name its own."""
    return str(getattr(backend, "model", None) or options.model)


def tqdm_disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # None: tqdm shows bars on a terminal only


def generate_batched(backend: Backend, prompts: list, seeds: list[int], progress: bool | None = None,
                     desc: str = "llm", on_batch: Callable[[list[int], list, float], None] | None = None
                     ) -> tuple[list[str | GenerationError], list[float]]:
    """All prompts through the back end in its batch size: (answers, seconds per prompt).

    `on_batch(indices, answers, seconds_each)` runs after every call (the label cache is written
    there, so a killed run loses at most one batch).
    """
    from tqdm.auto import tqdm

    size = max(1, int(getattr(backend, "batch_size", 1) or 1))
    answers: list[Any] = [None] * len(prompts)
    latency = [0.0] * len(prompts)
    batches = [list(range(i, min(i + size, len(prompts)))) for i in range(0, len(prompts), size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=tqdm_disable(progress)):
        t0 = time.perf_counter()
        out = backend.generate([prompts[i] for i in batch], [seeds[i] for i in batch])
        each = (time.perf_counter() - t0) / len(batch)
        if len(out) != len(batch):
            raise RuntimeError(f"the {backend.name} backend returned {len(out)} answers for {len(batch)} prompts")
        for i, text in zip(batch, out):
            answers[i], latency[i] = text, each
        if on_batch is not None:
            on_batch(batch, list(out), each)
    return answers, latency



def md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
