"""What produced an output: recorded next to every table and file we write."""
from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit when run from a checkout (`0.1.0+g1a2b3c4.dirty`)."""
    try:
        version = metadata.version("llm4es")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    if not sha:
        return version
    return f"{version}+g{sha}{'.dirty' if dirty else ''}"
