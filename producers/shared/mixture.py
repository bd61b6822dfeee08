"""Which texts feed fine-tuning: a mixture of variants per kind, as in the paper's Table 9.

`template:7` (the paper's best: 7 mixed-format rewrites per user) takes variants 0..6 of the
template kind; `serialized:1,llm:7` takes the serialized text plus 7 LLM rewrites; and so on.
"""
from __future__ import annotations

from dataclasses import dataclass

from producers.errors import Llm4esError
from producers.stores.texts import KINDS


class MixtureError(Llm4esError, ValueError):
    """The mixture is malformed or asks for texts that were not produced."""


@dataclass(frozen=True)
class Mixture:
    serialized: int = 0
    template: int = 7
    llm: int = 0

    @classmethod
    def parse(cls, spec: str) -> "Mixture":
        counts = dict.fromkeys(KINDS, 0)
        for part in filter(None, (p.strip() for p in spec.split(","))):
            kind, _, n = part.partition(":")
            if kind not in counts or not n.isdigit():
                raise MixtureError(f"mixture {spec!r}: each part is KIND:N with KIND one of {', '.join(KINDS)}")
            counts[kind] = int(n)
        if not any(counts.values()):
            raise MixtureError(f"mixture {spec!r} selects no texts")
        return cls(**counts)

    def __str__(self) -> str:
        return ",".join(f"{k}:{getattr(self, k)}" for k in KINDS if getattr(self, k))

    def where(self) -> str:
        """SQL condition on the texts table selecting this mixture."""
        parts = [f"(kind = '{k}' AND variant < {getattr(self, k)})" for k in KINDS if getattr(self, k)]
        return " OR ".join(parts)


def check_available(con, schema: str, mixture: Mixture) -> dict[str, int]:
    """Texts per kind the mixture will use; error when a kind has fewer variants than asked."""
    have = dict(con.execute(f'SELECT kind, count(DISTINCT variant) FROM "{schema}".texts GROUP BY 1').fetchall())
    for kind in KINDS:
        want = getattr(mixture, kind)
        if want and have.get(kind, 0) < want:
            command = "serialize" if kind == "serialized" else f"enrich --enricher {kind} --variants {want}"
            raise MixtureError(f"mixture {mixture} needs {want} {kind} variant(s), the texts table has "
                               f"{have.get(kind, 0)}: run `llm4es {command}` first")
    return dict(con.execute(
        f'SELECT kind, count(*) FROM "{schema}".texts WHERE {mixture.where()} GROUP BY 1').fetchall())
