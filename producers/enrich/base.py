"""What every enricher works on and returns.

An enricher rewrites a user's history into another text (JSON, a Markdown table, a prose
summary, an LLM's free rewrite...). It gets the same events the serialized text kept (the most
recent ones within the token budget), each value already rendered as text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from producers.datasets.definition import DatasetDefinition
from producers.errors import Llm4esError


@dataclass(frozen=True)
class UserHistory:
    user_id: int | str
    columns: list[str]  # warehouse names: "time", then the serialized fields
    labels: list[str]  # their human-readable names, as in the serialized header
    rows: list[list[str]]  # one list of rendered values per event, oldest first
    serialized: str  # the serialized text (header + lines) these rows come from


@dataclass(frozen=True)
class Rewrite:
    text: str
    format: str  # "json", "markdown", ..., "llm", or "fallback:<format>" when the LLM's output was refused
    generated: bool = False  # True when a model produced it in this run (not the cache)

    @property
    def fallback(self) -> bool:
        """A template rewrite standing in for a refused or failed LLM output."""
        return self.format.startswith("fallback:")


@dataclass
class EnrichReport:
    dataset: str
    enricher: str
    users: int
    variants: int
    written: int = 0
    by_format: dict[str, int] = field(default_factory=dict)
    generated: int = 0  # LLM calls made in this run
    cached: int = 0  # LLM outputs reused from the cache
    fallbacks: int = 0  # LLM outputs refused by the checks, replaced by a template rewrite
    refusals: dict[str, int] = field(default_factory=dict)  # why outputs were refused
    first_error: str | None = None  # the first back-end error of the run (the endpoint redacted)
    seconds: float = 0.0


    @property
    def fallback_share(self) -> float:
        total = self.users * self.variants
        return self.fallbacks / total if total else 0.0


class EnrichError(Llm4esError, RuntimeError):
    """The enrichment did not produce what was asked (e.g. too many LLM outputs fell back to templates)."""


class Enricher(Protocol):
    name: str

    def rewrite(self, definition: DatasetDefinition, histories: list[UserHistory], variant: int) -> list[Rewrite]:
        """One rewrite per history for this variant; deterministic given the enricher's seed."""
        ...
