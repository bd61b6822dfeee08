"""`llm4es embed`: user embeddings from a causal LLM's hidden states (paper §2, "Embeddings Extraction").

For each user text: the hidden states of the selected layers are averaged (mean over layers),
then averaged over the text's real tokens (the attention mask), in float32. The default layer
range is the authors' `hidden_states[9:]` of `output_hidden_states=True`, where index 0 is the
embedding output and the last index is the final (normed) hidden state.

The vector does not depend on how texts are batched: padding is masked out of attention and
of the mean, and positions come from the mask, so left padding gives what right padding gives.

How a run is laid out (per embeddings *set* = one model, checkpoint, layer range and text kind):

- `data/<schema>/embeddings_parts/<run_key>/batch-00012.parquet`: one file per batch, written
  atomically (temp file, then rename) as soon as the batch is done; `run.json` beside them holds
  what the run key was computed from. `run_key` hashes the model, checkpoint, layers, text kind
  and variant, max length, truncation, dtype and the texts themselves, so a run resumed after a
  crash reuses exactly the parts made from the same inputs and skips the users they hold.
- at the end the parts are merged into the DuckDB table `"<schema>".embeddings` in one
  transaction (rows with the same key `(user_id, model, checkpoint, layers, text_kind)` are
  replaced; a run over all users replaces the whole set), and the parts folder is deleted;
- the set is exported to `data/<schema>/embeddings/<model>__<checkpoint>__L<a>-<b>__<kind>-<hash>.parquet`
  (one file per set, so one file per epoch of a fine-tuning run), with the run's provenance as
  JSON under the `llm4es` key of the Parquet key-value metadata.

Column meanings: `feature_timestamp` is the time of the dataset's last event (the texts cover
every event up to it), the key a feature store uses for point-in-time joins; `model` is the model
asked for, or for a fine-tuned checkpoint the base model its `llm4es_checkpoint.json` names
(`model_source`); `checkpoint` is `base` for the model without fine-tuning, else the checkpoint
folder relative to the home directory (absolute when outside it); `layers` is the resolved
hidden-state range `start:stop` (e.g. `9:31` for SmolLM2-135M's 31 hidden states), so `9:` and
`-22:` name the same set.

torch and transformers are imported lazily: the CLI imports this module for its config.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producers.errors import Llm4esError
from producers.stores.outputs import LLM4ES, atomic_write_text, read_provenance, write_parquet
from producers.stores.provenance import code_version
from producers.stores.warehouse import Home, float32_lists, stored_definition, table_exists, transaction
from producers.shared.models import DEFAULT_MODEL, resolve_model
from validation.gate import require_valid

if TYPE_CHECKING:
    import numpy as np
    import torch

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "llm4es_checkpoint.json"
CPU_BATCH_TOKENS = 16_384
"""`batch_tokens="auto"` off the GPU: larger batches barely speed up a CPU and only hold more memory."""
AUTO_MAX_TOKENS = 65_536
"""The largest batch `batch_tokens="auto"` chooses on a GPU: gpu_check's embedding figure is taken at this size."""
BASE_CHECKPOINT = "base"
TABLE = LLM4ES.table
POOLING = "mean over the selected hidden states, then mean over the attention-masked tokens, in float32"
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

Log = Callable[[str], None]


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


# --------------------------------------------------------------------------------------------
# Layers and checkpoints


def resolve_layers(spec: str, n_hidden_states: int) -> range:
    """The hidden-state indices `spec` selects out of `n_hidden_states` (= layers + 1).

    `"9:"` is `hidden_states[9:]`, `"-4:"` the last four, `"a:b"` a Python slice, `"all"` every
    one (embedding output included), `"last"` the final hidden state, `"12"` just index 12.
    """
    s = spec.strip().lower()
    n = n_hidden_states
    try:
        if s == "all":
            chosen = range(n)
        elif s == "last":
            chosen = range(n - 1, n)
        elif ":" in s:
            a, b = s.split(":", 1)
            chosen = range(n)[slice(int(a) if a.strip() else None, int(b) if b.strip() else None)]
        else:
            i = int(s)
            if not -n <= i < n:
                raise EmbedError(f"layer {i} does not exist: the model has {n} hidden states (0 to {n - 1})")
            chosen = range(i % n, i % n + 1)
    except ValueError as e:
        if isinstance(e, EmbedError):
            raise
        raise EmbedError(f"layers {spec!r}: expected 'a:b' (either side optional), one index, 'all' or 'last'") from e
    if len(chosen) == 0:
        raise EmbedError(f"layers {spec!r} select none of the model's {n} hidden states "
                         f"(0 = embedding output, {n - 1} = last)")
    return chosen


def layers_label(chosen: range) -> str:
    return f"{chosen.start}:{chosen.stop}"


@dataclass(frozen=True)
class Checkpoint:
    """What to load: the base model (`path=None`) or a fine-tuned folder."""

    path: Path | None
    label: str  # the `checkpoint` column
    epoch: int | None
    info: dict  # llm4es_checkpoint.json


def find_checkpoints(home: Home, checkpoint: str | None) -> list[Checkpoint]:
    """The checkpoints `checkpoint` names: the base model, one epoch folder, or every epoch of a run folder."""
    if checkpoint is None:
        return [Checkpoint(None, BASE_CHECKPOINT, None, {})]
    path = Path(checkpoint).expanduser()
    if not path.is_absolute() and not path.exists() and (home.root / path).exists():
        path = home.root / path
    path = path.resolve()
    if not path.is_dir():
        raise EmbedError(f"checkpoint {checkpoint}: no such folder")
    # A run folder has a config.json too (the run's own), so the run's layout is looked for first.
    is_run = (path / "state.json").is_file() or (path / "models").is_dir()
    if not is_run and (path / "config.json").is_file():
        if not _is_model_config(path / "config.json"):
            raise EmbedError(f"checkpoint {checkpoint}: {path / 'config.json'} is not a model's config (no "
                             "model_type); expected a model folder or a fine-tuning run folder")
        return [_checkpoint(home, path)]
    models = _run_models(path)
    if not models:
        raise EmbedError(
            f"checkpoint {checkpoint}: neither a model folder (a config.json in it) nor a fine-tuning run folder "
            f"with saved models (models/epoch-E/ or models/step-N/ holding a config.json, as `llm4es finetune` "
            f"writes); found {_listing(path)}")
    return sorted((_checkpoint(home, p) for p in models),
                  key=lambda c: (c.info.get("global_step") is None, c.info.get("global_step") or 0,
                                 c.epoch is None, c.epoch or 0, c.label))


def _is_model_config(path: Path) -> bool:
    try:
        return "model_type" in json.loads(path.read_text())
    except (ValueError, OSError):
        return False


def _run_models(run: Path) -> list[Path]:
    """Every saved model of a run folder (or of its `models/` folder): epoch-E and step-N folders
    with a config.json; when state.json lists the run's models, exactly those (a killed save's
    leftovers are not models)."""
    folder = run / "models" if (run / "models").is_dir() else run
    names: list[str] | None = None
    state = run / "state.json"
    if state.is_file():
        try:
            listed = json.loads(state.read_text()).get("models")
            names = [str(n) for n in listed] if isinstance(listed, list) else None
        except ValueError:
            names = None
    if names is None:
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"(epoch|step)-\d+", p.name))
    return [folder / n for n in names if (folder / n / "config.json").is_file()
            and _is_model_config(folder / n / "config.json")]


def _listing(path: Path) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not entries:
        return "an empty folder"
    return ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")


def _checkpoint(home: Home, path: Path) -> Checkpoint:
    info: dict = {}
    if (path / CHECKPOINT_FILE).is_file():
        try:
            info = json.loads((path / CHECKPOINT_FILE).read_text())
        except ValueError as e:
            raise EmbedError(f"{path / CHECKPOINT_FILE}: not valid JSON ({e})") from e
    epoch = info.get("epoch") if isinstance(info, dict) else None
    if not isinstance(epoch, int):  # a step-N model's fractional epoch is no epoch of the table
        m = re.fullmatch(r"epoch-(\d+)", path.name)
        epoch = int(m.group(1)) if m else None
    try:
        label = str(path.relative_to(home.root))
    except ValueError:
        label = str(path)
    return Checkpoint(path, label, epoch, info if isinstance(info, dict) else {"value": info})


# --------------------------------------------------------------------------------------------
# The embedder: texts in, pooled vectors out


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


class _EarlyExit(Exception):
    """Raised by the hook that adds the deepest chosen hidden state: the layers after it are not run."""


class _LayerSum:
    """Forward hooks adding each selected hidden state's masked token sum into a float32 (batch, hidden) total.

    Works for decoder stacks shaped like Llama (`layers` + final `norm`); hidden state 0 is the
    first layer's input, state i the output of layer i-1, and the last one the normed output,
    as transformers' `output_hidden_states`. No hidden state outlives the layer after it.
    When the chosen range ends before the last state, the hook that adds its deepest state stops
    the forward (`_EarlyExit`): the layers after it, and the final norm, would only be thrown away.
    The states summed are the same tensors, so the vectors do not change; only the time does.
    """

    def __init__(self, base: Any, chosen: range):
        self.mask: torch.Tensor | None = None  # (batch, seq, 1) bool
        self.total: torch.Tensor | None = None
        layers, n = base.layers, len(base.layers) + 1
        deepest = max(chosen)
        self.early_exit = deepest < n - 1
        self.layers_run = deepest if self.early_exit else len(layers)
        self.handles = []
        if 0 in chosen:
            self.handles.append(layers[0].register_forward_pre_hook(
                self._pre_hook(stop=deepest == 0), with_kwargs=True))
        for i in chosen:
            if 1 <= i <= n - 2:
                self.handles.append(layers[i - 1].register_forward_hook(self._hook(stop=i == deepest)))
        if n - 1 in chosen:
            self.handles.append(base.norm.register_forward_hook(self._hook(stop=False)))

    @staticmethod
    def supports(base: Any) -> bool:
        import torch

        return isinstance(getattr(base, "layers", None), torch.nn.ModuleList) and isinstance(
            getattr(base, "norm", None), torch.nn.Module)

    def _pre_hook(self, stop: bool):
        def hook(module, args, kwargs):
            self.add(args[0] if args else kwargs["hidden_states"], stop)
        return hook

    def _hook(self, stop: bool):
        def hook(module, args, output):
            self.add(output[0] if isinstance(output, (tuple, list)) else output, stop)
        return hook

    def add(self, hidden: torch.Tensor, stop: bool = False) -> None:
        import torch

        # torch.where, not a product: a padded position may hold anything, NaN included.
        part = torch.where(self.mask, hidden.float(), 0.0).sum(dim=1)
        self.total = part if self.total is None else self.total.add_(part)
        if stop:
            raise _EarlyExit

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class Encoded:
    vectors: np.ndarray  # (n, hidden) float32
    n_tokens: np.ndarray  # real tokens per text
    padded_tokens: int


@dataclass
class Launched:
    """A batch whose forward has been queued: on a GPU its vectors are ready once `ready` has passed."""

    vectors: torch.Tensor  # (n, hidden) float32 on the host (pinned on a GPU machine)
    ready: Any  # a torch.cuda.Event recorded after the copy to the host; None when already done (CPU)
    n_tokens: np.ndarray
    padded_tokens: int

    def result(self) -> Encoded:
        import numpy as np

        if self.ready is not None:
            self.ready.synchronize()
        # a copy: the pinned buffer goes back to torch's cache while the part writer still reads the vectors
        return Encoded(np.array(self.vectors.numpy(), dtype=np.float32), self.n_tokens, self.padded_tokens)


class Embedder:
    """A loaded model and tokenizer that turn texts into pooled vectors (no warehouse involved)."""

    def __init__(self, model: Any, tokenizer: Any, layers: range, max_length: int, device: Any,
                 padding_side: str = "right", truncation_side: str = "left", add_special_tokens: bool = True,
                 pooling: str = "mean"):
        if padding_side not in ("left", "right") or truncation_side not in ("left", "right"):
            raise EmbedError("padding_side and truncation_side must be 'left' or 'right'")
        pooling_description(pooling)
        self.pooling = pooling
        self.padding_mask = False  # True sends the 2-D mask with right padding too (a check's baseline)
        self._newline = None  # "lines:K": which token ids hold a line break (built on first use)
        self.base = getattr(model, "base_model", model)
        self.tokenizer = tokenizer
        self.layers = layers
        self.max_length = max_length
        self.device = device
        self.add_special_tokens = add_special_tokens
        tokenizer.padding_side = padding_side
        tokenizer.truncation_side = truncation_side
        if tokenizer.pad_token is None:  # any id will do: padding is masked out
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            if tokenizer.pad_token is None:
                raise EmbedError("the tokenizer has no pad, eos or unk token to pad with")
        self._sum = _LayerSum(self.base, layers) if _LayerSum.supports(self.base) else None

    @classmethod
    def load(cls, model_path: str, tokenizer_path: str, config: EmbedConfig, log: Log = lambda _: None) -> Embedder:
        import torch
        from transformers import AutoModel

        from producers.shared.models import load_tokenizer

        device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, device)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if config.attn_implementation:
            kwargs["attn_implementation"] = config.attn_implementation
        log(f"loading {model_path} ({str(dtype).removeprefix('torch.')} on {device})")
        if config.dtype == "auto" and dtype == torch.float16:
            log(f"{device} has no bf16 tensor cores (compute capability below 8.0): float16, which is fast there; "
                "--dtype float32 if a vector overflows")
        # The bare decoder: no LM head, so no (batch, seq, vocab) logits are ever computed. Its load
        # report always lists an unused lm_head; we check the report ourselves instead.
        with _quiet_transformers():
            model, info = AutoModel.from_pretrained(model_path, output_loading_info=True, **kwargs)
        missing = info.get("missing_keys") or []
        if missing:
            raise EmbedError(f"{model_path}: weights missing from the checkpoint: {sorted(missing)[:5]}")
        model = model.to(device).eval()
        # --- CPU int8 hook (training/quantize.py, h-quality): the model transformation lives there ---
        if config.quantize:
            from training.quantize import quantize_for_cpu

            log(f"quantizing the linear layers to {config.quantize}")
            model = quantize_for_cpu(model, config.quantize, device)
        # --- end of the CPU int8 hook ---
        tokenizer = load_tokenizer(tokenizer_path)
        n_hidden = n_hidden_states(model.config)
        max_length = config.max_length
        limit = getattr(_text_config(model.config), "max_position_embeddings", None)
        if limit and max_length > limit:
            log(f"max_length {max_length} exceeds the model's {limit} positions; using {limit}")
            max_length = limit
        return cls(model, tokenizer, resolve_layers(config.layers, n_hidden), max_length, device,
                   config.padding_side, config.truncation_side, config.add_special_tokens, config.pooling)

    @property
    def layers_run(self) -> int:
        """Decoder layers one forward runs: fewer than all when the chosen states end early (early exit)."""
        if self._sum is not None:
            return self._sum.layers_run
        return n_decoder_layers(self.base.config)

    @property
    def hidden_size(self) -> int:
        return int(_text_config(self.base.config).hidden_size)

    def lengths(self, texts: Sequence[str], chunk: int = 1024) -> list[int]:
        """Token counts before truncation (so callers see what gets cut), in chunks so that no id lists pile up."""
        out: list[int] = []
        for start in range(0, len(texts), chunk):
            ids = self.tokenizer(list(texts[start:start + chunk]), add_special_tokens=self.add_special_tokens,
                                 return_attention_mask=False)["input_ids"]
            out.extend(len(x) for x in ids)
        return out

    def tokenize(self, texts: Sequence[str], chunk: int = 1024) -> tuple[list[list[int]], list[int]]:
        """Token ids cut to max_length on the truncation side (special tokens kept, as the tokenizer's
        own truncation does), and each text's length before the cut; tokenized once, in chunks."""
        head, tail = self._special_edges()
        room = self.max_length - head - tail
        if room < 1:
            raise EmbedError(f"max_length {self.max_length} leaves no room for text after the special tokens")
        left = self.tokenizer.truncation_side == "left"
        ids_out: list[list[int]] = []
        lengths: list[int] = []
        for start in range(0, len(texts), chunk):
            for ids in self.tokenizer(list(texts[start:start + chunk]), add_special_tokens=self.add_special_tokens,
                                      return_attention_mask=False)["input_ids"]:
                lengths.append(len(ids))
                if len(ids) > self.max_length:
                    body = ids[head:len(ids) - tail]
                    body = body[len(body) - room:] if left else body[:room]
                    ids = ids[:head] + body + ids[len(ids) - tail:]
                ids_out.append(list(ids))
        return ids_out, lengths

    def _special_edges(self) -> tuple[int, int]:
        """How many special tokens the tokenizer puts before and after a text (e.g. Llama 3: a BOS, 1 and 0)."""
        if not self.add_special_tokens:
            return 0, 0
        bare = self.tokenizer("a b c", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a b c", add_special_tokens=True)["input_ids"]
        for head in range(len(full) - len(bare) + 1):
            if full[head:head + len(bare)] == bare:
                return head, len(full) - len(bare) - head
        return 0, 0

    def encode(self, texts: Sequence[str]) -> Encoded:
        """Pooled float32 vectors of `texts`, run as one batch padded to its longest text."""
        return self.encode_ids(self.tokenize(texts)[0])

    def encode_ids(self, ids: Sequence[Sequence[int]]) -> Encoded:
        """Pooled float32 vectors of already tokenized (and cut) texts, as one padded batch."""
        return self.launch(ids).result()

    def encode_batches(self, batches: Iterable[Sequence[Sequence[int]]], ahead: int | None = None) -> Iterator[Encoded]:
        """`encode_ids` of each batch, in order, with `ahead` batches launched before a batch's vectors
        are waited for. On a GPU (default 1) the next forward is queued while the host waits for this
        one's vectors and writes them, so the GPU does not idle between batches; on the CPU the work is
        done at launch (default 0, so each batch is written as soon as it is computed)."""
        if ahead is None:
            ahead = 1 if self.device.type == "cuda" else 0
        queued: deque[Launched] = deque()
        for ids in batches:
            queued.append(self.launch(ids))
            if len(queued) > ahead:
                yield queued.popleft().result()
        while queued:
            yield queued.popleft().result()

    def launch(self, ids: Sequence[Sequence[int]]) -> Launched:
        """Queue one padded batch's forward; on a GPU it returns before the vectors are computed."""
        import numpy as np
        import torch

        n_tokens = np.array([len(x) for x in ids], dtype=np.int64)
        if len(ids) == 0 or int(n_tokens.min()) == 0:
            raise EmbedError("an empty text has no tokens to average")
        width = int(n_tokens.max())
        pad = self.tokenizer.pad_token_id
        batch = np.full((len(ids), width), pad, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        left = self.tokenizer.padding_side == "left"
        for row, x in enumerate(ids):
            at = width - len(x) if left else 0
            batch[row, at:at + len(x)] = x
            mask[row, at:at + len(x)] = 1
        cuda = self.device.type == "cuda"
        ids_t, mask_t = torch.from_numpy(batch), torch.from_numpy(mask)
        if cuda:  # pinned host memory: the copy to the GPU overlaps the work queued before it
            ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
        ids_t = ids_t.to(self.device, non_blocking=cuda)
        mask_t = mask_t.to(self.device, non_blocking=cuda)
        with torch.inference_mode():
            pooled = self._pool(ids_t, mask_t)
            ready = None
            if cuda:  # into pinned memory without waiting; `ready` passes once the copy is done
                host = torch.empty(pooled.shape, dtype=pooled.dtype, pin_memory=True)
                host.copy_(pooled, non_blocking=True)
                pooled, ready = host, torch.cuda.Event()
                ready.record()
        return Launched(pooled, ready, n_tokens, int(ids_t.numel()))

    def _pool(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        import torch

        keep = self._pooled_tokens(ids, mask).unsqueeze(-1)
        inputs = self._model_inputs(ids, mask)
        if self._sum is not None:
            self._sum.mask, self._sum.total = keep, None
            try:
                try:
                    self.base(**inputs, use_cache=False)
                except _EarlyExit:
                    pass
                total = self._sum.total
            finally:
                self._sum.mask, self._sum.total = None, None
        else:
            out = self.base(**inputs, use_cache=False, output_hidden_states=True)
            total = None
            for i in self.layers:
                part = torch.where(keep, out.hidden_states[i].float(), 0.0).sum(dim=1)
                total = part if total is None else total + part
            del out
        counts = keep.sum(dim=1).float()
        return total / (counts * len(self.layers))

    def _model_inputs(self, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        """The forward's inputs. Right-padded rows go without the padding mask: under the causal mask
        a real token never sees the padding to its right, and only real tokens are pooled, so the
        vectors are the same, and without a mask SDPA takes its causal kernel (flash on GPUs) instead
        of building a 4-D mask. Left padding needs the mask, and positions counted from it so that
        every text starts at position 0."""
        if self.tokenizer.padding_side == "right" and not self.padding_mask:
            return {"input_ids": ids}
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}

    def _pooled_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(batch, seq) bool: the tokens `pooling` averages (always real tokens, whatever the padding side)."""
        import torch

        real = mask.bool()
        if self.pooling == "mean":
            return real
        # the last real token of each row: its position is the largest one with a real token
        positions = torch.arange(real.shape[1], device=real.device).expand_as(real)
        last = torch.where(real, positions, -1).max(dim=1).values
        is_last = positions == last[:, None]
        if self.pooling == "last":
            return is_last
        k = int(self.pooling.split(":", 1)[1])
        if self._newline is None:
            vocab = range(len(self.tokenizer))
            self._newline = torch.tensor(["\n" in self.tokenizer.decode([i]) for i in vocab], device=ids.device)
        # a line break that ends the text closes the last line; it does not open another
        breaks = self._newline[ids.clamp(max=len(self._newline) - 1)] & real & ~is_last
        from_here = breaks.flip(1).cumsum(dim=1).flip(1)  # line breaks at this position or later
        return real & (from_here < k)

    def close(self) -> None:
        if self._sum is not None:
            self._sum.remove()
            self._sum = None


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


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


def pick_device(device: str = "auto") -> Any:
    """`auto`: LLM4ES_DEVICE when set, else this rank's GPU when CUDA is available, else the CPU."""
    from training.hardware import choose_device

    return choose_device(device, EmbedError)


def pick_dtype(dtype: str, device: Any) -> Any:
    """`auto`: float32 on the CPU (exact batch invariance), bfloat16 on a GPU with bf16 tensor cores, and
    float16 on an older GPU (V100, T4), which only emulates bf16; vectors that overflow float16 are
    refused by the embedding loop, not stored."""
    import torch

    from producers.shared.devices import native_bf16

    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if native_bf16(device) else torch.float16
    try:
        chosen = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                  "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise EmbedError(f"dtype {dtype!r}: expected auto, float32, bfloat16 or float16") from None
    return chosen


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if getter else config


def n_decoder_layers(config: Any) -> int:
    return n_hidden_states(config) - 1


def n_hidden_states(config: Any) -> int:
    """`len(output.hidden_states)`: the layers plus the embedding output."""
    return int(_text_config(config).num_hidden_layers) + 1


# --------------------------------------------------------------------------------------------
# The stage: warehouse texts in, table + Parquet out


@dataclass
class _Texts:
    schema: str
    user_type: str
    users: list  # ordered by user_id
    texts: list[str]
    source_hashes: list[str | None]
    digest: str  # of every (user, text) of this kind and variant, before limit_users
    as_of: datetime | None = None  # the last event time: the features' point-in-time timestamp


def embed(home: Home, dataset: str, config: EmbedConfig = EmbedConfig(), log: Log = lambda _: None) -> EmbedResult:
    """Embed every user's text with the model (or each checkpoint) into `"<schema>".embeddings` and Parquet."""
    if config.batch_tokens != "auto" and (not isinstance(config.batch_tokens, int) or config.batch_tokens < 1):
        raise EmbedError(f"batch_tokens must be a positive number of tokens or 'auto', not {config.batch_tokens!r}")
    if config.max_length < 1:
        raise EmbedError("max_length must be positive")
    data = _read_texts(home, dataset, config)
    checkpoints = find_checkpoints(home, config.checkpoint)
    result = EmbedResult(dataset=dataset)
    for ck in checkpoints:
        if len(checkpoints) > 1:
            log(f"checkpoint {ck.label} (epoch {ck.epoch})")
        result.sets.append(_embed_set(home, data, config, ck, log))
    return result


def _read_texts(home: Home, dataset: str, config: EmbedConfig) -> _Texts:
    con = home.connect(read_only=True)
    try:
        require_valid(con, dataset, config.force)
        d = stored_definition(con, dataset)
        if not table_exists(con, d.schema, "texts"):
            raise EmbedError(f"{dataset} has no texts: run `llm4es serialize {dataset}` first")
        rows = con.execute(f'SELECT user_id, text, source_hash FROM "{d.schema}".texts '
                           "WHERE kind = ? AND variant = ? ORDER BY user_id", [config.kind, config.variant]).fetchall()
        # The texts describe every event, so the features hold as of the last one (point-in-time key).
        as_of = con.execute(f'SELECT max(event_time) FROM "{d.schema}".events').fetchall()[0][0]
    finally:
        con.close()
    if not rows:
        raise EmbedError(f"{dataset} has no {config.kind!r} texts (variant {config.variant}): run `llm4es "
                         f"{'serialize' if config.kind == 'serialized' else 'enrich'} {dataset}` first")
    h = hashlib.sha256()
    for user, text, _ in rows:
        h.update(f"{user}\x00{len(text)}\x00".encode())
        h.update(text.encode())
    if config.limit_users is not None:
        rows = rows[:config.limit_users]
    if config.users is not None:
        wanted = set(config.users)
        rows = [r for r in rows if r[0] in wanted]
    return _Texts(d.schema, d.events.user_dtype, [r[0] for r in rows], [r[1] for r in rows],
                  [r[2] for r in rows], h.hexdigest(), as_of)


def _embed_set(home: Home, data: _Texts, config: EmbedConfig, ck: Checkpoint, log: Log) -> EmbedSet:
    """One set. Under torchrun / accelerate launch every process embeds its own length-balanced shard of
    the users into its own part files; after a barrier the first process merges and publishes."""
    import torch
    import transformers
    from tqdm.auto import tqdm

    from training.hardware import Progress, Ranks

    started = time.perf_counter()
    ranks = Ranks.from_env()
    say = log if ranks.main else (lambda _: None)
    # The base model is only fetched when needed: a checkpoint folder normally has its own tokenizer.
    if ck.path is None:
        model_path = tokenizer_path = resolve_model(config.model, progress=say)
    else:
        model_path = str(ck.path)
        tokenizer_path = model_path if _has_tokenizer(ck.path) else resolve_model(config.model, progress=say)
    # A fine-tuned checkpoint names its base model (`model_source` in llm4es_checkpoint.json).
    model_name = str(ck.info.get("model_source") or config.model)
    if model_name != config.model:
        say(f"{ck.label} was fine-tuned from {model_name}: recorded as its model")
    embedder = Embedder.load(model_path, tokenizer_path, config, say)
    total_layers = n_decoder_layers(embedder.base.config)
    if embedder.layers_run < total_layers:
        # not in the provenance: the vectors are the full forward's, only the time differs
        say(f"early exit: layers {layers_label(embedder.layers)} need {embedder.layers_run}"
            f" of {total_layers} decoder layers")
    group = _ProcessGroup.join(ranks, embedder.device)
    try:
        layers = layers_label(embedder.layers)
        dtype = str(next(embedder.base.parameters()).dtype).removeprefix("torch.")
        provenance = {
            "model": model_name, "model_path": model_path, "tokenizer_path": tokenizer_path,
            "checkpoint": ck.label, "checkpoint_info": ck.info, "epoch": ck.epoch,
            "layers": layers, "layers_spec": config.layers, "n_hidden_states": n_hidden_states(embedder.base.config),
            "pooling": pooling_description(config.pooling), "pooling_spec": config.pooling,
            "text_kind": config.kind, "variant": config.variant,
            "max_length": embedder.max_length, "truncation_side": config.truncation_side,
            "add_special_tokens": config.add_special_tokens, "dtype": dtype,
            "attn_implementation": config.attn_implementation, "texts_digest": data.digest,
            "quantize": config.quantize,
        }
        run_key = hashlib.sha256(json.dumps(provenance, sort_keys=True, default=str).encode()).hexdigest()[:16]
        key = {"model": model_name, "checkpoint": ck.label, "layers": layers, "text_kind": config.kind}
        done_before = _finished_set(home, data, key, run_key, config)
        if done_before is not None:
            say(f"{ck.label}: this set was already embedded from the same texts and settings ({run_key}); reusing it")
            return done_before
        parts = home.data_dir / data.schema / "embeddings_parts" / run_key
        if ranks.main:
            parts.mkdir(parents=True, exist_ok=True)
            if not (parts / "run.json").exists():
                atomic_write_text(parts / "run.json", json.dumps(provenance, indent=2, default=str) + "\n")
        group.barrier()
        done = _users_in_parts(parts)
        group.barrier()  # every process has read the parts before any writes new ones
        mine = shard_users([len(t) for t in data.texts], ranks.world_size)[ranks.rank]
        todo = [i for i in mine if data.users[i] not in done]
        n_resumed = len(mine) - len(todo)
        where = f" (process {ranks.rank} of {ranks.world_size}: {len(mine):,} users)" if ranks.distributed else ""
        if n_resumed:
            say(f"resuming {run_key}: {n_resumed:,} users already embedded, {len(todo):,} to go{where}")
        elif ranks.distributed:
            say(f"embedding {len(todo):,} users{where}")
        ids, lengths = embedder.tokenize([data.texts[i] for i in todo])  # once: planning and the model share it
        truncated = sum(n > embedder.max_length for n in lengths)
        batch_tokens = choose_batch_tokens(config.batch_tokens, embedder, say) if todo else None  # no probe for nothing
        batches = plan_batches([len(x) for x in ids], batch_tokens) if todo else []
        prefix = f"batch-r{ranks.rank:03d}-" if ranks.distributed else "batch-"
        next_index = _next_part_index(parts, prefix)
        tokens = padded = done_users = 0
        compute = 0.0
        progress = Progress(say, len(todo), "users")
        writer = _PartWriter()
        loop_started, loop_cpu = time.perf_counter(), time.process_time()
        try:
            bar = tqdm(batches, desc=f"embed {ck.label}", unit="batch", disable=None if ranks.main else True)
            encoded = embedder.encode_batches([ids[j] for j in batch] for batch in batches)
            for b, batch in enumerate(bar):
                rows = [todo[j] for j in batch]
                users = [data.users[i] for i in rows]
                t_batch = time.perf_counter()
                enc = next(encoded)  # on a GPU: launches the next batch, then waits for this one's vectors
                compute += time.perf_counter() - t_batch
                _refuse_non_finite(enc, users, dtype, ck.label)
                writer.submit(parts / f"{prefix}{next_index + b:05d}.parquet", users, enc,
                              [data.source_hashes[i] for i in rows])
                tokens += int(enc.n_tokens.sum())
                padded += enc.padded_tokens
                done_users += len(rows)
                bar.set_postfix_str(f"{tokens / max(time.perf_counter() - loop_started, 1e-9):,.0f} tok/s")
                progress.update(done_users, tokens)
            bar.close()
        finally:
            writer.close()
        seconds, cpu_seconds = time.perf_counter() - loop_started, time.process_time() - loop_cpu
        if truncated:
            say(f"{truncated:,} texts were longer than {embedder.max_length} tokens and cut on the "
                f"{config.truncation_side}")
        provenance.update(code_version=code_version(), run_key=run_key, transformers_version=transformers.__version__,
                          torch_version=torch.__version__, device=str(embedder.device),
                          num_processes=ranks.world_size, batch_tokens=batch_tokens)
        group.barrier()  # every shard is on disk
        outcome: dict[str, Any] = {}
        if ranks.main:
            try:
                n_users, dim, total_tokens = _merge(home, data, parts, key, ck.epoch,
                                                    full=config.limit_users is None and config.users is None,
                                                    expected_dim=embedder.hidden_size)
                provenance.update(n_users=n_users, dim=dim, tokens=total_tokens,
                                  produced_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
                parquet = _export(home, data.schema, key, provenance)
                shutil.rmtree(parts, ignore_errors=True)
                outcome = {"n_users": n_users, "dim": dim, "parquet": str(parquet)}
            except Exception as e:  # the other processes must hear of it, not wait forever
                outcome = {"error": f"{type(e).__name__}: {e}"}
                group.share(outcome)
                raise
        outcome = group.share(outcome)
        if "error" in outcome:
            raise EmbedError(f"process 0 could not merge the parts: {outcome['error']}")
        tokens_all, seconds_max = group.sum_max(tokens, seconds)
        _, compute_max = group.sum_max(0, compute)
        compute_tps = tokens_all / compute_max if compute_max > 0 else 0.0
        mfu = _embed_mfu(embedder, ids, compute_tps, ranks.world_size)
    finally:
        embedder.close()
        group.leave()
    return EmbedSet(model=model_name, checkpoint=ck.label, epoch=ck.epoch, layers=layers, text_kind=config.kind,
                    n_users=outcome["n_users"], n_computed=len(todo), n_resumed=n_resumed, n_truncated=truncated,
                    dim=outcome["dim"], tokens=tokens_all, padded_tokens=padded, seconds=seconds_max,
                    cpu_seconds=cpu_seconds, wall_seconds=time.perf_counter() - started,
                    tokens_per_s=tokens_all / seconds_max if seconds_max > 0 else 0.0, parquet=outcome["parquet"],
                    run_key=run_key, compute_seconds=compute_max, compute_tokens_per_s=compute_tps, mfu=mfu)


def _refuse_non_finite(enc: Encoded, users: list, dtype: str, checkpoint: str) -> None:
    """Stop before a batch with an inf or NaN vector is written: float16 can overflow, and a diverged
    checkpoint gives NaN. The batches before it stay on disk, so the same command resumes after them."""
    import numpy as np

    bad = [u for u, ok in zip(users, np.isfinite(enc.vectors).all(axis=1)) if not ok]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise EmbedError(f"{checkpoint}: the vectors of user {shown} are not finite (inf or NaN) in {dtype}; none "
                         "of them was stored. float16 overflows on some models: try --dtype float32 (or bfloat16 "
                         "on a GPU that has it). A fine-tuned checkpoint may also have diverged (see its losses).")


def _embed_mfu(embedder: Embedder, ids: list, tokens_per_s: float, processes: int) -> float | None:
    """2N + attention FLOPs per real token of the bare decoder (README), against the GPU's peak."""
    from training.hardware import model_flops_per_token, peak_flops

    peak, _ = peak_flops(embedder.device)
    if peak is None or not ids or tokens_per_s <= 0:
        return None
    n = [len(x) for x in ids]
    mean_context = sum(k * k for k in n) / sum(n) / 2
    flops = model_flops_per_token(embedder.base.config, mean_context, training=False, lm_head=False)
    flops *= embedder.layers_run / n_decoder_layers(embedder.base.config)  # both terms scale with the layers run
    return tokens_per_s * flops / (peak * processes)


def shard_users(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices of the users each process embeds: longest first, each to the process with the least
    text so far (ties to the lower rank), so every process gets about the same work; each shard
    in index order. A pure function of the lengths, so a resumed process finds its shard again."""
    import heapq

    shards: list[list[int]] = [[] for _ in range(world_size)]
    loads = [(0, r) for r in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, r = heapq.heappop(loads)
        shards[r].append(i)
        heapq.heappush(loads, (load + int(lengths[i]), r))
    return [sorted(s) for s in shards]


class _ProcessGroup:
    """The torch.distributed group of a multi-process embed (a no-op for one process).

    Joins the launcher's group (gloo on CPUs, nccl on GPUs) unless one is already set up, and
    leaves it again only if it made it.
    """

    def __init__(self, dist: Any = None, owned: bool = False, device: Any = None):
        self.dist, self.owned, self.device = dist, owned, device

    @classmethod
    def join(cls, ranks: Any, device: Any) -> _ProcessGroup:
        if not ranks.distributed:
            return cls()
        import torch.distributed as dist

        owned = False
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                import torch

                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend)
            owned = True
        return cls(dist, owned, device if dist.get_backend() == "nccl" else None)

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def share(self, obj: dict) -> dict:
        """Process 0's `obj`, on every process."""
        if self.dist is None:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def sum_max(self, tokens: int, seconds: float) -> tuple[int, float]:
        """Tokens of all processes, and the slowest process's loop time."""
        if self.dist is None:
            return tokens, seconds
        import torch

        t = torch.tensor([float(tokens)], dtype=torch.float64, device=self.device)
        s = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM)
        self.dist.all_reduce(s, op=self.dist.ReduceOp.MAX)
        return int(t.item()), float(s.item())

    def leave(self) -> None:
        if self.dist is not None and self.owned:
            self.dist.destroy_process_group()
            self.dist = None


class _PartWriter:
    """Writes part files on one background thread, so the model does not wait for Parquet; at most
    two parts wait in memory. `close` waits for every part and re-raises a failed write."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-parts")
        self.pending: list = []

    def submit(self, path: Path, users: list, enc: Encoded, source_hashes: list) -> None:
        while len(self.pending) >= 2:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(_write_part, path, users, enc, source_hashes))

    def close(self) -> None:
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pending = []
            self.pool.shutdown(wait=True)


def _finished_set(home: Home, data: _Texts, key: dict, run_key: str, config: EmbedConfig) -> EmbedSet | None:
    """The exported set, when a finished run with this run key made it for all users (else None)."""
    path = parquet_path(home, data.schema, key)
    if config.limit_users is not None or config.users is not None or not path.is_file():
        return None
    try:
        provenance = read_provenance(path)
    except (KeyError, ValueError, OSError):
        return None
    if provenance.get("run_key") != run_key or provenance.get("n_users") != len(data.users):
        return None
    return EmbedSet(model=key["model"], checkpoint=key["checkpoint"], epoch=provenance.get("epoch"),
                    layers=key["layers"], text_kind=key["text_kind"], n_users=provenance["n_users"], n_computed=0,
                    n_resumed=provenance["n_users"], n_truncated=0, dim=provenance["dim"], tokens=0, padded_tokens=0,
                    seconds=0.0, cpu_seconds=0.0, wall_seconds=0.0, tokens_per_s=0.0, parquet=str(path),
                    run_key=run_key)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _users_in_parts(parts: Path) -> set:
    import pyarrow.parquet as pq

    done: set = set()
    for f in sorted(parts.glob("batch-*.parquet")):
        done.update(pq.read_table(f, columns=["user_id"]).column("user_id").to_pylist())
    return done


def _next_part_index(parts: Path, prefix: str = "batch-") -> int:
    pattern = re.escape(prefix) + r"(\d+)\.parquet"
    indices = [int(m.group(1)) for f in parts.glob(f"{prefix}*.parquet") if (m := re.fullmatch(pattern, f.name))]
    return max(indices, default=-1) + 1


def _write_part(path: Path, users: list, enc: Encoded, source_hashes: list) -> None:
    """One batch's rows, written to a temp file and renamed: a part on disk is always whole."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(users)
    vectors = float32_lists(enc.vectors)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    table = pa.table({"user_id": pa.array(users), "vector": vectors,
                      "n_tokens": pa.array(enc.n_tokens.astype(np.int32)),
                      "source_hash": pa.array(source_hashes, type=pa.string()),
                      "produced_at": pa.array([now] * n, type=pa.timestamp("us"))})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def ensure_table(con: Any, schema: str, user_type: str) -> None:
    con.execute(f'''CREATE TABLE IF NOT EXISTS "{schema}".{TABLE} (
        user_id {user_type}, vector FLOAT[], dim INTEGER, model VARCHAR, checkpoint VARCHAR, epoch INTEGER,
        layers VARCHAR, text_kind VARCHAR, feature_timestamp TIMESTAMP, produced_at TIMESTAMP, source_hash VARCHAR,
        code_version VARCHAR)''')
    # Tables made before feature_timestamp existed get it (NULL until their sets are embedded again).
    con.execute(f'ALTER TABLE "{schema}".{TABLE} ADD COLUMN IF NOT EXISTS feature_timestamp TIMESTAMP')


def _merge(home: Home, data: _Texts, parts: Path, key: dict, epoch: int | None, full: bool,
           expected_dim: int) -> tuple[int, int, int]:
    """Parts -> table, replacing the set (or, for a partial run, its rows for these users) in one transaction."""
    files = sorted(parts.glob("batch-*.parquet"))
    if not files:
        raise EmbedError("nothing was embedded")
    listing = "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"
    where = " AND ".join(f"{k} = ${k}" for k in key)
    con = home.connect()
    try:
        ensure_table(con, data.schema, data.user_type)
        con.execute(f"""CREATE OR REPLACE TEMP TABLE embed_staging AS
            SELECT user_id::{data.user_type} AS user_id, vector::FLOAT[] AS vector, len(vector)::INTEGER AS dim,
                   $model AS model, $checkpoint AS checkpoint, $epoch::INTEGER AS epoch, $layers AS layers,
                   $text_kind AS text_kind, $feature_timestamp::TIMESTAMP AS feature_timestamp, produced_at,
                   source_hash, $code_version AS code_version, n_tokens
            FROM read_parquet({listing})
            QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY produced_at DESC) = 1""",
                    {**key, "epoch": epoch, "code_version": code_version(), "feature_timestamp": data.as_of})
        n_users, n_dims, min_dim, tokens = con.execute(
            "SELECT count(*), count(DISTINCT dim), min(dim), sum(n_tokens) FROM embed_staging").fetchone()
        if n_dims != 1 or min_dim != expected_dim:
            raise EmbedError(f"the parts in {parts} hold vectors of other sizes than the model's hidden size "
                             f"{expected_dim}; delete the folder and run again")
        with transaction(con):
            scope = "" if full else " AND user_id IN (SELECT user_id FROM embed_staging)"
            con.execute(f'DELETE FROM "{data.schema}".{TABLE} WHERE {where}{scope}', key)
            con.execute(f'INSERT INTO "{data.schema}".{TABLE} BY NAME SELECT * EXCLUDE (n_tokens) FROM embed_staging')
        con.execute("DROP TABLE embed_staging")
    finally:
        con.close()
    return int(n_users), int(min_dim), int(tokens or 0)


def parquet_path(home: Home, schema: str, key: dict) -> Path:
    """`data/<schema>/embeddings/<model>__<checkpoint>__L<a>-<b>__<kind>-<hash>.parquet`."""
    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-80:] or "_"

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    name = (f"{slug(key['model'])}__{slug(key['checkpoint'])}__L{key['layers'].replace(':', '-')}"
            f"__{slug(key['text_kind'])}-{digest}")
    return LLM4ES.parquet_path(home, schema, name)


def _export(home: Home, schema: str, key: dict, provenance: dict) -> Path:
    """The set's rows, as merged into the warehouse table, to its Parquet copy (the one write path for files)."""
    con = home.connect(read_only=True)
    try:
        where = " AND ".join(f"{k} = ${k}" for k in key)
        rel = con.sql(f'SELECT * FROM "{schema}".{TABLE} WHERE {where} ORDER BY user_id', params=key)
        table = (getattr(rel, "to_arrow_table", None) or rel.arrow)()  # DuckDB 1.x calls it arrow()
    finally:
        con.close()
    return write_parquet(table, parquet_path(home, schema, key), dict(sorted(provenance.items())))
