"""A labeller that is not an LLM: the taxonomy label whose name and description share the most words
with the session (TF-IDF cosine), for `intents label --llm-backend lexical`.

Why it exists: labelling needs an instruct model that can read a session, and the one model that
ships offline (SmolLM2-135M) cannot (see benchmarks/RESULTS.md). A word-overlap labeller is the
weak-supervision baseline a team would try before paying for an LLM: free, instant, and as good
as the taxonomy's descriptions are specific. It answers the same label prompt as the LLM back ends
(the `generate` interface), so caching, parsing, distillation and latency timing are unchanged;
it cannot summarise sessions or propose a taxonomy (`intents build` needs an LLM or --from-file).
"""
from __future__ import annotations

import re

from producers.enrich.backends import GenerationError, Messages
from producers.intents.prompts import PROMPTS

_WORD = re.compile(r"[a-z]+")
# The label prompt's template as a pattern: whatever the wording, its taxonomy and session come back out.
_LABEL_PROMPT = re.compile(
    re.escape(PROMPTS["label"]).replace(re.escape("{taxonomy}"), "(?P<taxonomy>.*?)")
    .replace(re.escape("{session}"), "(?P<session>.*)").replace(re.escape("{event_noun}"), ".*?"), re.DOTALL)


class LexicalBackend:
    """`generate` answers each label prompt with the best-matching label name (or "none")."""

    name = "lexical"
    model = "tfidf-overlap/v1"
    batch_size = 64

    def prompt_tokenizer(self):
        return None

    def generate(self, prompts: list[Messages], seeds: list[int]) -> list[str | GenerationError]:
        return [self._answer(p[-1]["content"]) for p in prompts]

    def _answer(self, prompt: str) -> str | GenerationError:
        parts = _split_label_prompt(prompt)
        if parts is None:
            return GenerationError("the lexical labeller only answers label prompts (it cannot summarise "
                                   "sessions or propose a taxonomy: use an LLM, or `intents build --from-file`)")
        labels, session = parts
        return best_label(labels, session) or "none"


def _split_label_prompt(prompt: str) -> tuple[list[tuple[str, str]], str] | None:
    """(label name, description) pairs and the session text of a label prompt, None for another prompt."""
    match = _LABEL_PROMPT.fullmatch(prompt)
    if match is None:
        return None
    labels = []
    for line in match["taxonomy"].strip().splitlines():
        name, _, description = line.partition(":")
        if name.strip():
            labels.append((name.strip(), description.strip()))
    return labels, match["session"]


def words(text: str) -> list[str]:
    """Lower-case words, snake_case and paths split, a plural `s` dropped (mortgages = mortgage)."""
    out = []
    for w in _WORD.findall(text.lower().replace("_", " ")):
        out.append(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return out


def best_label(labels: list[tuple[str, str]], session: str) -> str | None:
    """The label with the highest TF-IDF cosine to the session; IDF over the labels, so a word every
    label shares weighs nothing. None when no label shares a word with the session."""
    import math
    from collections import Counter

    docs = [Counter(words(f"{name} {description}")) for name, description in labels]
    df = Counter(w for doc in docs for w in doc)
    idf = {w: math.log((1 + len(docs)) / (1 + n)) + 1 for w, n in df.items()}
    session_counts = Counter(w for w in words(session) if w in idf)
    if not session_counts:
        return None

    def vector(counts: Counter) -> dict[str, float]:
        v = {w: (1 + math.log(c)) * idf[w] for w, c in counts.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    s = vector(session_counts)
    scores = [sum(s.get(w, 0.0) * x for w, x in vector(doc).items()) for doc in docs]
    best = max(range(len(labels)), key=lambda i: scores[i])
    return labels[best][0] if scores[best] > 0 else None
