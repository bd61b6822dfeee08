"""Web sessions for the app, end to end: the cross-channel synthetic bank through the product.

    python benchmarks/crosschannel.py --home /tmp/cc --visitors 2000 --seed 0 [--smollm2-latency 8]

Generates both channels (`synth-clicks --app-users`), ingests and validates the website side,
builds sessions, trains and runs the session encoder, stores the benchmark taxonomy
(benchmarks/taxonomies/bank-website.txt: the offline SmolLM2-135M cannot write one), labels every
session with the lexical labeller (word overlap, no LLM), distils the labels into the classifier
(which times itself and the labeller on held-out sessions), publishes to Feast, and runs
training/evaluate/crosschannel.py: tile ranking and conversion with web features read from Feast at
each app visit's time. `--smollm2-latency N` also times the local SmolLM2-135M labeller (score
mode) on N sessions in the same run, for a labeller latency that is an LLM's. Prints the tables and
the machine; the reports land in <home>/reports/crosschannel/bank_clickstream/.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import Stopwatch, describe  # noqa: E402

TAXONOMY = Path(__file__).resolve().parent / "taxonomies" / "bank-website.txt"
DATASET = "bank-clickstream"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--visitors", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--app-users", type=float, default=0.6)
    ap.add_argument("--link-share", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=None, help="session encoder epochs [default: the encoder's]")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--smollm2-latency", type=int, default=0, help="also time SmolLM2-135M on N sessions")
    args = ap.parse_args(argv)

    from producers.enrich.options import LLMOptions
    from producers.intents import DistillConfig, LabelConfig
    from producers.pipeline import Pipeline
    from producers.publish import PublishConfig
    from producers.sessions import SessionEncoderConfig, SessionsConfig
    from producers.synthetic.clickstream import ClickstreamConfig
    from producers.synthetic.crosschannel import CrossChannelConfig, write_crosschannel
    from training.evaluate.crosschannel import CrossChannelEvalConfig, evaluate_crosschannel, markdown, write_report

    def log(msg: str) -> None:
        print(f"  · {msg}", flush=True)

    print(describe())
    timed = Stopwatch()
    timings = timed.seconds

    source = args.home / "source"
    data = timed("generate", write_crosschannel, source, CrossChannelConfig(
        web=ClickstreamConfig(visitors=args.visitors, seed=args.seed), app_user_share=args.app_users,
        link_share=args.link_share))
    print(f"data: {data.web.n_sessions:,} web sessions ({data.n_linked_sessions:,} linked), {data.n_app_users:,} app "
          f"users, {data.n_app_visits:,} app visits ({data.click_share:.0%} with a click, {data.conversion_share:.0%} "
          f"converted); clicks by tile {data.clicks_by_tile}")
    p = Pipeline.create(args.home / "home", log=log)
    timed("ingest", p.ingest, DATASET, source)
    assert timed("validate", lambda: p.validate(DATASET, data_docs=False)).success
    s = timed("sessions build", p.sessions_build, DATASET, SessionsConfig())
    encoder = SessionEncoderConfig(progress=False, **({"epochs": args.epochs} if args.epochs else {}))
    t = timed("sessions train", p.sessions_train, DATASET, encoder)
    e = timed("sessions embed", p.sessions_embed, DATASET, encoder)
    print(f"sessions: {s.n_sessions:,}; encoder {t.epochs} epochs, loss {t.losses[0]:.3f} -> {t.final_loss:.3f}; "
          f"{e.n_sessions:,} x {e.dim}")
    taxonomy = timed("taxonomy", p.intents_import, DATASET, TAXONOMY)
    lexical = LLMOptions(backend="lexical", model="lexical")
    label = timed("label", p.intents_label, DATASET, LabelConfig(
        sample_size=0, taxonomy_version=taxonomy.version, llm=lexical, progress=False))
    distill = timed("distill", p.intents_distill, DATASET, DistillConfig(
        taxonomy_version=taxonomy.version, llm=lexical, progress=False))
    latency = {"classifier_seconds_per_session": distill.classifier_seconds_per_session,
               "llm_seconds_per_session": distill.llm_seconds_per_session, "llm_model": "lexical (word overlap)",
               "llm_sessions": distill.llm_sessions, "extra": {}}
    print(f"labels: {label.labelled:,} by lexical; distilled vs labeller (held out): micro F1 {distill.micro_f1:.3f}, "
          f"macro F1 {distill.macro_f1:.3f}")
    if args.smollm2_latency:
        smol = timed("smollm2 latency", p.intents_label, DATASET, LabelConfig(
            sample_size=args.smollm2_latency, taxonomy_version=taxonomy.version, mode="score",
            llm=replace(LabelConfig().llm, model="smollm2-135m"), progress=False, seed=args.seed + 1))
        if smol.llm_seconds_per_session is not None:
            latency["extra"][f"labeller SmolLM2-135M (score mode, {smol.generated} sessions, CPU)"] = \
                smol.llm_seconds_per_session
    timed("publish", p.publish, DATASET, PublishConfig())
    report = timed("evaluate", evaluate_crosschannel, p.home, DATASET, source,
                   CrossChannelEvalConfig(folds=args.folds, labeller=label.model), latency, log)
    js, md = write_report(p.home, report)
    print(markdown(report))
    print(f"reports: {js}, {md}")
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    print(describe())


if __name__ == "__main__":
    main()
