"""What a benchmark ran on: printed next to every figure."""
from __future__ import annotations

import os
import platform


def describe() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        mem = f", {pages * size / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}){mem}{gpu}, Python {platform.python_version()}"


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn):
    """(fn(), its wall time in seconds)."""
    import time

    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


class Stopwatch:
    """Times named steps: `out = watch("ingest", fn, *args)`; `watch.seconds` keeps each step's wall time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn, *args):
        out, self.seconds[name] = timed(lambda: fn(*args))
        return out
