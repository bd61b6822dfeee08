"""Simple references for MovieLens-100k gender: what LLM4ES, CoLES and the aggregates must beat.

    python benchmarks/simple_references.py                 # ingests the cached MovieLens-100k into a temp home
    python benchmarks/simple_references.py --home H        # a home that already holds movielens-100k

Features straight from the user x movie matrix, read by the same two readers and scored on the same
repeated-CV splits as `llm4es evaluate` (5 folds x 3 repeats, seed 0; training.evaluate.protocol), and
on its paper protocol (10% test users, the mean of 5 models' test scores):
- `movies (binary)`: which of the 1,682 movies the user rated (a bag of items), linear probe;
- `movies (ratings)`: the ratings themselves (0 where unrated), linear probe;
- `movies SVD-64`: the first 64 components of the centred rating matrix (fitted on every user, no
  labels: as CoLES and LLM4ES also see every user's history), LightGBM and the linear probe.
It prints gender ROC-AUC (repeated CV: mean and spread over the 15 splits) with the machine.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATASET = "movielens-100k"


def user_movie_matrix(home) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:  # noqa: F821
    """(ratings: users x movies, 0 where unrated; gender as 0/1; user ids), labelled users only."""
    import numpy as np

    con = home.connect(read_only=True)
    try:
        events = con.execute("SELECT e.user_id, e.movie_id, e.rating FROM movielens_100k.events e "
                             "JOIN movielens_100k.users u USING (user_id) WHERE u.gender IS NOT NULL").fetchnumpy()
        users = con.execute("SELECT user_id, gender FROM movielens_100k.users WHERE gender IS NOT NULL "
                            "ORDER BY user_id").fetchnumpy()
    finally:
        con.close()
    ids = users["user_id"]
    row = np.searchsorted(ids, events["user_id"])
    movies, col = np.unique(events["movie_id"], return_inverse=True)
    ratings = np.zeros((len(ids), len(movies)), dtype=np.float32)
    ratings[row, col] = events["rating"]
    from training.evaluate.protocol import encode_labels

    y, _ = encode_labels(list(users["gender"]), "binary")  # as `evaluate` encodes them (F = 0, M = 1)
    return ratings, y, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import numpy as np
    from sklearn.decomposition import TruncatedSVD

    from benchmarks.machine import describe
    from producers.stores.warehouse import Home
    from training.evaluate.probe import LinearProbe
    from training.evaluate.protocol import LgbmParams, cv_splits, paper_splits, run_protocol

    print(describe())
    with tempfile.TemporaryDirectory(prefix="llm4es-refs-") as tmp:
        home = Home.resolve(args.home) if args.home else _ingested(Path(tmp) / "home")
        ratings, y, _ = user_movie_matrix(home)
    splits = cv_splits(y, "binary", args.seed, folds=5, repeats=3)
    paper = paper_splits(y, "binary", args.seed)  # the paper's: 10% test users, 5 models trained on the rest
    print(f"{len(y):,} labelled users ({1 - y.mean():.1%} female), {ratings.shape[1]:,} movies, "
          f"{int((ratings > 0).sum()):,} ratings; {len(splits)} splits (5 folds x 3 repeats, seed {args.seed})")
    centred = np.where(ratings > 0, ratings - ratings[ratings > 0].mean(), 0.0)
    svd = TruncatedSVD(64, random_state=args.seed).fit_transform(centred)
    sets = [("movies (binary)", (ratings > 0).astype(np.float32), ["linear"]),
            ("movies (ratings)", ratings, ["linear"]),
            ("movies SVD-64", svd, ["lightgbm", "linear"])]
    readers = {"lightgbm": LgbmParams(), "linear": LinearProbe()}
    for name, X, which in sets:
        for reader in which:
            t = time.perf_counter()
            auc = np.array(run_protocol("cv", X, y, "binary", splits, readers[reader], args.seed).scores["roc_auc"])
            test = np.array(run_protocol("paper", X, y, "binary", paper, readers[reader], args.seed).scores["roc_auc"])
            print(f"  {name:18s} {reader:8s} gender ROC-AUC {auc.mean():.3f} ± {auc.std():.3f} repeated CV, "
                  f"{test.mean():.3f} paper protocol ({X.shape[1]:,} columns, {time.perf_counter() - t:.1f} s)")


def _ingested(root: Path):
    from producers.datasets.definition import load_builtin
    from producers.ingest import IngestConfig, ingest
    from producers.ingest.default_sources import fetch_default_source
    from producers.stores.cache import default_cache_dir
    from producers.stores.warehouse import Home

    home = Home.resolve(root)
    ingest(home, load_builtin(DATASET), IngestConfig(source=fetch_default_source(DATASET, default_cache_dir())))
    return home


if __name__ == "__main__":
    main()
