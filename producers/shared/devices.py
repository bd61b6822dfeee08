"""Which torch device a producer runs on: the one place that reads LLM4ES_DEVICE.

CoLES and the session encoder call `pick_device`; fine-tuning and embedding call
`training.hardware.choose_device`, which adds the rank's GPU under torchrun but reads the
override through `requested_device` too. `native_bf16` says whether a GPU computes in bf16 or
only emulates it: fine-tuning chooses its precision by it, and `inference_dtype` (the LLM enricher's
and embedding's `auto` dtype) its float type.
"""
from __future__ import annotations

import os
from typing import Any

# The test suite sets it to `cpu`, so every `auto` device (CoLES, the session encoder, fine-tuning,
# embedding) also runs its CPU tolerances on the CPU of a GPU machine.
DEVICE_ENV = "LLM4ES_DEVICE"


def requested_device(device: str) -> str:
    """`device`, except that `auto` becomes LLM4ES_DEVICE when that is set (still `auto` otherwise)."""
    if device == "auto":
        return os.environ.get(DEVICE_ENV, "").strip() or "auto"
    return device


def pick_device(device: str, error: type[Exception] = ValueError) -> Any:
    """`auto`: LLM4ES_DEVICE when set, else CUDA when available, else the CPU; otherwise the named device,
    refused with `error` when it names CUDA on a machine without it (rather than failing later inside torch)."""
    import torch

    device = requested_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device {device!r}: CUDA is not available here")
    return chosen


def native_bf16(device: Any) -> bool:
    """Whether `device` has bf16 tensor cores: a GPU of compute capability 8.0 or newer (A100, A10, L4,
    H100, ...). Older ones (V100, T4) only emulate bf16, slowly, and `torch.cuda.is_bf16_supported()`
    says yes there too, since emulation counts; the CPU paths choose their dtypes elsewhere."""
    import torch

    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def inference_dtype(device: Any) -> Any:
    """The torch dtype a forward-only model (embedding, the LLM enricher) runs in by default: float32 on
    the CPU (exact batch invariance), bfloat16 on a GPU with bf16 tensor cores, float16 on an older GPU
    (V100, T4), which only emulates bf16 (no loss scaling is needed without a backward)."""
    import torch

    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if native_bf16(device) else torch.float16
