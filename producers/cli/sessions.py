"""`llm4es sessions build|train|embed`: session embeddings."""
from __future__ import annotations

from typing import TYPE_CHECKING

import click

from producers.cli import printers
from producers.cli.defaults import config_defaults
from producers.cli.errors import handle_errors
from producers.cli.options import PipelineOrder, dataset_arg, encoder_options, force_opt, pass_pipeline

if TYPE_CHECKING:
    from producers.pipeline import Pipeline
    from producers.sessions.config import SessionEncoderConfig

SESSIONS = config_defaults("producers.sessions.config", "SessionsConfig")


@click.group(cls=PipelineOrder)
def sessions() -> None:
    """Session embeddings: cut events into sessions, train a session encoder, embed every session.

    \b
      llm4es sessions build DATASET    sessions table (explicit session column or inactivity gap)
      llm4es sessions train DATASET    self-supervised Transformer, checkpoint per epoch, resumable
      llm4es sessions embed DATASET    one vector per session -> session_embeddings (then `publish`)
    """


@sessions.command("build")
@dataset_arg
@click.option("--gap-minutes", type=click.FloatRange(0, min_open=True), default=SESSIONS.gap_minutes,
              help="Inactivity that starts a new session. Default: the dataset definition's events.sessions "
                   "(30 minutes unless it says otherwise; MovieLens: a day). Ignored where the definition names "
                   "an explicit session column.")
@force_opt
@pass_pipeline
@handle_errors
def sessions_build(p: Pipeline, dataset: str, gap_minutes: float | None, force: bool) -> None:
    """Cut DATASET's events into sessions: tables sessions and session_events in the warehouse.

    Checked with Great Expectations before they replace the previous tables (ids unique and not
    empty, every event in exactly one session, a session never spans two users); a failure
    prints which check and examples, and leaves the previous tables as they were.
    """
    from producers.sessions.config import SessionsConfig

    printers.print_sessions_build(p.sessions_build(dataset, SessionsConfig(gap_minutes=gap_minutes, force=force)))


def _encoder_config(epochs: int, batch_size: int, lr: float, d_model: int, n_layers: int, max_events: int,
                    seed: int, device: str, threads: int, force: bool) -> SessionEncoderConfig:
    from producers.sessions.config import SessionEncoderConfig

    return SessionEncoderConfig(epochs=epochs, batch_size=batch_size, lr=lr, d_model=d_model, n_layers=n_layers,
                                max_events=max_events, seed=seed, device=device, threads=threads, force=force)


@sessions.command("train")
@dataset_arg
@encoder_options
@pass_pipeline
@handle_errors
def sessions_train(p: Pipeline, dataset: str, epochs: int, batch_size: int, lr: float, d_model: int, n_layers: int,
                   max_events: int, seed: int, device: str, threads: int, force: bool) -> None:
    """Train the session encoder on DATASET's sessions (run `sessions build` first).

    A small Transformer over each session's events (categorical, numeric and text fields as the
    dataset definition types them, plus the time since the previous event), trained
    self-supervised: masked-event modelling (predict the fields of hidden events) plus a
    contrastive loss between two random crops of the same session (so the pooled vector itself
    summarises the session). Checkpoints every epoch under runs/<dataset>/sessions/<run>/; the
    same command after an interruption resumes, and a finished run is reused.
    """
    config = _encoder_config(epochs, batch_size, lr, d_model, n_layers, max_events, seed, device, threads, force)
    printers.print_sessions_train(p.sessions_train(dataset, config), dataset)


@sessions.command("embed")
@dataset_arg
@encoder_options
@pass_pipeline
@handle_errors
def sessions_embed(p: Pipeline, dataset: str, epochs: int, batch_size: int, lr: float, d_model: int, n_layers: int,
                   max_events: int, seed: int, device: str, threads: int, force: bool) -> None:
    """Embed every session of DATASET with the encoder `sessions train` trained (same options).

    Output: the session_embeddings table and data/<schema>/session_embeddings.parquet (with the
    run, epoch, config and data version in its metadata); `llm4es publish` serves them.
    """
    config = _encoder_config(epochs, batch_size, lr, d_model, n_layers, max_events, seed, device, threads, force)
    printers.print_sessions_embed(p.sessions_embed(dataset, config), dataset)
