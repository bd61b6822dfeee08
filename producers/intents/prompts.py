"""The prompts of the intent stages (TnT-LLM: summarise, propose, refine; then label) and their parsers.

Changing any text here changes `PROMPTS["version"]`'s meaning: bump it, so cached labels made
with the old wording are not mistaken for answers to the new one (the label cache keys on a hash
of the version and the full prompt).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

PROMPTS = {
    "version": "intents/v1",
    "system": ("You are an analyst of customer behaviour. You read logs of {event_noun} made by one visitor "
               "in one session and work out what the visitor was trying to do. You answer briefly and exactly "
               "in the format asked for."),
    "summarise": ("Here is one session of {event_noun}:\n\n{session}\n\n"
                  "In one sentence, summarise what the visitor was trying to do in this session. "
                  "Answer with that sentence only."),
    "propose": ("Here are one-sentence summaries of {n} sessions of {event_noun}:\n\n{summaries}\n\n"
                "Propose a taxonomy of at most {max_labels} visitor intents that together cover these sessions. "
                "Answer with one intent per line, in the form\n"
                "label_name: one-line description\n"
                "where label_name is a short snake_case name. No other text."),
    "refine": ("Here is the current taxonomy of visitor intents:\n\n{taxonomy}\n\n"
               "Here are one-sentence summaries of {n} more sessions of {event_noun}:\n\n{summaries}\n\n"
               "Revise the taxonomy so that it covers all sessions well: merge labels that mean the same, "
               "split a label that covers unrelated intents, add an intent that is missing, and keep at most "
               "{max_labels} labels. Answer with the full revised taxonomy, one intent per line, in the form\n"
               "label_name: one-line description\n"
               "where label_name is a short snake_case name. No other text."),
    "label": ("Intent labels:\n\n{taxonomy}\n\nHere is one session of {event_noun}:\n\n{session}\n\n"
              "Which intent label best describes what the visitor was trying to do? "
              "Answer with exactly one label name from the list above, nothing else."),
}

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Label:
    name: str
    description: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "description": self.description}


def _messages(event_noun: str, user: str) -> Messages:
    return [{"role": "system", "content": PROMPTS["system"].format(event_noun=event_noun)},
            {"role": "user", "content": user}]


def taxonomy_lines(labels: list[Label]) -> str:
    return "\n".join(f"{lb.name}: {lb.description}" if lb.description else lb.name for lb in labels)


def bullet_list(items: list[str]) -> str:
    return "\n".join(f"- {' '.join(s.split())}" for s in items)


def summarise_prompt(event_noun: str, session: str) -> Messages:
    return _messages(event_noun, PROMPTS["summarise"].format(event_noun=event_noun, session=session))


def propose_prompt(event_noun: str, summaries: list[str], max_labels: int) -> Messages:
    return _messages(event_noun, PROMPTS["propose"].format(event_noun=event_noun, n=len(summaries),
                                                           summaries=bullet_list(summaries), max_labels=max_labels))


def refine_prompt(event_noun: str, labels: list[Label], summaries: list[str], max_labels: int) -> Messages:
    return _messages(event_noun, PROMPTS["refine"].format(event_noun=event_noun, taxonomy=taxonomy_lines(labels),
                                                          n=len(summaries), summaries=bullet_list(summaries),
                                                          max_labels=max_labels))


def label_prompt(event_noun: str, labels: list[Label], session: str) -> Messages:
    """The same prompt for both label modes: generate answers it, score ranks the label names after it."""
    return _messages(event_noun, PROMPTS["label"].format(event_noun=event_noun, taxonomy=taxonomy_lines(labels),
                                                         session=session))


def prompt_hash(messages: Messages) -> str:
    return hashlib.sha256(json.dumps([PROMPTS["version"], messages]).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------

_MARKUP = re.compile(r"[*_`#>\"']+")
_BULLET = re.compile(r"^\s*(?:[-*+•▪◦]|\d+[.)]|[a-zA-Z][.)](?=\s)|\(\d+\))\s*")
_SEPARATOR = re.compile(r"\s*(?::|\s[-–—]\s|[–—])\s*")
_PLACEHOLDERS = {"label_name", "label", "name", "intent", "intent_label", "description", "taxonomy", "category"}
MAX_NAME_WORDS = 6
"""A "name" of more words than this is a sentence that happened to contain a colon, not a label."""


def snake_name(text: str) -> str:
    """'**Card Activation**' -> 'card_activation': lower case, runs of anything else become one _."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def parse_taxonomy(text: str, max_labels: int) -> list[Label]:
    """Labels from an LLM's answer: one `name: description` per line, markup tolerated.

    Takes bullets, numbering, markdown bold/code, headings, `:`/` - `/`—` separators and markdown
    table rows; names become snake_case; lines that are prose (too many words before the
    separator), headers ending in ':', placeholders ("label_name") and repeats are dropped; at most
    `max_labels` are kept, in the answer's order.
    """
    labels: list[Label] = []
    seen: set[str] = set()
    for raw in (text or "").splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) < 2 or set(cells[0]) <= set("-: "):
                continue
            name_part, desc = cells[0], cells[1]
        else:
            line = _BULLET.sub("", line, count=1).strip()
            parts = _SEPARATOR.split(line, maxsplit=1)
            if len(parts) == 2:
                name_part, desc = parts
                if not desc.strip(" *_`\"'"):
                    continue  # "Taxonomy:" or "**Intents:**" -- a heading
            else:
                name_part, desc = line, ""
                if len(line.split()) > 1 and "_" not in line:
                    continue  # a bare line of prose
        clean = _MARKUP.sub(" ", name_part).strip()
        name = snake_name(clean)
        if not name or name in _PLACEHOLDERS or name in seen or len(clean.split()) > MAX_NAME_WORDS:
            continue
        if not re.search(r"[a-z]", name):
            continue
        description = " ".join(_MARKUP.sub(" ", desc).split()).strip(" .,;") if desc else ""
        labels.append(Label(name, description))
        seen.add(name)
        if len(labels) >= max_labels:
            break
    return labels


def parse_label(answer: str, names: list[str]) -> str | None:
    """The taxonomy label an answer names: the whole answer, else the first label name mentioned.

    Case, markup and punctuation do not matter ("**Card Activation**." is card_activation); where
    two names start at the same place the longer wins (card_payment over card). None when no
    label name occurs.
    """
    flat = snake_name(answer or "")
    if not flat:
        return None
    if flat in names:
        return flat
    padded = f"_{flat}_"
    best: tuple[int, int, str] | None = None
    for name in names:
        at = padded.find(f"_{name}_")
        if at >= 0 and (best is None or (at, -len(name)) < best[:2]):
            best = (at, -len(name), name)
    return best[2] if best else None


def first_sentence(text: str, limit: int = 300) -> str:
    """A summary as one line: the answer's first non-empty line, markup removed, cut to `limit`."""
    for line in (text or "").splitlines():
        line = " ".join(line.replace("**", "").split()).strip()
        if line:
            return line[:limit]
    return ""
