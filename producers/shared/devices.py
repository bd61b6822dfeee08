"""Which torch device a producer runs on: the one place that reads LLM4ES_DEVICE.

CoLES and the session encoder call `pick_device`; fine-tuning and embedding call
`training.hardware.choose_device`, which adds the rank's GPU under torchrun but reads the
override through `requested_device` too.
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
