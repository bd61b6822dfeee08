"""Which torch device a trained producer (CoLES, the session encoder) runs on."""
from __future__ import annotations

from typing import Any


def pick_device(device: str, error: type[Exception] = ValueError) -> Any:
    """`auto`: CUDA when available, else the CPU; otherwise the named device, refused with `error` when it
    names CUDA on a machine without it (rather than failing later inside torch)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device {device!r}: CUDA is not available here")
    return chosen
