"""How well recovered intents match the planted ones of the synthetic clickstream.

The taxonomy an LLM proposes names intents in its own words, so agreement is measured through a
mapping learned from the LLM's labels: each taxonomy label maps to the planted intent most of the
sessions it was given belong to (its purity says how clean that is). The distilled classifier's
labels are then scored against the planted intents through the same mapping (accuracy, macro F1)
next to chance (always answering the most frequent planted intent), plus the normalised mutual
information, which needs no mapping at all.
"""
from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb


@dataclass(frozen=True)
class LabelMapping:
    label: str  # a taxonomy label
    planted: str | None  # the planted intent most of its sessions have (None: never assigned)
    n_sessions: int
    purity: float  # share of its sessions with that planted intent


@dataclass
class Agreement:
    taxonomy_version: int
    labeller: str | None
    planted_intents: list[str]
    mapping: list[LabelMapping]
    unmapped_planted: list[str]  # planted intents no taxonomy label maps to
    llm: dict = field(default_factory=dict)  # the LLM's labels vs planted (through the mapping)
    distilled: dict = field(default_factory=dict)  # the classifier's labels vs planted

    def as_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        lines = [f"Taxonomy v{self.taxonomy_version} against the planted intents (labels by {self.labeller})",
                 "", "| taxonomy label | maps to planted intent | sessions | purity |", "|---|---|---:|---:|"]
        lines += [f"| {m.label} | {m.planted or '-'} | {m.n_sessions} | {m.purity:.2f} |" for m in self.mapping]
        lines.append("")
        lines.append(f"Planted intents no label maps to: {', '.join(self.unmapped_planted) or 'none'}")
        for name, scores in ((f"{self.labeller} labels", self.llm), ("distilled labels", self.distilled)):
            if scores:
                lines.append(f"{name}: accuracy {scores['accuracy']:.3f} (chance {scores['chance']:.3f}), "
                             f"macro F1 {scores['macro_f1']:.3f}, NMI {scores['nmi']:.3f}, {scores['n']} sessions")
        return "\n".join(lines)


def read_planted(path: Path) -> dict[str, str]:
    """session_id -> planted intent, from the generator's `planted_intents.csv`."""
    with open(path, newline="") as f:
        return {row["session_id"]: row["intent"] for row in csv.DictReader(f)}


def planted_agreement(con: duckdb.DuckDBPyConnection, schema: str, planted: dict[str, str],
                      taxonomy_version: int | None = None, labeller: str | None = None) -> Agreement:
    """`labeller`: the model whose labels to score (as `intent_llm_labels.model` records it); needed only
    when several labelled sessions with this taxonomy. The distilled labels are `session_intents` as
    they are (the last `intents distill`)."""
    version = taxonomy_version or con.execute(f'SELECT max(version) FROM "{schema}".intent_taxonomies').fetchall()[0][0]
    if version is None:
        raise ValueError(f"{schema} has no intent taxonomy: run `llm4es intents build` first")
    import json

    labels_json = con.execute(f'SELECT labels FROM "{schema}".intent_taxonomies WHERE version = ?',
                              [version]).fetchall()[0][0]
    names = [lbl["name"] for lbl in json.loads(labels_json)]
    models = [m for (m,) in con.execute(f'SELECT DISTINCT model FROM "{schema}".intent_llm_labels '
                                        "WHERE taxonomy_version = ? ORDER BY 1", [version]).fetchall()]
    if labeller is None and len(models) > 1:
        raise ValueError(f"taxonomy v{version} has labels by {', '.join(models)}: name the labeller")
    labeller = labeller or (models[0] if models else None)
    llm_rows = con.execute(f'SELECT session_id, label FROM "{schema}".intent_llm_labels '
                           "WHERE taxonomy_version = ? AND model = ? AND label IS NOT NULL "
                           "QUALIFY row_number() OVER (PARTITION BY session_id ORDER BY created_at DESC) = 1",
                           [version, labeller]).fetchall()
    llm = {s: lbl for s, lbl in llm_rows if s in planted}
    by_label: dict[str, Counter] = defaultdict(Counter)
    for s, lbl in llm.items():
        by_label[lbl][planted[s]] += 1
    mapping = []
    for name in names:
        counts = by_label.get(name, Counter())
        n = sum(counts.values())
        top, k = counts.most_common(1)[0] if counts else (None, 0)
        mapping.append(LabelMapping(name, top, n, k / n if n else 0.0))
    to_planted = {m.label: m.planted for m in mapping if m.planted}
    intents = sorted(set(planted.values()))
    report = Agreement(version, labeller, intents, mapping, sorted(set(intents) - set(to_planted.values())))
    report.llm = _scores(llm, planted, to_planted)
    table = f'"{schema}".session_intents'
    exists = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND "
                         "table_name = 'session_intents'", [schema]).fetchall()[0][0]
    if exists:
        distilled = dict(con.execute(f"SELECT session_id, label FROM {table} WHERE taxonomy_version = ?",
                                     [version]).fetchall())
        report.distilled = _scores({s: lbl for s, lbl in distilled.items() if s in planted}, planted, to_planted)
    return report


def _scores(predicted: dict[str, str], planted: dict[str, str], to_planted: dict[str, str]) -> dict:
    if not predicted:
        return {}
    from sklearn.metrics import accuracy_score, f1_score, normalized_mutual_info_score

    sessions = sorted(predicted)
    truth = [planted[s] for s in sessions]
    mapped = [to_planted.get(predicted[s], "(unmapped)") for s in sessions]
    majority = Counter(truth).most_common(1)[0][1] / len(truth)
    return {"n": len(sessions), "accuracy": float(accuracy_score(truth, mapped)),
            "macro_f1": float(f1_score(truth, mapped, average="macro", labels=sorted(set(truth)), zero_division=0)),
            "chance": majority,
            "nmi": float(normalized_mutual_info_score(truth, [predicted[s] for s in sessions]))}
