"""Serving: `publish` (Feast apply, optionally materialize)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import click

from producers.cli import printers
from producers.cli.defaults import config_defaults
from producers.cli.errors import handle_errors
from producers.cli.options import dataset_arg, pass_pipeline

if TYPE_CHECKING:
    from producers.pipeline import Pipeline

P = config_defaults("producers.publish.flow", "PublishConfig")


@click.command()
@dataset_arg
@click.option("--llm4es-set", default=P.llm4es_set,
              help="The LLM4ES embeddings set served as <dataset>__llm4es_embedding (a view label, set id, file "
                   "name or checkpoint). Default: the most recently produced set.")
@click.option("--online-store", type=click.Choice(["sqlite", "redis"]), default=P.online_store, show_default=True,
              help="Whose registry to apply to (and materialize into with --materialize).")
@click.option("--redis-url", default=P.redis_url, help="Redis as host:port[,db=N] [default: 127.0.0.1:6379]")
@click.option("--materialize", is_flag=True, help="Also fill the online store (materialize-incremental up to now).")
@click.option("--recent-sessions", type=click.IntRange(1), default=P.recent_sessions, show_default=True,
              help="K of the session rollups: mean embedding and intent shares over a user's last K sessions.")
@click.option("--project", envvar="LLM4ES_FEAST_PROJECT", default=P.project,
              help="The Feast project (online rows and registry entries are kept per project). [default: "
                   "$LLM4ES_FEAST_PROJECT, the home's current one, else llm4es_<home folder>_<hash of its path>]")
@pass_pipeline
@handle_errors
def publish(p: Pipeline, dataset: str, llm4es_set: str | None, online_store: str, redis_url: str | None,
            materialize: bool, recent_sessions: int, project: str | None) -> None:
    """Serve DATASET's features through Feast: snapshot the files, write the repo's manifest, `feast apply`.

    Publishes what exists of agg_features, coles_embeddings and LLM4ES embeddings (every set: the
    default one as <schema>__llm4es_embedding, the others as <schema>__llm4es__<label>). Snapshots
    with other as-of times accumulate, so historical fetches stay point-in-time correct. Session
    embeddings and intents (`llm4es sessions embed`, `llm4es intents distill`) become the
    session-keyed views <schema>__session_embedding and __session_intent, and the user rollups
    __session_embedding_rollup and __intent_shares (one row per session end, so point in time).
    Then `feast -c feature_repo materialize-incremental <now>` (or --materialize) fills the online store.
    Safe under live readers: views are updated in place, never dropped, and a killed publish leaves the
    previous state serving (see README, "What publish guarantees to live readers").
    """
    from producers.publish import PublishConfig

    r = p.publish(dataset, PublishConfig(llm4es_set=llm4es_set, online_store=online_store, redis_url=redis_url,
                                         materialize=materialize, recent_sessions=recent_sessions,
                                         project=project))
    printers.print_publish(r)


@click.command()
@dataset_arg
@click.option("--full", is_flag=True,
              help="Recompute every user (after re-training: re-embed everyone with --model/--checkpoint).")
@click.option("--model", default=None, help="The LLM to embed with. [default: the served set's]")
@click.option("--checkpoint", default=None,
              help="A fine-tuned epoch folder, or `base`. [default: the served set's] Another model or checkpoint "
                   "than the served one needs --full.")
@click.option("--force", is_flag=True, help="Publish the snapshot even if it fails its quality gate.")
@click.option("--online-store", type=click.Choice(["sqlite", "redis"]), default="sqlite", show_default=True)
@click.option("--redis-url", default=None, help="Redis as host:port[,db=N] [default: 127.0.0.1:6379]")
@click.option("--no-materialize", is_flag=True, help="Publish without materializing into the online store.")
@pass_pipeline
@handle_errors
def refresh(p: Pipeline, dataset: str, full: bool, model: str | None, checkpoint: str | None, force: bool,
            online_store: str, redis_url: str | None, no_materialize: bool) -> None:
    """Recompute only the users of DATASET with new events, gate the snapshot, publish and materialize it.

    Finds the users with events after the served snapshot's as-of (or appended since the last publish),
    recomputes their texts, LLM4ES vectors (the served model, checkpoint, layers and pooling),
    CoLES vectors (inference with the served encoder) and aggregates, runs the
    snapshot gate (dimension, NaN/inf, norms, share present, drift, unchanged users
    keep their vectors) against the served snapshot, then publishes the changed users' rows at the new
    as-of and materializes incrementally. A failing snapshot is not published (--force overrides).
    Sessions of the changed users are cut again; their new or changed sessions are embedded with the served
    session encoder, gated, and labelled with the served intent classifier. Run it after
    `llm4es ingest DATASET --append` and `llm4es validate DATASET`.
    """
    from producers.refresh import RefreshConfig

    r = p.refresh(dataset, RefreshConfig(model=model, checkpoint=checkpoint, full=full, force=force,
                                         online_store=online_store, redis_url=redis_url,
                                         materialize=not no_materialize))
    out = printers.console
    if r.nothing_new:
        out.print(f"[green]✓[/] {dataset}: nothing new since {r.since} — nothing refreshed")
        return
    who = "every user" if full else f"{len(r.users):,} users"
    served = f"; model {r.model} at {r.checkpoint}" if r.model else ""  # no LLM4ES set served: no model to name
    out.print(f"[green]✓[/] {dataset}: refreshed {who} as of {r.as_of} (was {r.since}): "
              f"{', '.join(r.refreshed)}{served}")
    for kind, report in r.gate.items():
        out.print(f"gate ({kind}): {report.splitlines()[0]}")
    for what in r.not_refreshed:
        out.print(f"[yellow]not refreshed:[/] {what}")
    out.print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r.seconds.items()))
    out.print(f"snapshot: {r.snapshot_dir}; published{' and materialized' if not no_materialize else ''}")
