"""Synthetic datasets with a known answer, for checking producers whose truth is otherwise unknown.

`clickstream`: a bank website's clicks with planted session intents (the built-in
`bank-clickstream` dataset and `llm4es synth-clicks`); `crosschannel`: the same people's app
visits, tile clicks and product openings, with some web sessions linked to app users
(`llm4es synth-clicks --app-users SHARE`).
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
