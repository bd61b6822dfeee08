"""Which self-supervised objective makes the best session embedding? A probe on the planted intents.

    python benchmarks/session_objectives.py --home /tmp/bank      # a home with bank-clickstream sessions built

Trains the session encoder three times on the synthetic clickstream (same seed and settings):
masked-event modelling only, contrastive only, and the default mix; embeds every session; then a
linear probe (logistic regression, 5-fold stratified CV) predicts each session's planted intent
from its embedding alone. The planted intents are never seen by the encoders. Also a no-training
baseline: the probe on each session's share of every page (a bag of events).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe  # noqa: E402

DATASET, SCHEMA = "bank-clickstream", "bank_clickstream"


def probe(X, y, seed: int = 0) -> tuple[float, float]:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_val_score(model, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=seed), scoring="accuracy")
    return float(np.mean(scores)), float(np.std(scores))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args(argv)

    import numpy as np

    from producers.stores.cache import default_cache_dir
    from producers.pipeline import Pipeline
    from producers.sessions import SessionEncoderConfig, SessionsConfig
    from producers.synthetic.agreement import read_planted

    p = Pipeline.create(args.home)
    print(describe())
    p.ingest(DATASET)
    assert p.validate(DATASET, data_docs=False).success
    p.sessions_build(DATASET, SessionsConfig())
    planted = read_planted(default_cache_dir() / "datasets" / DATASET / "planted_intents.csv")

    def embeddings() -> tuple[np.ndarray, np.ndarray]:
        con = p.home.connect(read_only=True)
        try:
            rows = con.execute(f"SELECT session_id, embedding FROM {SCHEMA}.session_embeddings "
                               "ORDER BY session_id").fetchall()
        finally:
            con.close()
        return np.asarray([r[1] for r in rows], dtype=np.float32), np.asarray([planted[r[0]] for r in rows])

    con = p.home.connect(read_only=True)
    try:
        bag = con.execute(f"""PIVOT (SELECT session_id, page, count(*) / max(n) AS share FROM
            (SELECT session_id, page, count(*) OVER (PARTITION BY session_id) AS n FROM {SCHEMA}.session_events)
            GROUP BY ALL) ON page USING first(share) ORDER BY session_id""").df()
    finally:
        con.close()
    y_bag = np.asarray([planted[s] for s in bag["session_id"]])
    rows = [("page shares, a bag of events (no training)", *probe(bag.drop(columns="session_id").fillna(0).to_numpy(),
                                                                  y_bag), "-")]
    majority = max(np.mean(y_bag == c) for c in set(y_bag))

    for name, mem, contrastive in (("masked-event modelling only", 1.0, 0.0), ("contrastive only", 0.0, 1.0),
                                   ("MEM + contrastive (default)", 1.0, 1.0)):
        config = SessionEncoderConfig(epochs=args.epochs, mem_weight=mem, contrastive_weight=contrastive,
                                      progress=False)
        t0 = time.perf_counter()
        trained = p.sessions_train(DATASET, config)
        p.sessions_embed(DATASET, config)
        X, y = embeddings()
        rows.append((name, *probe(X, y), f"{time.perf_counter() - t0:.0f} s" if trained.epochs_trained else "reused"))
        print(f"{name}: probe accuracy {rows[-1][1]:.3f} ± {rows[-1][2]:.3f}", flush=True)

    print(f"\n{describe()}\nlinear probe of the planted intent (5-fold CV, {len(y_bag):,} sessions; "
          f"majority class {majority:.3f})\n")
    print("| session representation | probe accuracy | train + embed |\n|---|---|---|")
    for name, mean, std, seconds in rows:
        print(f"| {name} | {mean:.3f} ± {std:.3f} | {seconds} |")


if __name__ == "__main__":
    main()
