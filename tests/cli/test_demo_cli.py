"""`llm4es demo` drives producers.demo.run_demo: the steps in order, the plan's cuts shown, a failed validation
stops it with exit 1. Runs on a stand-in Pipeline (fixed results), so it checks the loop and its printing, not
the stages (each has its own tests)."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace as NS

import pandas as pd
from click.testing import CliRunner

from producers.cli.demo import demo

STEPS = ["ingest movielens-100k", "validate movielens-100k", "serialize histories to text",
         "enrich: 7 template rewrites per user", "aggregate features", "fine-tune", "embed every user",
         "CoLES embeddings", "publish to Feast", "materialize into the online store",
         "evaluate: LightGBM and a linear probe", "an online read"]


class Evaluation:
    dataset = "movielens-100k"
    report = {"config": {"protocols": ["paper"]}, "results": {}, "missing": {}}
    merge_note = None
    paths = {"markdown": Path("/h/evaluation.md"), "run_markdown": Path("/h/runs/x/evaluation.md")}
    seconds = 1.0

    def table(self, protocol):
        return [("agg", {"gender ROC-AUC": "0.611 ± 0.020"})]


class StandIn:
    """What the demo calls on a Pipeline, each returning a fixed result; `calls` records the stages run."""

    home = NS(root=Path("/h"), warehouse_path=Path("/h/data/warehouse.duckdb"))

    def __init__(self, valid: bool = True):
        self.valid, self.calls, self.embed_checkpoint = valid, [], "unset"

    def _called(self, name, result):
        self.calls.append(name)
        return result

    def ingest(self, dataset):
        return self._called("ingest", NS(n_events=100, n_users=12, n_rejects=0, skipped=False))

    def validate(self, dataset):
        check = NS(success=self.valid, error=None, where=None, examples=[], check="rating in 1..5", batch="events",
                   checked=100, failed=0 if self.valid else 3, column="rating")
        return self._called("validate", NS(dataset=dataset, results=[check], success=self.valid,
                                           failed=[] if self.valid else [check], json_path="/h/v.json",
                                           data_docs=None))

    def serialize(self, dataset, model, max_tokens, time_format, fmt="paper"):
        self.serialize_args = (model, max_tokens, time_format, fmt)
        return self._called("serialize", NS(n_texts=12, n_events=100, n_events_total=100, n_cut=0,
                                            max_tokens_seen=300))

    def enrich(self, dataset, config):
        return self._called("enrich", NS(written=84, seconds=0.1, by_format={"json": 12}))

    def aggregate(self, dataset):
        return self._called("aggregate", NS(n_users=12, n_features=40, as_of="1998-04-22"))

    def finetune(self, dataset, config):
        return self._called("finetune", NS(losses=[3.0], final_loss=2.5, steps=4, tokens_per_second=10.0,
                                           models=[Path("/r/epoch-1")]))

    def embed(self, dataset, config):
        self.embed_checkpoint = config.checkpoint
        return self._called("embed", NS(sets=[NS(n_users=12, dim=8, checkpoint="base", tokens_per_s=1.0)]))

    def coles(self, dataset, config):
        return self._called("coles", NS(n_users=12, dim=4, model="gru", epoch=1, epochs_trained=0, final_loss=None))

    def publish(self, dataset, config):
        return self._called("publish", NS(views=[NS(name="movielens_100k__agg_features")]))

    def materialize(self, online_store):
        self._called("materialize", None)

    def evaluate(self, dataset, config):
        return self._called("evaluate", Evaluation())

    def first_user(self, dataset):
        return 1

    def online_features(self, dataset, views, user_ids):
        return self._called("online", pd.DataFrame([{"user_id": 1, "llm4es_embedding": [0.5, 0.25, 0.0, 1.0, 2.0],
                                                     "n_events": 9}]))


def run(p: StandIn, hardware: str):
    return CliRunner().invoke(demo, ["--hardware", hardware], obj=p)


def step_titles(output: str) -> list[str]:
    return re.findall(r"(\d+)/12 (.+?) \(\d+s\)", output)


def test_the_cpu_plan_runs_every_step_in_order_without_fine_tuning():
    p = StandIn()
    result = run(p, "cpu")
    assert result.exit_code == 0, result.output
    titles = step_titles(result.output)
    assert [int(i) for i, _ in titles] == list(range(1, 13))
    for (_, title), expected in zip(titles, STEPS):
        assert title.startswith(expected), (title, expected)
    assert "fine-tune: skipped on this hardware" in result.output and "finetune" not in p.calls
    assert p.embed_checkpoint is None and p.serialize_args[3] == "compact"
    assert result.output.count("CPU budget:") == 2
    assert "llm4es_embedding: [0.500, 0.250, 0.000, 1.000, ...] (5 floats)" in result.output
    assert "... and 1 aggregate features" in result.output
    assert p.calls == ["ingest", "validate", "serialize", "enrich", "aggregate", "embed", "coles", "publish",
                       "materialize", "evaluate", "online"]


def test_the_cpu_bf16_plan_embeds_the_base_model_from_compact_texts():
    p = StandIn()
    result = run(p, "cpu-bf16")
    assert result.exit_code == 0, result.output
    assert "finetune" not in p.calls and p.embed_checkpoint is None and p.serialize_args[3] == "compact"
    assert "embed every user with the base model" in result.output


def test_the_gpu_plan_embeds_the_fine_tuned_model():
    p = StandIn()
    result = run(p, "gpu")
    assert result.exit_code == 0, result.output
    assert "finetune" in p.calls and p.embed_checkpoint == "/r/epoch-1"
    assert "embed every user with the fine-tuned model" in result.output


def test_a_failed_validation_stops_the_demo_with_exit_1():
    p = StandIn(valid=False)
    result = run(p, "cpu")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "FAILED" in result.output and [int(i) for i, _ in step_titles(result.output)] == [1, 2]
    assert p.calls == ["ingest", "validate"]
