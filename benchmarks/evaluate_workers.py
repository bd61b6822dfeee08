"""What `llm4es evaluate` costs and what fitting splits on every core saves, without Feast.

    python benchmarks/evaluate_workers.py --home H [--features llm4es] [--profile]

H is a home where MovieLens-100k is ingested (its labels and splits are real). The features are
random matrices of the demo's widths (agg 175, CoLES 256, LLM4ES 576), so the figures are the fits'
cost alone (random features make LightGBM grow every tree, as real embeddings do). Runs evaluate with
`workers=1` then `workers=2`, prints wall and CPU seconds and the load average, and checks that the
two reports hold the same scores. `--profile` prints cProfile's top entries for the `workers=1` run.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIMS = {"agg": 175, "coles": 256, "llm4es": 576}


@dataclass
class _View:
    name: str
    kind: str
    is_default: bool = True
    run: str | None = None
    epoch: int | None = None
    text_kind: str | None = None


class RandomSource:
    def views(self):
        return [_View(f"movielens_100k__{k}", k) for k in DIMS]

    def matrices(self, views, entity_df):
        rng = np.random.default_rng(0)
        return {v: rng.standard_normal((len(entity_df), DIMS[v.split("__")[1]])).astype(np.float32) for v in views}


def main() -> None:
    from producers.demo import DEMO_FEATURES
    from producers.stores.warehouse import Home
    from training.evaluate import EvaluateConfig
    from training.evaluate.run import evaluate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", required=True)
    ap.add_argument("--features", default=",".join(DEMO_FEATURES))
    ap.add_argument("--targets", default="", help="comma-separated; default every label")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    home = Home.resolve(args.home)
    reports = {}
    for workers in (1, 2):
        cfg = EvaluateConfig(features=tuple(args.features.split(",")), workers=workers,
                             targets=tuple(t for t in args.targets.split(",") if t),
                             out_dir=Path(tempfile.mkdtemp(prefix="evaluate-workers-")))
        prof = cProfile.Profile() if args.profile and workers == 1 else None
        wall, cpu = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        r = evaluate(home, "movielens-100k", cfg, source=RandomSource())
        if prof:
            prof.disable()
        print(f"workers {workers}: {time.perf_counter() - wall:.1f} s wall, {time.process_time() - cpu:.1f} s CPU, "
              f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs", flush=True)
        reports[workers] = r.report["results"]
        if prof:
            pstats.Stats(prof).sort_stats("cumulative").print_stats(15)
    print("same scores with 1 and 2 workers:", reports[1] == reports[2])


if __name__ == "__main__":
    main()
