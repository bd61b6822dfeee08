"""Sessions and session embeddings.

- `build_sessions` (`build.py`): the dataset's events cut into sessions (an explicit session
  column, or a gap of inactivity), pure DuckDB SQL into `sessions`, `session_events` and
  `sessions_meta`, checked with Great Expectations before they are swapped in;
- `train_encoder` (`features.py`, `model.py`, `train.py`): a small Transformer trained
  self-supervised on the sessions (masked-event modelling + contrastive InfoNCE between two
  augmented views; see `model.py` for why both), with per-epoch checkpoints, exact resume and
  reuse of a finished run;
- `embed_sessions` (`embed.py`): one vector per session with the trained encoder, into
  `session_embeddings` and `data/<schema>/session_embeddings.parquet` (with provenance).

A refresh uses the same stages restricted: `SessionsConfig(users=...)` cuts only those users' sessions
again, `build.changed_sessions` names the new or changed ones, `embed.embed_some` embeds only those with
the served checkpoint and replaces their rows in place (the Parquet copy is written again from the table
before a full publish: `producers.stores.outputs.export_if_behind`).

torch is imported only when training or embedding runs.
"""
from producers.sessions.build import build_sessions
from producers.sessions.config import (SessionEmbedResult, SessionEncoderConfig, SessionEncoderResult,
                                       SessionsConfig, SessionsError, SessionsResult)


def train_encoder(*args, **kwargs) -> SessionEncoderResult:
    """See `producers.sessions.train.train_encoder` (imported on call: it needs torch)."""
    from producers.sessions.train import train_encoder as run

    return run(*args, **kwargs)


def embed_sessions(*args, **kwargs) -> SessionEmbedResult:
    """See `producers.sessions.embed.embed_sessions` (imported on call: it needs torch)."""
    from producers.sessions.embed import embed_sessions as run

    return run(*args, **kwargs)


__all__ = ["SessionsConfig", "SessionsResult", "SessionEncoderConfig", "SessionEncoderResult", "SessionEmbedResult",
           "SessionsError", "build_sessions", "train_encoder", "embed_sessions"]
