"""Quality benchmark on MovieLens-100k: the paper's comparison (its table 6 targets: gender, age).

Feature sets: agg, CoLES, LLM4ES without fine-tuning (the base model), LLM4ES fine-tuned on the
serialized texts only, LLM4ES fine-tuned on the 7-template enriched mixture, and the ensembles
CoLES+LLM4ES and CoLES+agg. Everything goes through the product: the stages write the
warehouse and Parquet, `publish` serves them through Feast, `evaluate` fetches them from Feast.

    python benchmarks/quality.py --home /tmp/quality            # sized to the machine, as the demo
    python benchmarks/quality.py --home /tmp/quality --hardware gpu

A home that already ran `llm4es demo` is reused: ingest, the template fine-tuning run ("demo"),
CoLES and unchanged stages are not redone. The paper's anchors (its table 6, Llama-3.2-1B, full
fine-tuning on a GPU): LLM4ES gender accuracy 0.748, age MAE 7.34; CoLES 0.683 and 8.70.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe  # noqa: E402

DATASET = "movielens-100k"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--hardware", choices=["auto", "gpu", "cpu-bf16", "cpu"], default="auto")
    ap.add_argument("--cv-repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from producers import demo
    from producers.coles import ColesConfig
    from producers.pipeline import Pipeline
    from producers.publish import PublishConfig, published_views

    def log(msg: str) -> None:
        print(f"  · {msg}", flush=True)

    p = Pipeline.create(args.home, log=log)
    plan = demo.plan(demo.detect_hardware() if args.hardware == "auto" else args.hardware)
    if plan.finetune is None:  # the CPU plans embed the base model: nothing fine-tuned to compare
        ap.error(f"the {plan.hardware} plan does not fine-tune (see `llm4es demo --help`), and this benchmark compares "
                 "fine-tuned models with the base model: run it on a GPU (--hardware gpu), or `llm4es demo` for the "
                 "CPU plan's scores")
    print(describe())
    print(f"hardware class {plan.hardware}; cuts: {plan.cuts or 'none'}")
    t0 = time.perf_counter()
    p.ingest(DATASET)
    assert p.validate(DATASET, data_docs=False).success
    p.serialize(DATASET, plan.finetune.model, plan.serialize_max_tokens, "readable")
    p.enrich(DATASET, plan.enrich)
    p.aggregate(DATASET)
    coles = p.coles(DATASET, ColesConfig(seed=42))
    print(f"coles: {coles.n_users} x {coles.dim}, {coles.seconds:.0f}s")

    runs = {"serialized": replace(plan.finetune, mixture="serialized:1", run_name="serialized-only"),
            "enriched": plan.finetune}  # run "demo": the template:7 mixture
    checkpoints = {"base": None}
    for name, config in runs.items():
        r = p.finetune(DATASET, config)
        checkpoints[name] = str(r.models[-1])
        speed = f"{r.tokens_per_second:,.0f} tokens/s" if r.tokens_per_second else "finished run reused"
        print(f"fine-tune {name} ({config.mixture}): {r.steps} steps, final loss {r.final_loss:.3f}, {speed}")
    labels = {}  # name -> the checkpoint as the embeddings record it
    for name, checkpoint in checkpoints.items():
        e = p.embed(DATASET, replace(plan.embed, checkpoint=checkpoint))
        s = e.sets[0]
        labels[name] = s.checkpoint
        speed = f"{s.tokens_per_s:,.0f} tokens/s, {s.wall_seconds:.0f}s" if s.n_computed else "finished set reused"
        print(f"embed {name}: {s.n_users} x {s.dim}, {speed}")

    p.publish(DATASET, PublishConfig(llm4es_set=labels["enriched"]))
    by_checkpoint = {v.checkpoint: v.name for v in published_views(p.home, DATASET) if v.kind == "llm4es"}

    def view(name: str) -> str:
        return by_checkpoint[labels[name]]

    features = ("agg", "coles", view("base"), view("serialized"), view("enriched"), f"coles+{view('enriched')}",
                "coles+agg")
    config = replace(plan.evaluate, features=features, cv_repeats=args.cv_repeats, select_epoch=False)
    ev = p.evaluate(DATASET, config)
    print(f"\n{describe()}\nhardware class {plan.hardware}; cuts: {plan.cuts or 'none'}")
    print(ev.paths["markdown"].read_text())
    print(f"total {time.perf_counter() - t0:.0f}s; report {ev.paths['markdown']}")


if __name__ == "__main__":
    main()
