"""Which hidden states are averaged: `--layers` specs resolved against the model's hidden states."""
from __future__ import annotations

from typing import Any

from training.embed.config import EmbedError


def resolve_layers(spec: str, n_hidden_states: int) -> range:
    """The hidden-state indices `spec` selects out of `n_hidden_states` (= layers + 1).

    `"9:"` is `hidden_states[9:]`, `"-4:"` the last four, `"a:b"` a Python slice, `"all"` every
    one (embedding output included), `"last"` the final hidden state, `"12"` just index 12.
    """
    s = spec.strip().lower()
    n = n_hidden_states
    try:
        if s == "all":
            chosen = range(n)
        elif s == "last":
            chosen = range(n - 1, n)
        elif ":" in s:
            a, b = s.split(":", 1)
            chosen = range(n)[slice(int(a) if a.strip() else None, int(b) if b.strip() else None)]
        else:
            i = int(s)
            if not -n <= i < n:
                raise EmbedError(f"layer {i} does not exist: the model has {n} hidden states (0 to {n - 1})")
            chosen = range(i % n, i % n + 1)
    except ValueError as e:
        if isinstance(e, EmbedError):
            raise
        raise EmbedError(f"layers {spec!r}: expected 'a:b' (either side optional), one index, 'all' or 'last'") from e
    if len(chosen) == 0:
        raise EmbedError(f"layers {spec!r} select none of the model's {n} hidden states "
                         f"(0 = embedding output, {n - 1} = last)")
    return chosen


def layers_label(chosen: range) -> str:
    return f"{chosen.start}:{chosen.stop}"


def text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if getter else config


def n_decoder_layers(config: Any) -> int:
    return n_hidden_states(config) - 1


def n_hidden_states(config: Any) -> int:
    """`len(output.hidden_states)`: the layers plus the embedding output."""
    return int(text_config(config).num_hidden_layers) + 1
