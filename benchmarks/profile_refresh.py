"""Run (and optionally profile) one refresh again on a home kept by `benchmarks/refresh.py --workdir DIR`.

    python benchmarks/refresh.py --visitors 3000 --workdir /tmp/w3k      # once: the full run, kept
    python benchmarks/profile_refresh.py /tmp/w3k                         # per-stage seconds, as often as needed
    python benchmarks/profile_refresh.py /tmp/w3k --profile /tmp/r.prof   # and a cProfile dump of the refresh
    python benchmarks/profile_refresh.py /tmp/w3k --gx                    # and each GX frame validation's CPU time

Each run restores DIR/home from DIR/home.before-refresh (the home just before the benchmark's refresh) and
refreshes it in this process. The heavy libraries are imported first and timed apart: the benchmark's
refresh runs after a full run in the same process, which had paid for them.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FEAST_USAGE", "False")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--profile", type=Path, default=None, help="write a cProfile dump of the refresh here")
    ap.add_argument("--gx", action="store_true", help="print the CPU time of each GX frame validation (the checks "
                    "of the sessions cut and the gates: validation.frames.validate_frame)")
    args = ap.parse_args()
    before = args.workdir / "home.before-refresh"
    if not before.is_dir():
        sys.exit(f"{before} is missing: run benchmarks/refresh.py --workdir {args.workdir} first")
    started = time.perf_counter()
    import feast  # noqa: F401
    import great_expectations  # noqa: F401
    import sklearn  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import producers.intents  # noqa: F401
    import producers.publish  # noqa: F401
    import producers.sessions  # noqa: F401
    import training.embed  # noqa: F401
    import validation.run  # noqa: F401
    import validation.snapshot_gate  # noqa: F401
    from benchmarks.machine import describe
    from benchmarks.refresh import DATASET
    from producers.refresh import refresh
    from producers.stores.warehouse import Home
    from tests.fixtures.tiny_model import tiny_tokenizer

    print(describe())
    print(f"imports {time.perf_counter() - started:.2f}s (not part of the refresh); load {os.getloadavg()[0]:.1f}")
    home_dir = args.workdir / "home"
    shutil.rmtree(home_dir, ignore_errors=True)
    shutil.copytree(before, home_dir, symlinks=True)
    tok = tiny_tokenizer()
    gx_calls = _time_gx_calls() if args.gx else None
    profiler = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    result = refresh(Home.resolve(home_dir), DATASET, tokenizer=tok)
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    wall = time.perf_counter() - started
    print(f"refresh of {len(result.users):,} users: {wall:.2f}s{' (profiled)' if profiler else ''}")
    for stage, seconds in result.seconds.items():
        print(f"  {stage}: {seconds:.3f}s")
    if gx_calls is not None:
        for batch, rows, n, cpu in gx_calls:
            print(f"  GX {batch}: {rows:,} rows, {n} expectations, {cpu * 1000:.1f} ms CPU")
        print(f"  GX in all: {len(gx_calls)} frames, {sum(c[3] for c in gx_calls) * 1000:.1f} ms CPU")


def _time_gx_calls() -> list:
    """Wrap validate_frame (its callers import it when they run) to record (batch, rows, expectations, CPU s)."""
    import validation.frames

    calls, real = [], validation.frames.validate_frame

    def timed(batch, frame, *args, **kwargs):
        started = time.process_time()
        results = real(batch, frame, *args, **kwargs)
        calls.append((batch, len(frame), len(results), time.process_time() - started))
        return results

    validation.frames.validate_frame = timed
    return calls


if __name__ == "__main__":
    main()
