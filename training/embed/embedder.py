"""The embedder: texts in, pooled vectors out (no warehouse involved).

The hidden states of the chosen layers are summed by forward hooks as the forward runs (`_LayerSum`),
masked to the pooled tokens, so no hidden state outlives the layer after it, and the forward stops
after the deepest chosen layer. torch and transformers are imported inside the functions.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from training.embed.config import EmbedConfig, EmbedError, Log, pooling_description
from training.embed.layers import n_decoder_layers, n_hidden_states, resolve_layers, text_config

if TYPE_CHECKING:
    import numpy as np
    import torch


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
        limit = getattr(text_config(model.config), "max_position_embeddings", None)
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
        return int(text_config(self.base.config).hidden_size)

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


def pick_device(device: str = "auto") -> Any:
    """`auto`: LLM4ES_DEVICE when set, else this rank's GPU when CUDA is available, else the CPU."""
    from training.hardware import choose_device

    return choose_device(device, EmbedError)


def pick_dtype(dtype: str, device: Any) -> Any:
    """`auto`: `producers.shared.devices.inference_dtype` (float32 on the CPU, bfloat16 on a GPU with bf16
    tensor cores, float16 on an older one); vectors that overflow float16 are refused by the embedding
    loop, not stored."""
    import torch

    from producers.shared.devices import inference_dtype

    if dtype == "auto":
        return inference_dtype(device)
    try:
        chosen = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                  "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise EmbedError(f"dtype {dtype!r}: expected auto, float32, bfloat16 or float16") from None
    return chosen
