"""Which torch device a trained producer (CoLES, the session encoder) runs on."""
from __future__ import annotations

import os
from typing import Any

# The same variable training.hardware.choose_device reads: the test suite sets it to `cpu`, so CoLES and the
# session encoder also run their CPU tolerances on the CPU of a GPU machine.
DEVICE_ENV = "LLM4ES_DEVICE"


def pick_device(device: str, error: type[Exception] = ValueError) -> Any:
    """`auto`: LLM4ES_DEVICE when set, else CUDA when available, else the CPU; otherwise the named device,
    refused with `error` when it names CUDA on a machine without it (rather than failing later inside torch)."""
    import torch

    if device == "auto":
        device = os.environ.get(DEVICE_ENV, "").strip() or "auto"
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device {device!r}: CUDA is not available here")
    return chosen
