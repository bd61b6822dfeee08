"""What `llm4es embed` is asked for (`EmbedConfig`), what it reports (`EmbedSet`, `EmbedResult`), and the
pooling specs. No torch here: the CLI reads these defaults for its options."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from producers.errors import Llm4esError
from producers.shared.models import DEFAULT_MODEL
from producers.stores.outputs import LLM4ES

CPU_BATCH_TOKENS = 16_384
"""`batch_tokens="auto"` off the GPU: larger batches barely speed up a CPU and only hold more memory."""
AUTO_MAX_TOKENS = 65_536
"""The largest batch `batch_tokens="auto"` chooses on a GPU: gpu_check's embedding figure is taken at this size."""
TABLE = LLM4ES.table
POOLING = "mean over the selected hidden states, then mean over the attention-masked tokens, in float32"

Log = Callable[[str], None]

# Which tokens the layer-averaged hidden states are averaged over (`embed --pooling`):
POOLINGS = {
    "mean": POOLING,
    "last": "mean over the selected hidden states at the text's last real token (no mean over tokens), in float32",
    "lines": "mean over the selected hidden states, then mean over the tokens of the text's last K lines "
             "(K events; a day of events in the compact format), in float32",
}


def pooling_description(pooling: str) -> str:
    """What a `pooling` spec ("mean", "last", "lines:K") averages, for the provenance; checks the spec."""
    name, _, k = pooling.partition(":")
    if name not in POOLINGS or (name == "lines") != bool(k) or (k and not (k.isdigit() and int(k) > 0)):
        raise EmbedError(f"pooling {pooling!r}: expected 'mean', 'last' or 'lines:K' with K >= 1")
    return POOLINGS[name].replace(" K ", f" {k} ") if k else POOLINGS[name]


class EmbedError(Llm4esError, ValueError):
    """The embedding run cannot be done as asked (no texts, an empty layer range, a bad checkpoint...)."""


@dataclass(frozen=True)
class EmbedConfig:
    model: str = DEFAULT_MODEL  # registry name, model folder or hub id (a checkpoint's own marker names its base)
    checkpoint: str | None = None  # None: the base model; an `epoch-E` folder; or a run folder (every epoch)
    kind: str = "serialized"  # which texts to embed
    variant: int = 0
    layers: str = "9:"  # hidden-state range: "9:" (the authors'), "-4:", "a:b", "all", "last", or one index
    max_length: int = 2048  # tokens per text; longer texts are cut on `truncation_side`
    # padded tokens per batch (texts sorted by length); "auto": on a GPU the largest batch its free memory
    # holds (measured, at most AUTO_MAX_TOKENS), on a CPU CPU_BATCH_TOKENS
    batch_tokens: int | str = "auto"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPUs with it, else float16; or float32 | bfloat16 | float16
    device: str = "auto"  # auto: cuda when available; or cpu | cuda | cuda:1 ...
    padding_side: str = "right"  # the vectors do not depend on it; right keeps real tokens at positions 0..n-1
    truncation_side: str = "left"  # left keeps the most recent events, as `serialize` does
    add_special_tokens: bool = True  # the tokenizer's own default (SmolLM2 adds none, Llama 3 a BOS)
    attn_implementation: str | None = "sdpa"  # sdpa | eager (both mask padding); None: transformers' choice
    limit_users: int | None = None  # the first N users by id
    users: tuple | None = None  # only these users (a refresh): their rows are replaced, the others' kept
    force: bool = False  # run even if the dataset failed validation
    quantize: str | None = None  # CPU only: "int8" = int8 dynamic quantization of nn.Linear (training/quantize.py)
    # which tokens are averaged: "mean" (every real token, the paper's), "last" (the last token), or
    # "lines:K" (the last K lines); see POOLINGS and benchmarks/embed_choices.py for how they compare
    pooling: str = "mean"


@dataclass
class EmbedSet:
    """One embeddings set: one model + checkpoint + layer range + text kind."""

    model: str
    checkpoint: str
    epoch: int | None
    layers: str
    text_kind: str
    n_users: int  # users in the set after this run (resumed + computed)
    n_computed: int  # users embedded by this call
    n_resumed: int  # users taken from the parts of an interrupted run
    n_truncated: int  # texts cut to max_length (this call)
    dim: int
    tokens: int  # real tokens embedded by this call
    padded_tokens: int  # tokens fed to the model, padding included
    seconds: float  # the batch loop (tokenize, forward, pool, write parts), wall clock
    cpu_seconds: float  # the same loop in process CPU time (steadier on a shared machine)
    wall_seconds: float  # the whole set: loading, batches, merge, export
    tokens_per_s: float  # real tokens per second of the batch loop (`seconds`)
    parquet: str
    run_key: str
    compute_seconds: float = 0.0  # of the loop, in the model (copy in, forward, pooling, copy out)
    compute_tokens_per_s: float = 0.0
    mfu: float | None = None  # on a GPU of known peak: compute tokens/s x (2N + attention) / peak (README)


@dataclass
class EmbedResult:
    dataset: str
    sets: list[EmbedSet] = field(default_factory=list)

    @property
    def n_users(self) -> int:
        return max((s.n_users for s in self.sets), default=0)

    @property
    def dim(self) -> int:
        return self.sets[0].dim if self.sets else 0

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.sets)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.sets)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def parquet(self) -> list[str]:
        return [s.parquet for s in self.sets]
