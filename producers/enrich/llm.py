"""The `llm` enricher: an instruction-tuned LLM rewrites each history in a free format (paper, Table 1).

For every (user, variant) it
1. builds the prompt: the paper's system and user messages (Table 1), "financial transactions"
   replaced by the dataset's `event_noun`, followed by the user's serialized text cut to
   `max_input_tokens` tokens of the model's tokenizer (the header and the most recent lines stay);
2. looks the prompt up in the cache, keyed by (user_id, variant, model, prompt hash), and sends
   only the missing ones to the back end (`producers.enrich.backends`), in batches, writing the
   cache after every batch so a killed run resumes where it stopped;
3. checks every output (`check_output`) and replaces a refused one by the fallback enricher's
   rewrite (`format = "fallback:<its format>"`).

`stats` (generated, cached, fallbacks, refusals) accumulate over all `rewrite` calls; `run.py`
copies them into the EnrichReport.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from producers.datasets.definition import DatasetDefinition
from producers.enrich.backends import (
    Backend,
    GenerationError,
    make_backend,
    stable_seed,
)
from producers.enrich.base import Enricher, Rewrite, UserHistory
from producers.enrich.options import LLMOptions

# --------------------------------------------------------------------------------------------
# The prompt
# --------------------------------------------------------------------------------------------

PROMPT = {
    "version": "paper-table1/v1",
    # Table 1's system message, word for word but for the kind of events.
    "system": (
        "You are a specialized AI assistant designed for text data transformation.\n"
        "Your task is to take a structured list of {event_noun} and convert them into different text-based "
        "formats based on the user's request.\n"
        "Ensure clarity, accuracy, and proper formatting while preserving all original data fields.\n"
        "You are capable of transforming data into formats including:\n"
        "- JSON, Markdown, HTML, Plain text, tables.\n"
        "Always ensure the output is well-structured and visually clear.\n"
        "If the user specifies a custom format, follow the instructions closely.\n"
        "Ask for clarifications when the format is ambiguous."
    ),
    # Table 1's user message; "transaction types" became "descriptions" (not every dataset has types),
    # and the data follows after a blank line.
    "user": (
        "I have a list of {event_noun} in a structured tabular format.\n"
        "Please creatively transform this data into a different textual representation.\n"
        "You can choose the format freely (JSON, HTML, Markdown, plain text, XML, YAML, or anything else).\n"
        "Requirements:\n"
        "- Randomize the text format and structure creatively.\n"
        "- Paraphrase category names and descriptions while keeping the meaning clear.\n"
        "- Ensure the data remains understandable but presented differently.\n"
        "Generate the transformed output.\n"
        "\n"
        "{data}"
    ),
}

CHARS_PER_TOKEN = 3.0
"""Token estimate when no tokenizer of the served model can be had offline (openai back end and a
hub model id): the history is cut to `max_input_tokens * CHARS_PER_TOKEN` characters. Serialized
event lines (dates, numbers) run at ~1.8-3 characters per token, so this errs on the short side."""


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, str]]
    data: str  # the (cut) serialized history inside the user message
    hash: str


def build_prompt(definition: DatasetDefinition, history: UserHistory, tokenizer: Any | None,
                 max_input_tokens: int) -> Prompt:
    data = cut_history(history.serialized, tokenizer, max_input_tokens)
    noun = definition.event_noun
    system = PROMPT["system"].format(event_noun=noun)
    user = PROMPT["user"].format(event_noun=noun, data=data)
    return Prompt([{"role": "system", "content": system}, {"role": "user", "content": user}], data,
                  prompt_hash(system, user))


def prompt_hash(system: str, user: str) -> str:
    """sha256 of (prompt version, system text, user text): any change to either gives a new cache entry."""
    return hashlib.sha256(json.dumps([PROMPT["version"], system, user]).encode()).hexdigest()


def cut_history(serialized: str, tokenizer: Any | None, max_tokens: int) -> str:
    """The header plus the most recent lines that fit in `max_tokens` tokens (0 or less: no cut)."""
    if max_tokens <= 0:
        return serialized
    header, _, body = serialized.partition("\n")
    if tokenizer is not None:
        from producers.serialize.budget import fit_texts

        return fit_texts(tokenizer, header, [body], max_tokens)[0].text
    limit = int(max_tokens * CHARS_PER_TOKEN)
    if len(serialized) <= limit:
        return serialized
    kept: list[str] = []
    size = len(header)
    for line in reversed(body.split("\n")):
        if size + 1 + len(line) > limit:
            break
        kept.append(line)
        size += 1 + len(line)
    return "\n".join([header, *reversed(kept)])


# --------------------------------------------------------------------------------------------
# Output checks
# --------------------------------------------------------------------------------------------

MIN_LENGTH_RATIO = 0.2
"""An output shorter than 20% of the history's characters (as put in the prompt) lost most of the
data (a clarification question, a one-line summary, a rewrite cut very short by max_new_tokens)."""
MAX_LENGTH_RATIO = 4.0
MAX_LENGTH_SLACK = 2000
"""An output longer than 4x the history's characters + 2000 is runaway text (repetition loops);
the slack leaves room for verbose formats (HTML, XML) of short histories."""
ECHO_LINE_SHARE = 0.9
"""An output with more than 90% of its non-blank lines copied from the prompt (history or
instructions) is an echo, not a rewrite."""
PROMPT_ECHO_LINES = 2
"""An output repeating at least this many instruction lines of the prompt verbatim echoes the prompt."""
MIN_DATA_COVERAGE = 0.3
"""At least 30% of the distinct words of the history's event lines (runs of 3+ letters or digits,
case-insensitive: titles, years, amounts, category words) must appear in the output. Catches
outputs that talk about the data instead of rewriting it (instructions, code, a restated request)
and hallucinated records. Measured on MovieLens (384-token histories): the template rewrites
cover 0.84-0.91, SmolLM2-135M's off-task outputs 0.03-0.16; a faithful rewrite cut by
max_new_tokens after a third of the events still passes. 0 turns the check off."""
_WORD = re.compile(r"[^\W_]{3,}")


def _instruction_lines() -> set[str]:
    lines = (PROMPT["system"] + "\n" + PROMPT["user"].replace("{data}", "")).splitlines()
    # Lines naming the event noun are matched by their text before the placeholder.
    return {line.split("{event_noun}")[0].strip() for line in lines if len(line.split("{event_noun}")[0].strip()) >= 20}


INSTRUCTION_LINES = _instruction_lines()


def check_output(output: str, data: str) -> str | None:
    """Why `output` is refused as a rewrite of `data` (the history in its prompt), or None when it passes.

    Reasons: "empty", "echo_prompt", "echo_input", "too_short", "too_long", "low_coverage" (checked in
    this order).
    """
    text = output.strip()
    if not text:
        return "empty"
    if sum(1 for line in INSTRUCTION_LINES if line in text) >= PROMPT_ECHO_LINES:
        return "echo_prompt"
    data = data.strip()
    if data and data in text:
        return "echo_input"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    known = {line.strip() for line in data.splitlines() if line.strip()}
    copied = sum(1 for line in lines if line in known or any(line.startswith(i) for i in INSTRUCTION_LINES))
    if copied > ECHO_LINE_SHARE * len(lines):
        return "echo_input"
    if len(text) < MIN_LENGTH_RATIO * len(data):
        return "too_short"
    if len(text) > MAX_LENGTH_RATIO * len(data) + MAX_LENGTH_SLACK:
        return "too_long"
    if data_coverage(text, data) < MIN_DATA_COVERAGE:
        return "low_coverage"
    return None


def data_coverage(output: str, data: str) -> float:
    """The share of the distinct words of `data`'s event lines (not its header) found in `output`."""
    body = data.partition("\n")[2]
    wanted = {w.lower() for w in _WORD.findall(body)}
    if not wanted:
        return 1.0
    found = {w.lower() for w in _WORD.findall(output)}
    return len(wanted & found) / len(wanted)


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------

CACHE_FILE = "llm_cache.duckdb"

CACHE_DDL = """
CREATE TABLE IF NOT EXISTS llm_cache (
    user_id VARCHAR NOT NULL,       -- as text, whatever the dataset's id type
    variant INTEGER NOT NULL,
    model VARCHAR NOT NULL,         -- LLMOptions.model as given
    prompt_hash VARCHAR NOT NULL,   -- sha256 of (prompt version, system text, user text)
    output VARCHAR NOT NULL,        -- the model's text, as generated
    status VARCHAR NOT NULL,        -- 'ok' or 'refused:<reason>' by the latest run's checks
    seconds DOUBLE,                 -- the batch's wall time divided by its size
    created_at TIMESTAMP,
    backend VARCHAR,
    prompt_version VARCHAR,
    seed BIGINT,
    temperature DOUBLE,
    top_p DOUBLE,
    max_new_tokens INTEGER,
    PRIMARY KEY (user_id, variant, model, prompt_hash)
)"""


class LLMCache:
    """What the LLM said to each prompt, in its own DuckDB file (`<data dir>/<schema>/llm_cache.duckdb`).

    Kept apart from the warehouse because `enrich` holds the warehouse's one writing connection
    while the enricher runs. Each read or write opens and closes the file, so nothing stays open
    between batches. Failed requests (back-end errors) are not cached: a later run asks again.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def _connect(self):
        import duckdb

        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(self.path))
        con.execute(CACHE_DDL)
        return con

    def lookup(self, variant: int, model: str) -> dict[tuple[str, str], tuple[str, str]]:
        """{(user_id, prompt_hash): (output, status)} for this variant and model."""
        if not self.path.exists():
            return {}
        con = self._connect()
        try:
            rows = con.execute("SELECT user_id, prompt_hash, output, status FROM llm_cache "
                               "WHERE variant = ? AND model = ?", [variant, model]).fetchall()
        finally:
            con.close()
        return {(u, h): (out, status) for u, h, out, status in rows}

    def restatus(self, variant: int, model: str, changes: list[tuple[str, str, str]]) -> None:
        """Set the status of (user_id, prompt_hash, new status) entries: the checks changed since they were written."""
        if not changes:
            return
        con = self._connect()
        try:
            con.executemany("UPDATE llm_cache SET status = ? WHERE user_id = ? AND prompt_hash = ? AND variant = ? "
                            "AND model = ?", [(st, u, h, variant, model) for u, h, st in changes])
        finally:
            con.close()

    def store(self, rows: list[tuple]) -> None:
        """Rows in CACHE_DDL's column order; an existing key is overwritten."""
        if not rows:
            return
        con = self._connect()
        try:
            con.executemany(f"INSERT OR REPLACE INTO llm_cache VALUES ({', '.join('?' * len(rows[0]))})", rows)
        finally:
            con.close()


def _status(reason: str | None) -> str:
    return "ok" if reason is None else f"refused:{reason}"


# --------------------------------------------------------------------------------------------
# The enricher
# --------------------------------------------------------------------------------------------


class LLMEnricher:
    """Rewrites by an LLM, cached, checked, with template rewrites where the LLM's output is refused.

    `backend` and `tokenizer` are for tests and callers that hold them already; by default the back
    end comes from `options` and the tokenizer from the back end (see `backends`).
    """

    name = "llm"

    def __init__(self, options: LLMOptions, fallback: Enricher, home, schema: str, seed: int = 0,
                 log: Callable[[str], None] = lambda _: None, backend: Backend | None = None,
                 tokenizer: Any | None = None, cache_path: Path | None = None):
        self.options = options
        self.fallback = fallback
        self.seed = seed
        self.log = log
        self.backend = backend or make_backend(options, log=log)
        self.cache = LLMCache(cache_path or home.data_dir / schema / CACHE_FILE)
        self._tokenizer = tokenizer
        self._tokenizer_ready = tokenizer is not None
        self.stats: dict[str, Any] = {"generated": 0, "cached": 0, "fallbacks": 0, "refusals": {}}
        self.first_error: str | None = None  # the first back-end error, for the run's report

    def _prompt_tokenizer(self):
        if not self._tokenizer_ready:
            self._tokenizer = self.backend.prompt_tokenizer()
            self._tokenizer_ready = True
            if self._tokenizer is None:
                self.log(f"no tokenizer for {self.options.model} offline: histories are cut to "
                         f"~{CHARS_PER_TOKEN:g} characters per token")
        return self._tokenizer

    def seed_for(self, user_id, variant: int) -> int:
        """The sampling seed of one (user, variant), stable across runs and machines."""
        return stable_seed(self.seed, user_id, variant)

    def rewrite(self, definition: DatasetDefinition, histories: list[UserHistory], variant: int) -> list[Rewrite]:
        tokenizer = self._prompt_tokenizer()
        prompts = [build_prompt(definition, h, tokenizer, self.options.max_input_tokens) for h in histories]
        model = self.options.model
        known = self.cache.lookup(variant, model)
        outputs: list[str | GenerationError | None] = [None] * len(histories)
        changes = []
        for i, (h, p) in enumerate(zip(histories, prompts)):
            if (hit := known.get((str(h.user_id), p.hash))) is not None:
                outputs[i] = hit[0]
                # Cached outputs are checked again, so changed thresholds apply without generating anew.
                status = _status(check_output(hit[0], p.data))
                if status != hit[1]:
                    changes.append((str(h.user_id), p.hash, status))
        self.cache.restatus(variant, model, changes)
        fresh = [False] * len(histories)
        pending = [i for i, out in enumerate(outputs) if out is None]
        self.stats["cached"] += len(histories) - len(pending)
        self.log(f"llm variant {variant}: {len(histories) - len(pending):,} cached, {len(pending):,} to generate "
                 f"({self.backend.name} backend, {model})")
        if pending:
            self._generate(variant, histories, prompts, pending, outputs, fresh)
        return [self._accept(definition, h, p, out, new, variant)
                for h, p, out, new in zip(histories, prompts, outputs, fresh)]

    def _generate(self, variant, histories, prompts, pending, outputs, fresh) -> None:
        from tqdm.auto import tqdm

        size = max(1, self.backend.batch_size)
        batches = [pending[i:i + size] for i in range(0, len(pending), size)]
        o = self.options
        for batch in tqdm(batches, desc=f"llm variant {variant}", unit="batch", disable=None):
            seeds = [self.seed_for(histories[i].user_id, variant) for i in batch]
            t0 = time.perf_counter()
            texts = self.backend.generate([prompts[i].messages for i in batch], seeds)
            if len(texts) != len(batch):
                raise RuntimeError(
                    f"the {self.backend.name} backend returned {len(texts)} texts for {len(batch)} prompts")
            seconds = (time.perf_counter() - t0) / len(batch)
            now = datetime.now(timezone.utc).replace(tzinfo=None)
            rows = []
            for i, text, seed in zip(batch, texts, seeds):
                outputs[i] = text
                if isinstance(text, GenerationError):
                    self.first_error = self.first_error or str(text)
                    self.log(f"user {histories[i].user_id}, variant {variant}: {text}")
                    continue
                fresh[i] = True
                self.stats["generated"] += 1
                reason = check_output(text, prompts[i].data)
                rows.append((str(histories[i].user_id), variant, o.model, prompts[i].hash, text,
                             _status(reason), seconds, now, self.backend.name,
                             PROMPT["version"], seed, o.temperature, o.top_p, o.max_new_tokens))
            self.cache.store(rows)

    def _accept(self, definition, history: UserHistory, prompt: Prompt, output, fresh: bool, variant: int) -> Rewrite:
        reason = "backend_error" if isinstance(output, GenerationError) else check_output(output, prompt.data)
        if reason is None:
            return Rewrite(output.strip(), "llm", generated=fresh)
        self.stats["fallbacks"] += 1
        self.stats["refusals"][reason] = self.stats["refusals"].get(reason, 0) + 1
        substitute = self.fallback.rewrite(definition, [history], variant)[0]
        return Rewrite(substitute.text, f"fallback:{substitute.format}", generated=False)
