"""Baseline user features: `aggregate` (SQL aggregates) and `coles` (CoLES embeddings)."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import click

from producers.cli import printers
from producers.cli.defaults import config_defaults
from producers.cli.errors import handle_errors
from producers.cli.options import dataset_arg, force_opt, pass_pipeline

if TYPE_CHECKING:
    from producers.pipeline import Pipeline

A = config_defaults("producers.aggregate", "AggregateConfig")
C = config_defaults("producers.coles.config", "ColesConfig")


@click.command()
@dataset_arg
@click.option("--top-n", type=click.IntRange(0), default=A.top_n, show_default=True,
              help="Most frequent values of each categorical (or multi-valued / low-cardinality text) field "
                   "that get their own columns.")
@click.option("--as-of", type=click.DateTime(), default=A.as_of,
              help="Snapshot time (UTC, e.g. 1998-03-01T00:00:00): later events are ignored. "
                   "[default: the dataset's last event]")
@click.option("--amount-field", default=A.amount_field,
              help="Numeric field summed per category. [default: a numeric field named `amount`, if any]")
@force_opt
@pass_pipeline
@handle_errors
def aggregate(p: Pipeline, dataset: str, top_n: int, as_of: datetime | None, amount_field: str | None,
              force: bool) -> None:
    """Compute aggregate features per user (the paper's "agg" baseline) in SQL.

    One row per user with events up to --as-of, stamped feature_timestamp = as-of:
    activity (n_events, active_days, span_days, events_per_active_day, recency_days);
    count, mean, std, min, max and sum of each numeric field; for each categorical field (and
    each text field that is multi-valued, split as the dataset's summary splits it, or has at
    most 50 distinct values), the number of distinct values and, for its --top-n most frequent
    values, the user's event count and share, amount sum, and mean of every numeric field in
    each (mean rating per genre). Free text (titles) is not used. Written to table
    agg_features (what produced it: agg_features_meta) and data/<schema>/agg_features.parquet.
    """
    t0 = time.perf_counter()
    r = p.aggregate(dataset, top_n, as_of, amount_field, force)
    printers.print_aggregate(r, time.perf_counter() - t0)


@click.command()
@dataset_arg
@click.option("--epochs", type=click.IntRange(1), default=C.epochs, show_default=True,
              help="Training epochs; asking a finished run for more continues it.")
@click.option("--hidden-size", type=click.IntRange(1), default=C.hidden_size, show_default=True,
              help="GRU hidden size = the embedding's dimension.")
@click.option("--batch-size", type=click.IntRange(2), default=C.batch_size, show_default=True,
              help="Users per batch.")
@click.option("--lr", type=float, default=C.lr, show_default=True)
@click.option("--pooling", type=click.Choice(["mean", "last"]), default=C.pooling, show_default=True,
              help="The vector: GRU states averaged over the user's events, or the state after the last one. "
                   "Only reads the encoder: a finished run is reused.")
@click.option("--seed", type=int, default=C.seed, show_default=True)
@click.option("--as-of", type=click.DateTime(), default=C.as_of,
              help="Only events up to this time (UTC). Default: the dataset's last event.")
@click.option("--device", default=C.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--max-batches-per-epoch", type=click.IntRange(1), default=C.max_batches_per_epoch, show_default=True,
              help="Cap on an epoch: bigger datasets see a fresh random sample of users each epoch.")
@click.option("--restart", is_flag=True, help="Train from scratch even if a run with the same settings exists.")
@force_opt
@pass_pipeline
@handle_errors
def coles(p: Pipeline, dataset: str, epochs: int, hidden_size: int, batch_size: int, lr: float, pooling: str,
          seed: int, as_of: datetime | None, device: str, max_batches_per_epoch: int, restart: bool,
          force: bool) -> None:
    """CoLES user embeddings (the paper's strongest baseline), trained with pytorch-lifestream.

    A GRU over each user's events (categorical fields embedded, numeric fields and the time since
    the previous event as inputs), trained with CoLES's contrastive loss on random sub-sequences;
    one vector per user (by default the GRU states averaged over the user's events). Checkpoints
    every epoch under runs/<dataset>/coles/<run>/; the same command after an interruption resumes.
    Output: coles_embeddings table and Parquet file.

    \b
    Caps and rules:
      - each categorical field: its 2,000 most frequent values get codes, the rest one "other" code;
      - each user: the last 1,000 events are used (training and embedding);
      - sub-sequences of 15 to 50 events are contrasted: a user with fewer than 15 events is
        warned about (count and share); when at least two batches of users have 15 events or
        more, only they train (everyone is embedded);
      - an epoch is at most --max-batches-per-epoch batches of --batch-size users.
    """
    from producers.coles.config import ColesConfig

    config = ColesConfig(epochs=epochs, hidden_size=hidden_size, batch_size=batch_size, lr=lr, pooling=pooling,
                         seed=seed, as_of=as_of.replace(tzinfo=timezone.utc) if as_of else None, device=device,
                         max_batches_per_epoch=max_batches_per_epoch, resume=not restart, force=force)
    printers.print_coles(p.coles(dataset, config))
