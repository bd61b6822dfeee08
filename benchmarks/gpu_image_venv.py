"""A venv here with the GPU image's torch and Hugging Face versions, to rehearse the device run on them.

    python -m benchmarks.gpu_image_venv --venv /tmp/gpu-image        # ~4.6 GB from PyPI, a few minutes
    PYTHONPATH=$PWD /tmp/gpu-image/bin/python -m pytest -q tests
    PYTHONPATH=$PWD /tmp/gpu-image/bin/python -m benchmarks.gpu_bundle --out .gpu --simulate-only

The H200 image brings its own torch, transformers, tokenizers, huggingface-hub and accelerate
(`benchmarks.gpu_bundle.IMAGE_VERSIONS`, read off KINDS.md); the bundle carries none of them, so the
device run is the first time the code meets those versions. This venv installs exactly them (torch is
PyPI's CUDA build, which runs on the CPU here) and takes every other package from the project's venv
through a `.pth` file placed after its own site-packages, so the image's versions win.

What it does not rehearse: Python 3.12 (this interpreter's version is used), the CUDA kernels, and the
`feast` command, which lives only in the project's venv (the suite's one test that starts it fails here).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

from benchmarks.gpu_bundle import IMAGE_VERSIONS

# With their own dependencies: torch brings its CUDA libraries. The Hugging Face packages come without
# theirs (the project's venv has them), except what transformers imports that the project's venv lacks.
WITH_DEPS = ("torch",)
NO_DEPS = ("transformers", "huggingface-hub", "tokenizers", "accelerate", "safetensors")
EXTRA = ("httpx",)  # imported by the image's transformers 5.17, not needed by the project's newer one


def install_commands(python: str, versions: dict[str, str] = IMAGE_VERSIONS) -> list[list[str]]:
    """The pip calls that put the image's versions into the venv whose interpreter is `python`."""
    pin = [f"{name}=={versions[name]}" for name in NO_DEPS if name in versions]
    return [[python, "-m", "pip", "install", "-q", *(f"{n}=={versions[n]}" for n in WITH_DEPS)],
            [python, "-m", "pip", "install", "-q", "--no-deps", *pin],
            [python, "-m", "pip", "install", "-q", *EXTRA]]


def installed_versions(python: str, names: tuple[str, ...]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys; "
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))")
    out = subprocess.run([python, "-c", code, *names], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=Path("/tmp/gpu-image"),
                    help="where to build it (outside the checkout)")
    args = ap.parse_args(argv)
    venv = args.venv.resolve()
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    for cmd in install_commands(python):
        print("+", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
    # the project's packages, after the venv's own: a .pth line is appended to sys.path
    theirs = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            check=True, capture_output=True, text=True).stdout.strip()
    (Path(theirs) / "zz_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    names = WITH_DEPS + NO_DEPS
    got = installed_versions(python, names)
    wrong = {n: got[n] for n in names if n in IMAGE_VERSIONS and not got[n].startswith(IMAGE_VERSIONS[n])}
    print("versions:", ", ".join(f"{n} {got[n]}" for n in names))
    if wrong:
        print(f"not the image's versions: {wrong}", file=sys.stderr)
        return 1
    print(f"ready: PYTHONPATH=$PWD {python} -m pytest -q tests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
