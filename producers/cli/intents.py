"""`llm4es intents build|label|distill`: interpretable session intents."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from producers.cli import printers
from producers.cli.defaults import config_defaults
from producers.cli.errors import handle_errors
from producers.cli.options import PipelineOrder, dataset_arg, llm_options, pass_pipeline, with_llm

if TYPE_CHECKING:
    from producers.pipeline import Pipeline

T = config_defaults("producers.intents.config", "TaxonomyConfig")
L = config_defaults("producers.intents.config", "LabelConfig")
D = config_defaults("producers.intents.config", "DistillConfig")


@click.group(cls=PipelineOrder)
def intents() -> None:
    """Interpretable session intents: LLM taxonomy, LLM labels, a fast distilled classifier.

    \b
      llm4es intents build DATASET     the LLM proposes and refines a taxonomy (or --from-file)
      llm4es intents label DATASET     the LLM labels a sample of sessions (cached, resumable)
      llm4es intents distill DATASET   a classifier on session embeddings learns those labels
                                       -> session_intents (then `publish`)

    Needs `llm4es sessions build` (and `sessions embed` for distill). The LLM is a local model
    (default SmolLM2-135M-Instruct, too small for good taxonomies: use a bigger local model or
    an OpenAI-compatible server, e.g. vLLM, with --llm-backend openai --endpoint URL).
    """


@intents.command("build")
@dataset_arg
@click.option("--sample-size", type=click.IntRange(1), default=T.sample_size, show_default=True,
              help="Sessions summarised per round.")
@click.option("--rounds", type=click.IntRange(1), default=T.rounds, show_default=True,
              help="Round 1 proposes a taxonomy; each later round refines it on new sessions.")
@click.option("--max-labels", type=click.IntRange(2), default=T.max_labels, show_default=True)
@click.option("--seed", type=int, default=T.seed, show_default=True, help="Which sessions are sampled.")
@click.option("--from-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Store a taxonomy a person wrote or reviewed (`name: description` per line, or a "
                   "taxonomy-vN.md table) as the next version instead of asking the LLM.")
@llm_options
@pass_pipeline
@handle_errors
def intents_build(p: Pipeline, dataset: str, sample_size: int, rounds: int, max_labels: int, seed: int,
                  from_file: Path | None, llm_backend: str, llm_model: str, endpoint: str | None, concurrency: int,
                  timeout_s: float, max_chars: int, progress: bool | None) -> None:
    """Build an intent taxonomy for DATASET's sessions (a new version in intent_taxonomies).

    The LLM summarises sampled sessions in one sentence each, proposes at most --max-labels labels
    (name and one-line description) and refines them over further samples. The taxonomy is
    versioned in the warehouse and written for people to read to
    reports/intents/<schema>/taxonomy-v<N>.md; review it, edit it, and store the edit with
    --from-file.
    """
    if from_file is not None:
        r = p.intents_import(dataset, from_file, max_labels)
    else:
        from producers.intents.config import TaxonomyConfig

        base = TaxonomyConfig()
        config = TaxonomyConfig(sample_size=sample_size, rounds=rounds, max_labels=max_labels, seed=seed,
                                llm=with_llm(base.llm, llm_backend, llm_model, endpoint, concurrency, timeout_s),
                                text=replace(base.text, max_chars=max_chars), progress=progress)
        r = p.intents_build(dataset, config)
    printers.print_intents_build(r, dataset)


@intents.command("label")
@dataset_arg
@click.option("--sample-size", type=click.IntRange(0), default=L.sample_size, show_default=True,
              help="Sessions the LLM labels (0: all).")
@click.option("--mode", type=click.Choice(["generate", "score"]), default=L.mode, show_default=True,
              help="generate: the LLM writes a label name (parsed, checked against the taxonomy); score (local "
                   "back end): the label name the LLM finds most likely, always valid and cheaper on a CPU.")
@click.option("--taxonomy-version", type=click.IntRange(1), default=L.taxonomy_version, help="Default: the newest.")
@click.option("--seed", type=int, default=L.seed, show_default=True)
@llm_options
@pass_pipeline
@handle_errors
def intents_label(p: Pipeline, dataset: str, sample_size: int, mode: str, taxonomy_version: int | None, seed: int,
                  llm_backend: str, llm_model: str, endpoint: str | None, concurrency: int, timeout_s: float,
                  max_chars: int, progress: bool | None) -> None:
    """The LLM gives a sample of DATASET's sessions one taxonomy label each.

    Answers are checked against the taxonomy (one that names no label is kept with its raw
    text, label empty), cached in intent_llm_labels after every batch: the same command after an
    interruption asks only for what is missing.
    """
    from producers.intents.config import LabelConfig

    base = LabelConfig()
    config = LabelConfig(sample_size=sample_size or None, taxonomy_version=taxonomy_version, mode=mode, seed=seed,
                         llm=with_llm(base.llm, llm_backend, llm_model, endpoint, concurrency, timeout_s),
                         text=replace(base.text, max_chars=max_chars), progress=progress)
    printers.print_intents_label(p.intents_label(dataset, config), dataset)


@intents.command("distill")
@dataset_arg
@click.option("--classifier", type=click.Choice(["logreg", "lightgbm"]), default=D.classifier, show_default=True)
@click.option("--test-share", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=D.test_share,
              show_default=True, help="Held-out labelled sessions the agreement is measured on.")
@click.option("--llm-latency-sessions", type=click.IntRange(0), default=D.llm_latency_sessions, show_default=True,
              help="Held-out sessions sent through the LLM again, to time it in the same run (0: skip).")
@click.option("--taxonomy-version", type=click.IntRange(1), default=D.taxonomy_version,
              help="Default: the newest with labels.")
@click.option("--seed", type=int, default=D.seed, show_default=True)
@llm_options
@pass_pipeline
@handle_errors
def intents_distill(p: Pipeline, dataset: str, classifier: str, test_share: float, llm_latency_sessions: int,
                    taxonomy_version: int | None, seed: int, llm_backend: str, llm_model: str, endpoint: str | None,
                    concurrency: int, timeout_s: float, max_chars: int, progress: bool | None) -> None:
    """Distill the LLM's labels into a light classifier on session embeddings and cheap session features.

    Reports its agreement with the LLM on held-out sessions (micro and macro F1) and the latency
    per session of both, measured in this run; then labels every session: session_intents table
    and data/<schema>/session_intents.parquet (label and probabilities), served by `publish`.
    """
    from producers.intents.config import DistillConfig

    base = DistillConfig()
    config = DistillConfig(classifier=classifier, test_share=test_share, llm_latency_sessions=llm_latency_sessions,
                           taxonomy_version=taxonomy_version, seed=seed,
                           llm=with_llm(base.llm, llm_backend, llm_model, endpoint, concurrency, timeout_s),
                           text=replace(base.text, max_chars=max_chars), progress=progress)
    printers.print_intents_distill(p.intents_distill(dataset, config), dataset)
