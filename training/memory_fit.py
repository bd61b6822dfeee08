"""`--batch-tokens auto`: the largest batch that fits the GPU, measured on the run's own model and settings.

A probe runs the real step (forward + backward for fine-tuning, the pooled forward for embedding)
on rows of `row_tokens` random tokens, once to warm up and then at one and two rows, reads the CUDA
allocator's peak during each, and fits peak = fixed + per_token x tokens. What a batch adds grows
with its tokens (activations kept for backward; SDPA's kernels keep attention linear in them), while
weights, gradients, autocast copies and library workspaces do not. What the probe cannot see is added
by the caller (`extra_bytes`: AdamW's two float32 states appear at the first optimizer step, which
the probe never takes). The batch is the largest whole number of rows with

    fixed + extra + per_token x tokens <= headroom x (memory free before the model was loaded)

and at most `cap` tokens: past some size a bigger batch barely raises throughput, while fewer,
larger optimizer steps cost quality on data sets of a few million tokens.

Measured rather than computed from the model's shape because what a given torch/transformers
version keeps for backward (and what checkpointing, LoRA or a frozen bottom change) is not in
the config.

torch is imported inside functions only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

GIB = 2**30
HEADROOM = 0.8
"""Of the free memory: the allocator fragments under batches of varying shapes, and other libraries allocate too."""


class NotEnoughMemory(Exception):
    """Not even one row of `row_tokens` fits: the message says how much was needed and how much was there."""


@dataclass(frozen=True)
class MemoryLine:
    """Peak bytes of a step as a line in its tokens."""

    fixed_bytes: float
    per_token_bytes: float
    max_rows: int | None = None  # known from the probe: two rows ran out of memory

    def bytes_at(self, tokens: int) -> float:
        return self.fixed_bytes + self.per_token_bytes * tokens


def fit_line(small: tuple[int, float], large: tuple[int, float]) -> MemoryLine:
    """The line through two (tokens, peak bytes) points. A slope that is not positive (noise, or a
    peak that some other allocation decided) would promise unlimited room, so the larger point's
    bytes are then taken as if all of them grew with tokens: an overestimate, never an OOM."""
    (t1, p1), (t2, p2) = small, large
    if t2 <= t1:
        raise ValueError("the second point needs more tokens than the first")
    slope = (p2 - p1) / (t2 - t1)
    if slope <= 0:
        return MemoryLine(0.0, p2 / t2)
    return MemoryLine(max(p1 - slope * t1, 0.0), slope)


@dataclass(frozen=True)
class BatchFit:
    """The chosen token budget and the figures it came from (recorded with the run)."""

    tokens: int
    row_tokens: int
    line: MemoryLine
    free_bytes: float  # free on the device before the model was loaded
    extra_bytes: float
    cap: int
    headroom: float = HEADROOM
    limited_by: str = "memory"  # memory | cap | probe (two rows ran out of memory in the probe)

    @property
    def predicted_peak_bytes(self) -> float:
        return self.line.bytes_at(self.tokens) + self.extra_bytes

    def record(self) -> dict:
        return {"batch_tokens": self.tokens, "rows_of_max_length": self.tokens // self.row_tokens,
                "limited_by": self.limited_by, "cap": self.cap,
                "fixed_gib": round(self.line.fixed_bytes / GIB, 3),
                "per_token_mib": round(self.line.per_token_bytes / 2**20, 4),
                "extra_gib": round(self.extra_bytes / GIB, 3), "free_gib": round(self.free_bytes / GIB, 3),
                "headroom": self.headroom, "predicted_peak_gib": round(self.predicted_peak_bytes / GIB, 3)}

    def summary(self) -> str:
        why = {"cap": f"the cap of {self.cap:,}", "probe": "the probe: two rows ran out of memory",
               "memory": f"{self.headroom:.0%} of {self.free_bytes / GIB:.1f} GiB free"}[self.limited_by]
        return (f"--batch-tokens auto: {self.tokens:,} tokens ({self.tokens // self.row_tokens} rows of "
                f"{self.row_tokens}; {self.line.per_token_bytes / 2**20:.2f} MiB a token + "
                f"{(self.line.fixed_bytes + self.extra_bytes) / GIB:.2f} GiB fixed, measured; limited by {why})")


def tokens_that_fit(line: MemoryLine, free_bytes: float, extra_bytes: float, row_tokens: int, cap: int,
                    headroom: float = HEADROOM) -> BatchFit:
    """The largest whole number of rows within `headroom` of `free_bytes` and `cap` tokens (one row at least)."""
    room = headroom * free_bytes - extra_bytes - line.fixed_bytes
    if line.per_token_bytes > 0:
        rows = math.floor(room / (line.per_token_bytes * row_tokens))
    else:  # nothing measured per token (a meter that sees no activations, as in inference): only the cap limits
        rows = 2**62 if room >= 0 else 0
    if rows < 1:
        need = line.bytes_at(row_tokens) + extra_bytes
        raise NotEnoughMemory(f"one row of {row_tokens:,} tokens needs about {need / GIB:.1f} GiB "
                              f"({(line.fixed_bytes + extra_bytes) / GIB:.1f} GiB before any token), and "
                              f"{headroom:.0%} of the {free_bytes / GIB:.1f} GiB free is "
                              f"{headroom * free_bytes / GIB:.1f}")
    limits = {"memory": rows, "cap": max(cap // row_tokens, 1)}
    if line.max_rows is not None:
        limits["probe"] = line.max_rows
    limited_by = min(limits, key=lambda k: (limits[k], k != "probe"))  # a tie: the probe's OOM says most
    return BatchFit(limits[limited_by] * row_tokens, row_tokens, line, free_bytes, extra_bytes, cap, headroom,
                    limited_by)


class Meter(Protocol):
    """Where the probe reads memory: `start` once (the free bytes), then `measure(fn)` per point."""

    def start(self) -> float: ...

    def measure(self, fn: Callable[[], None]) -> float: ...


class CudaMeter:
    """The CUDA caching allocator's peak during `fn`, above what was allocated when `start` was called."""

    def __init__(self, device: Any):
        self.device, self.base = device, 0

    def start(self) -> float:
        import torch

        torch.cuda.empty_cache()  # cached blocks count as used in mem_get_info, though we could reuse them
        free, _ = torch.cuda.mem_get_info(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        return float(free)

    def measure(self, fn: Callable[[], None]) -> float:
        import torch

        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return float(torch.cuda.max_memory_allocated(self.device) - self.base)


class SavedTensorsMeter:
    """The bytes autograd keeps for backward during `fn` (each storage once), on any device.

    A CPU stand-in for the allocator's peak, for tests and gpu_check's dry run: it sees the
    activations, which is what grows with tokens, and not the transient buffers, weights or
    gradients. `free_bytes` is what `start` reports."""

    def __init__(self, free_bytes: float):
        self.free_bytes = free_bytes

    def start(self) -> float:
        return self.free_bytes

    def measure(self, fn: Callable[[], None]) -> float:
        import torch

        seen: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return float(sum(seen.values()))


def probe_line(step: Callable[[int], None], row_tokens: int, meter: Meter,
               out_of_memory: tuple[type[BaseException], ...] = ()) -> MemoryLine:
    """Fit the memory line of `step(rows)` (the real step on `rows` rows of `row_tokens` tokens).

    The first call warms up: gradients, cuBLAS workspaces and autocast caches appear there and
    belong to the fixed part. When two rows run out of memory (`out_of_memory`), one row is all
    that fits (`max_rows`); when one row does, NotEnoughMemory.
    """
    try:
        step(1)
    except out_of_memory:
        raise NotEnoughMemory(f"one row of {row_tokens:,} tokens ran out of memory") from None
    one = meter.measure(lambda: step(1))
    try:
        two = meter.measure(lambda: step(2))
    except out_of_memory:
        return MemoryLine(0.0, one / row_tokens, max_rows=1)
    return fit_line((row_tokens, one), (2 * row_tokens, two))
