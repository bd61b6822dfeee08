"""Serving: `publish` (Feast apply, optionally materialize)."""
from __future__ import annotations

import click

from producers.cli import printers
from producers.cli.errors import handle_errors
from producers.cli.options import dataset_arg
from producers.pipeline import Pipeline
from producers.publish import PublishConfig

P = PublishConfig


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
@click.pass_obj
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
    r = p.publish(dataset, PublishConfig(llm4es_set=llm4es_set, online_store=online_store, redis_url=redis_url,
                                         materialize=materialize, recent_sessions=recent_sessions,
                                         project=project))
    printers.print_publish(r)
