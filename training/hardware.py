"""Where fine-tuning and embedding run, and how fast that is against the hardware's peak.

- `choose_device`: `auto` means CUDA when available, unless the environment variable
  `LLM4ES_DEVICE` names a device (the test suite sets `cpu`, so a GPU machine runs the CPU suite on
  the CPU); under `torchrun` / `accelerate launch` each process takes the GPU of its `LOCAL_RANK`.
- `select_named_gpu`: `cuda:N` made the current GPU, for accelerate's bare `cuda` in one process.
- `Ranks`: the process's place in a multi-process job, read from the launcher's environment.
- `fast_cuda_settings`: TF32 matmuls on CUDA (never on the CPU path, which stays bit-for-bit).
- `model_flops_per_token` / `peak_flops`: the MFU convention the README states.
- `Progress`: log lines every N seconds when stdout is not a terminal (a log file still shows progress).

torch is imported inside functions only.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from producers.shared.devices import requested_device

# Dense bf16 tensor-core peaks without sparsity, in FLOP/s, by a substring of torch.cuda.get_device_name().
# The first match wins, so the more specific names come first.
# get_device_name gives e.g. "NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL", "NVIDIA H100 PCIe".
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12),
    ("H100", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A10G", 70e12),
)


def choose_device(device: str = "auto", error: type[Exception] = ValueError) -> Any:
    """The torch device `device` names; `auto` honours LLM4ES_DEVICE, then CUDA (this rank's GPU), then CPU."""
    import torch

    device = requested_device(device)
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", Ranks.from_env().local_rank % torch.cuda.device_count())
    try:
        chosen = torch.device(device)
    except RuntimeError as e:
        raise error(f"device {device!r}: expected auto, cpu, cuda or cuda:N") from e
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device {device!r}: CUDA is not available here")
    if chosen.type == "cuda" and chosen.index is None:  # "cuda" under torchrun: each process its own GPU
        chosen = torch.device("cuda", Ranks.from_env().local_rank % torch.cuda.device_count())
    return chosen


def select_named_gpu(device: str, error: type[Exception] = ValueError) -> None:
    """Make `cuda:N` the current CUDA device when `device` names it, for code that places tensors on a
    bare `cuda`: accelerate does so in a single process, so `finetune --device cuda:1` trained on GPU 0.

    A launched job (torchrun, accelerate launch) gives each process the GPU of its LOCAL_RANK; one index
    for every process would put them all on one GPU, so it is refused with what to use instead.
    """
    import torch

    requested = requested_device(device)
    if not requested.startswith("cuda:"):
        return
    chosen = choose_device(requested, error)
    ranks = Ranks.from_env()
    if ranks.distributed:
        raise error(f"device {requested!r} names one GPU, but this is one process of {ranks.world_size}: "
                    "each process takes the GPU of its LOCAL_RANK. Leave --device out (or say `cuda`), and choose "
                    "the GPUs with CUDA_VISIBLE_DEVICES")
    torch.cuda.set_device(chosen)


@dataclass(frozen=True)
class Ranks:
    """This process in a job started by torchrun or accelerate launch (both set these variables)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def fast_cuda_settings(device: Any) -> None:
    """TF32 for float32 matmuls and convolutions on CUDA (Ampere and later); the CPU path is left alone."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def peak_flops(device: Any) -> tuple[float | None, str]:
    """(dense bf16 peak in FLOP/s or None when unknown, device name) for `device`."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None), name


def model_flops_per_token(config: Any, mean_context: float, training: bool, lm_head: bool = True) -> float:
    """FLOPs per real token: 2N (forward) or 6N (forward + backward) for the N matmul parameters, plus
    causal attention: 2 * layers * hidden * mean_context forward (QK^T and AV over the mean
    number of earlier tokens, i.e. half the text length), times 3 for training.

    N counts the decoder blocks' weight matrices and, with `lm_head`, the output projection
    (tied or not: it is a matmul either way); never the input embedding lookup.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, layers, ffn = text.hidden_size, text.num_hidden_layers, text.intermediate_size
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    attn_params = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o and k, v projections
    mlp_params = 3 * h * ffn  # gate, up, down (Llama-style)
    n = layers * (attn_params + mlp_params) + (h * text.vocab_size if lm_head else 0)
    attention = 2 * 2 * layers * heads * head_dim * mean_context  # QK^T + AV, 2 FLOPs per multiply-add
    return (6 * n + 3 * attention) if training else (2 * n + attention)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    return tokens_per_s * flops_per_token / peak if peak else None


class Progress:
    """`log` a line every `every_s` seconds (and at the end) when stdout is not a terminal.

    A terminal gets tqdm's bar instead; a log file (nohup, a scheduler) gets these lines, so a
    15-minute run never shows only "loading ...".
    """

    def __init__(self, log: Callable[[str], None], total: int, unit: str, every_s: float = 30.0,
                 enabled: bool | None = None):
        self.log, self.total, self.unit, self.every_s = log, total, unit, every_s
        self.enabled = (not sys.stdout.isatty()) if enabled is None else enabled
        self.started = self.last = time.perf_counter()

    def update(self, done: int, tokens: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.every_s and done < self.total):
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        self.log(f"{done:,}/{self.total:,} {self.unit} ({done / max(self.total, 1):.0%}), "
                 f"{tokens / elapsed:,.0f} tokens/s, {elapsed:,.0f}s elapsed, ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "unknown"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
