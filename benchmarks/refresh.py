"""A full run against `refresh` after 1% of the users get new events, per stage (issue 14's target: <= 5%).

    python benchmarks/refresh.py --visitors 2000 --mean-sessions 11.5

Generates the bank-clickstream dataset (producers/synthetic) and its follow-up delta (new sessions a
week later for `--delta-share` of the visitors, as benchmarks/append_delta.py does). Then, on one home:
- the full run, stage by stage: serialize, embed (a random tiny Llama from tests/fixtures/tiny_model.py,
  so the timing is the pipeline's, not a real LLM's: a real one only makes embed's share larger),
  aggregate; unless --no-sessions: sessions build, session encoder training (`--session-epochs`), session
  embed, intents (the person-written taxonomy benchmarks/taxonomies/bank-website.txt, labels of
  `--label-sample` sessions by word overlap, a distilled classifier); publish + materialize
- `ingest --append` of the delta and the data gate (`validate --delta`, then `validate` of every row), timed
  apart (not part of refresh)
- `refresh`: its own per-stage seconds (serialize, embed, aggregate, sessions, session_embed, intents,
  gate, session_gate, publish incl. materialize)
and checks that exactly the delta's visitors were recomputed. Prints the figures and the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FEAST_USAGE", "False")

from benchmarks.append_delta import write_delta  # noqa: E402
from benchmarks.machine import describe, timed  # noqa: E402
from producers.aggregate import AggregateConfig, aggregate  # noqa: E402
from producers.datasets.definition import load_builtin  # noqa: E402
from producers.ingest import IngestConfig, ingest  # noqa: E402
from producers.ingest.append import append  # noqa: E402
from producers.publish import PublishConfig, publish  # noqa: E402
from producers.refresh import refresh  # noqa: E402
from producers.serialize.run import SerializeConfig, serialize  # noqa: E402
from producers.stores.warehouse import Home  # noqa: E402
from producers.synthetic.clickstream import ClickstreamConfig, write_clickstream  # noqa: E402
from tests.fixtures.tiny_model import save_tiny_model, tiny_tokenizer  # noqa: E402
from training.embed import EmbedConfig, embed  # noqa: E402
from validation.run import ValidateConfig, validate  # noqa: E402

DATASET = "bank-clickstream"
STAGES = ("serialize", "embed", "aggregate", "sessions", "session_train", "session_embed", "intents", "gate",
          "session_gate", "publish")
TAXONOMY = Path(__file__).resolve().parent / "taxonomies" / "bank-website.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--visitors", type=int, default=2_000)
    ap.add_argument("--mean-sessions", type=float, default=11.5)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--delta-share", type=float, default=0.01)
    ap.add_argument("--max-tokens", type=int, default=500, help="text budget (the tiny model has 512 positions)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-sessions", action="store_true", help="leave sessions and intents out")
    ap.add_argument("--session-epochs", type=int, default=1, help="session encoder training epochs (full run only)")
    ap.add_argument("--label-sample", type=int, default=1000, help="sessions labelled for the distilled classifier")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="work here and keep it (default: a temporary folder, removed); the home as it was just "
                         "before the refresh is copied to WORKDIR/home.before-refresh, to profile a refresh again")
    args = ap.parse_args()
    print(describe())
    print(f"load average before: {os.getloadavg()[0]:.1f} (1 min)")
    definition = load_builtin(DATASET)
    tok = tiny_tokenizer()
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llm4es-bench-refresh-")))
        else:
            root = args.workdir
            root.mkdir(parents=True, exist_ok=False)
        model = save_tiny_model(root / "tiny", tok, seed=0, max_positions=512)
        base = ClickstreamConfig(visitors=args.visitors, seed=args.seed, days=args.days,
                                 mean_sessions=args.mean_sessions, start=date(2024, 1, 1))
        gen = write_clickstream(root / "base", base)
        delta_users = write_delta(root / "delta", base, args.delta_share, 1, args.seed + 1)
        print(f"base: {gen.n_visitors:,} visitors, {gen.n_events:,} clicks; delta: {len(delta_users):,} visitors")
        home = Home.resolve(root / "home")
        ingest(home, definition, IngestConfig(root / "base"))
        assert validate(home, DATASET, ValidateConfig(data_docs=False)).success

        full: dict[str, float] = {}
        _, full["serialize"] = timed(lambda: serialize(home, DATASET, SerializeConfig(model="tiny",
                                                       max_tokens=args.max_tokens), tokenizer=tok))
        _, full["embed"] = timed(lambda: embed(home, DATASET, EmbedConfig(model=str(model), layers="1:",
                                                                          max_length=args.max_tokens + 8)))
        _, full["aggregate"] = timed(lambda: aggregate(home, DATASET, AggregateConfig()))
        if not args.no_sessions:
            full.update(full_sessions(home, args))
        full["gate"] = full["session_gate"] = 0.0  # a full run has no snapshot gate today
        _, full["publish"] = timed(lambda: publish(home, DATASET, PublishConfig(materialize=True)))

        _, t_append = timed(lambda: append(home, definition, IngestConfig(root / "delta")))
        # the delta first: it needs the validation before the append to be the last one
        rep_d, t_validate_delta = timed(lambda: validate(home, DATASET, ValidateConfig(data_docs=False, delta=True)))
        assert rep_d.success and rep_d.scope.startswith("delta"), rep_d.scope
        rep, t_validate = timed(lambda: validate(home, DATASET, ValidateConfig(data_docs=False)))
        assert rep.success
        if args.workdir is not None:
            shutil.copytree(home.root, root / "home.before-refresh")
        r, t_refresh = timed(lambda: refresh(home, DATASET, tokenizer=tok))
        assert r.published and r.users == delta_users, (len(r.users), len(delta_users))
        print(f"load average after: {os.getloadavg()[0]:.1f} (1 min)")
        print(f"append {t_append:.2f}s, validate --delta {t_validate_delta:.2f}s ({rep_d.scope}), validate (whole "
              f"table) {t_validate:.2f}s: not part of refresh")
        print(f"refreshed: {', '.join(r.refreshed)}; not refreshed: {', '.join(r.not_refreshed) or 'nothing'}")
        print(f"| stage | full run | refresh ({len(r.users):,} users) | refresh / full |")
        print("|---|---|---|---|")
        for stage in STAGES:
            if stage not in full:
                continue
            f, s = full[stage], r.seconds.get(stage, 0.0)
            print(f"| {stage} | {f:.2f} s | {s:.2f} s | {f'{s / f:.1%}' if f else 'n/a'} |")
        total_full = sum(full.values())
        ratio = t_refresh / total_full
        print(f"| all (refresh wall clock) | {total_full:.2f} s | {t_refresh:.2f} s | **{ratio:.1%}** |")


def full_sessions(home: Home, args: argparse.Namespace) -> dict[str, float]:
    """The sessions and intents stages of a full run, timed: build, train, embed, then taxonomy + labels +
    distill (word-overlap labels: an LLM labeller would only make the full run dearer; refresh never labels)."""
    from producers.enrich.options import LLMOptions
    from producers.intents import DistillConfig, LabelConfig, distill_intents, import_taxonomy, label_sessions
    from producers.sessions import SessionEncoderConfig, build_sessions, embed_sessions, train_encoder

    encoder = SessionEncoderConfig(epochs=args.session_epochs, progress=False)
    lexical = LLMOptions(backend="lexical")
    out: dict[str, float] = {}
    _, out["sessions"] = timed(lambda: build_sessions(home, DATASET))
    _, out["session_train"] = timed(lambda: train_encoder(home, DATASET, encoder))
    _, out["session_embed"] = timed(lambda: embed_sessions(home, DATASET, encoder))

    def intents() -> None:
        import_taxonomy(home, DATASET, TAXONOMY)
        label_sessions(home, DATASET, LabelConfig(sample_size=args.label_sample, llm=lexical, progress=False))
        distill_intents(home, DATASET, DistillConfig(llm=lexical, llm_latency_sessions=0, progress=False))

    _, out["intents"] = timed(intents)
    return out


if __name__ == "__main__":
    main()
