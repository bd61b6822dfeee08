"""Session embeddings and intents end to end, through the product (warehouse, Feast, evaluate).

    python benchmarks/sessions.py --home /tmp/bank --dataset bank-clickstream
    python benchmarks/sessions.py --home /tmp/ml --dataset movielens-100k     # a home that ran `llm4es demo`

Per dataset: sessions build, encoder train + embed, an intent taxonomy (`--taxonomy FILE`: a
person-written one, default benchmarks/taxonomies/<dataset>.txt, because the only LLM offline here,
SmolLM2-135M, cannot write one), labels by `--labeller` (lexical: word overlap, no LLM; or
smollm2-135m in score mode on `--llm-sample` sessions), distillation, publish with materialization
and one online read of each view. Then:
- bank-clickstream: the taxonomy's mapping onto the planted intents and the agreement of the
  labeller's and the distilled labels with them (against always answering the majority intent);
- movielens-100k: `evaluate` on gender and age with the session-embedding rollup, the intent
  shares, LLM4ES (if the home has it) and their concatenation.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import Stopwatch, describe  # noqa: E402

TAXONOMIES = Path(__file__).resolve().parent / "taxonomies"
DEFAULT_TAXONOMY = {"bank-clickstream": TAXONOMIES / "bank-website.txt", "movielens-100k": TAXONOMIES / "movielens.txt"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--dataset", choices=sorted(DEFAULT_TAXONOMY), default="bank-clickstream")
    ap.add_argument("--taxonomy", type=Path, default=None)
    ap.add_argument("--labeller", choices=["lexical", "smollm2-135m"], default="lexical")
    ap.add_argument("--label-sample", type=int, default=2000, help="sessions the labeller labels")
    ap.add_argument("--cv-repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from producers.enrich.options import LLMOptions
    from producers.intents import DistillConfig, LabelConfig
    from producers.pipeline import Pipeline
    from producers.publish import PublishConfig, online_features, published_views
    from producers.sessions import SessionEncoderConfig, SessionsConfig

    def log(msg: str) -> None:
        print(f"  · {msg}", flush=True)

    p = Pipeline.create(args.home, log=log)
    dataset = args.dataset
    print(describe())
    timed = Stopwatch()
    timings = timed.seconds

    timed("ingest", p.ingest, dataset)
    assert timed("validate", lambda: p.validate(dataset, data_docs=False)).success
    s = timed("sessions build", p.sessions_build, dataset, SessionsConfig())
    encoder = SessionEncoderConfig(progress=False)
    t = timed("sessions train", p.sessions_train, dataset, encoder)
    e = timed("sessions embed", p.sessions_embed, dataset, encoder)
    print(f"sessions: {s.n_sessions:,} ({s.events_per_session}); encoder {t.epochs} epochs, loss "
          f"{t.losses[0]:.3f} -> {t.final_loss:.3f}; {e.n_sessions:,} x {e.dim}")

    taxonomy = timed("taxonomy", p.intents_import, dataset, args.taxonomy or DEFAULT_TAXONOMY[dataset])
    if args.labeller == "lexical":
        llm, mode = LLMOptions(backend="lexical", model="lexical"), "generate"
    else:
        llm, mode = replace(LabelConfig().llm, model="smollm2-135m"), "score"
    label = timed("label", p.intents_label, dataset, LabelConfig(
        sample_size=args.label_sample, taxonomy_version=taxonomy.version, mode=mode, llm=llm, progress=False))
    distill = timed("distill", p.intents_distill, dataset, DistillConfig(
        taxonomy_version=taxonomy.version, llm=llm, mode=mode, progress=False))
    print(f"labels ({label.model}, {mode}): {label.labelled:,} of {label.sampled:,}; {label.distribution}")
    print(f"distilled ({distill.classifier}) vs labeller on {distill.n_test:,} held-out sessions: micro F1 "
          f"{distill.micro_f1:.3f}, macro F1 {distill.macro_f1:.3f}; latency per session: classifier "
          f"{distill.classifier_seconds_per_session * 1e3:.3f} ms, labeller "
          f"{(distill.llm_seconds_per_session or 0) * 1e3:.3f} ms ({distill.llm_sessions} sessions)")

    timed("publish", p.publish, dataset, PublishConfig(materialize=True))
    views = [v for v in published_views(p.home, dataset) if v.kind in
             ("session_embedding", "session_intent", "sessions", "intents")]
    con = p.home.connect(read_only=True)
    try:
        schema = con.execute("SELECT schema_name FROM information_schema.schemata WHERE schema_name = ?",
                             [dataset.replace("-", "_")]).fetchall()[0][0]
        session, user = con.execute(f"SELECT session_id, user_id FROM {schema}.sessions ORDER BY end_time DESC "
                                    "LIMIT 1").fetchall()[0]
    finally:
        con.close()
    t0 = time.perf_counter()
    for v in views:
        row = online_features(p.home, dataset, [v.name], [session if v.join_key == "session_id" else user])
        assert row.iloc[0].drop(v.join_key).notna().all(), f"{v.name}: nothing online for {session}/{user}"
    timings["online reads"] = time.perf_counter() - t0
    print(f"online: {', '.join(v.name for v in views)} read back for session {session} / user {user}")

    if dataset == "bank-clickstream":
        from producers.stores.cache import default_cache_dir
        from producers.synthetic.agreement import planted_agreement, read_planted

        planted = read_planted(default_cache_dir() / "datasets" / dataset / "planted_intents.csv")
        con = p.home.connect(read_only=True)
        try:
            agreement = planted_agreement(con, schema, planted, taxonomy.version, label.model)
        finally:
            con.close()
        print(agreement.markdown())
        out = p.home.reports_dir("intents", schema) / "planted_agreement.json"
        out.write_text(json.dumps(agreement.as_dict(), indent=2))
    else:
        from training.evaluate import EvaluateConfig

        have_llm4es = any(v.kind == "llm4es" for v in published_views(p.home, dataset))
        features = ("sessions", "intents", "sessions+intents")
        if have_llm4es:
            features += ("llm4es", "sessions+llm4es", "sessions+intents+llm4es")
        ev = timed("evaluate", p.evaluate, dataset, EvaluateConfig(features=features, cv_repeats=args.cv_repeats))
        print(ev.paths["markdown"].read_text())
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    print(describe())


if __name__ == "__main__":
    main()
