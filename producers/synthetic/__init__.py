"""Synthetic datasets with a known answer, for checking producers whose truth is otherwise unknown.

`clickstream`: a bank website's clicks with planted session intents (the built-in
`bank-clickstream` dataset and `llm4es synth-clicks`).
"""
from producers.synthetic.clickstream import (
    PLANTED_INTENTS,
    ClickstreamConfig,
    ClickstreamError,
    ClickstreamResult,
    generate_clickstream,
    write_clickstream,
)

__all__ = ["PLANTED_INTENTS", "ClickstreamConfig", "ClickstreamError", "ClickstreamResult",
           "generate_clickstream", "write_clickstream"]
