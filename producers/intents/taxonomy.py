"""`intents build`: an LLM proposes an intent taxonomy from session summaries, then refines it (TnT-LLM).

Round 1 samples `sample_size` sessions, asks for a one-sentence summary of each, then for at most
`max_labels` labels (`name: description`) covering the summaries. Every later round samples new
sessions, summarises them, and asks for the revised full taxonomy given the current one. A round
whose answer parses to no label keeps the previous taxonomy (recorded in its round entry). The
result is stored as the next version in `intent_taxonomies` and written to
`reports/intents/<schema>/taxonomy-v<N>.md`.
"""
from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from producers.enrich.backends import Backend, GenerationError, stable_seed
from producers.intents.common import Log, backend_for, generate_batched, md_cell, model_name
from producers.intents.config import IntentsError, TaxonomyConfig, TaxonomyResult
from producers.intents.prompts import (
    PROMPTS,
    Label,
    first_sentence,
    parse_taxonomy,
    propose_prompt,
    refine_prompt,
    summarise_prompt,
)
from producers.intents.session_text import read_session_texts, sample_sessions
from producers.intents.store import TAXONOMIES, load_taxonomy, store_taxonomy
from producers.stores.provenance import code_version
from producers.stores.warehouse import Home, stored_definition, table_exists

RAW_KEEP = 4000
"""Characters of each taxonomy answer kept in the round record (enough to see what went wrong)."""


def build_taxonomy(home: Home, dataset: str, config: TaxonomyConfig = TaxonomyConfig(), log: Log = lambda _: None,
                   backend: Backend | None = None) -> TaxonomyResult:
    started = time.perf_counter()
    config.check()
    con = home.connect(read_only=True)
    try:
        d = stored_definition(con, dataset)
        ids = sample_sessions(con, d, config.sample_size * config.rounds, config.seed, config.min_events,
                              salt="taxonomy")
        texts = read_session_texts(con, d, ids, config.text)
    finally:
        con.close()  # before the LLM: other stages may write the warehouse meanwhile
    if not ids:
        raise IntentsError(f"{d.name} has no session with at least {config.min_events} event(s) to sample")
    backend = backend_for(config.llm, backend, log)
    model = model_name(config.llm, backend)
    noun = d.event_noun
    log(f"taxonomy of {d.name}: {config.rounds} round(s) of {config.sample_size} sessions "
        f"({len(ids)} sampled), at most {config.max_labels} labels ({backend.name} backend, {model})")
    labels: list[Label] = []
    rounds: list[dict[str, Any]] = []
    calls = 0
    for r in range(config.rounds):
        chunk = ids[r * config.sample_size:(r + 1) * config.sample_size]
        if not chunk:
            log(f"round {r + 1}: no sessions left to sample ({len(ids)} in all); stopping")
            break
        prompts = [summarise_prompt(noun, texts[s]) for s in chunk]
        seeds = [stable_seed(config.seed, "summary", s) for s in chunk]
        answers, _ = generate_batched(backend, prompts, seeds, config.progress, desc=f"summaries, round {r + 1}")
        calls += len(prompts)
        summaries, failed = {}, []
        for s, answer in zip(chunk, answers):
            text = "" if isinstance(answer, GenerationError) else first_sentence(answer)
            if text:
                summaries[s] = text
            else:
                failed.append(s)
        kind = "propose" if not labels else "refine"
        entry: dict[str, Any] = {"round": r + 1, "kind": kind, "sessions": chunk, "summaries": summaries,
                                 "failed_summaries": failed}
        if not summaries:
            entry.update(raw=None, proposed=[], kept_previous=True, note="no usable summary")
            rounds.append(entry)
            log(f"round {r + 1}: no usable summary; taxonomy unchanged")
            continue
        listed = list(summaries.values())
        prompt = (propose_prompt(noun, listed, config.max_labels) if kind == "propose"
                  else refine_prompt(noun, labels, listed, config.max_labels))
        (answer,), _ = generate_batched(backend, [prompt], [stable_seed(config.seed, "taxonomy", r)], False)
        calls += 1
        raw = f"<error: {answer}>" if isinstance(answer, GenerationError) else answer
        proposed = [] if isinstance(answer, GenerationError) else parse_taxonomy(answer, config.max_labels)
        entry.update(raw=raw[:RAW_KEEP], proposed=[lb.as_dict() for lb in proposed], kept_previous=not proposed)
        if proposed:
            labels = proposed
            log(f"round {r + 1} ({kind}): {len(labels)} labels: {', '.join(lb.name for lb in labels)}")
        else:
            entry["note"] = "the answer held no parseable label"
            log(f"round {r + 1} ({kind}): nothing parseable in the answer; "
                f"{'taxonomy unchanged' if labels else 'no taxonomy yet'}")
        rounds.append(entry)
    if len(labels) < 2:
        raws = "; ".join(repr((e.get("raw") or "")[:120]) for e in rounds)
        raise IntentsError(f"the LLM ({backend.name}, {model}) gave no taxonomy of at least 2 labels for {d.name} in "
                           f"{len(rounds)} round(s); answers began: {raws}")
    created = datetime.now(timezone.utc).replace(tzinfo=None)
    row = {"created_at": created, "backend": backend.name, "model": model, "prompt_version": PROMPTS["version"],
           "labels": [lb.as_dict() for lb in labels], "rounds": rounds, "sample_seed": config.seed,
           "config": config.as_dict(), "code_version": code_version()}
    con = home.connect()
    try:
        version = store_taxonomy(con, d.schema, row)
    finally:
        con.close()
    report = home.reports_dir("intents", d.schema) / f"taxonomy-v{version}.md"
    report.write_text(taxonomy_markdown(d.name, version, row))
    seconds = time.perf_counter() - started
    log(f"taxonomy v{version} of {d.name}: {len(labels)} labels -> {d.schema}.intent_taxonomies, "
        f"{home.relative(report)} ({seconds:.1f}s)")
    return TaxonomyResult(dataset=d.name, version=version, labels=row["labels"], rounds=rounds, report_path=report,
                          backend=backend.name, model=model, prompt_version=PROMPTS["version"], llm_calls=calls,
                          seconds=seconds)


def taxonomy_markdown(dataset: str, version: int, row: dict[str, Any]) -> str:
    lines = [f"# Intent taxonomy v{version} of {dataset}", "",
             (f"Stored {row['created_at']:%Y-%m-%d %H:%M} UTC from a person's file `{row['model'][5:]}`, "
              if row["backend"] == "person" else
              f"Made {row['created_at']:%Y-%m-%d %H:%M} UTC by the {row['backend']} back end, model `{row['model']}`, ")
             + f"prompts `{row['prompt_version']}`, sample seed {row['sample_seed']}, code {row['code_version']}.", "",
             "| # | Label | Description |", "|---|---|---|"]
    lines += [f"| {i} | `{lb['name']}` | {md_cell(lb['description'])} |" for i, lb in enumerate(row["labels"], 1)]
    lines += ["", "## Rounds", ""]
    for e in row["rounds"]:
        what = ("kept the previous taxonomy" if e["kept_previous"]
                else f"{len(e['proposed'])} labels: {', '.join(x['name'] for x in e['proposed'])}")
        lines.append(f"- Round {e['round']} ({e['kind']}): {len(e['sessions'])} sessions sampled, "
                     f"{len(e['summaries'])} summarised; {what}{'; ' + e['note'] if e.get('note') else ''}")
    examples = [s for e in row["rounds"] for s in e["summaries"].values()][:5]
    if examples:
        lines += ["", "## Example summaries", "", *(f"- {md_cell(s)}" for s in examples)]
    return "\n".join(lines) + "\n"


def report_path(home: Home, schema: str, version: int) -> Path:
    return home.reports_dir("intents", schema) / f"taxonomy-v{version}.md"


def import_taxonomy(home: Home, dataset: str, path: Path, max_labels: int = 50,
                    log: Log = lambda _: None) -> TaxonomyResult:
    """A taxonomy a person wrote or edited (one `name: description` per line, e.g. a reviewed
    `taxonomy-vN.md` table), stored as the next version like a generated one (backend `person`).

    TnT-LLM puts a human review between generation and labelling; this is that step, and the way
    to go on when the available LLM cannot propose a usable taxonomy.
    """
    started = time.perf_counter()
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise IntentsError(f"{path}: cannot read the taxonomy file ({e.strerror})") from e
    labels = parse_taxonomy(_label_lines(text), max_labels)
    if len(labels) < 2:
        raise IntentsError(f"{path}: found {len(labels)} label(s); write at least 2 lines of the form "
                           "`label_name: one-line description`")
    con = home.connect(read_only=True)
    try:
        d = stored_definition(con, dataset)
        newest = load_taxonomy(con, d) if table_exists(con, d.schema, TAXONOMIES) else None
    finally:
        con.close()
    if newest is not None and newest.backend == "person" and newest.labels == labels:
        # The same file again (a re-run pipeline): keep its version, so its cached labels still count.
        log(f"taxonomy v{newest.version} of {d.name} already holds these {len(labels)} labels; not stored again")
        return TaxonomyResult(dataset=d.name, version=newest.version, labels=[lb.as_dict() for lb in labels],
                              rounds=[], report_path=report_path(home, d.schema, newest.version), backend="person",
                              model=newest.model, prompt_version=newest.prompt_version, llm_calls=0,
                              seconds=time.perf_counter() - started)
    created = datetime.now(timezone.utc).replace(tzinfo=None)
    row = {"created_at": created, "backend": "person", "model": f"file:{Path(path).name}",
           "prompt_version": PROMPTS["version"], "labels": [lb.as_dict() for lb in labels], "rounds": [],
           "sample_seed": 0, "config": {"from_file": str(path), "max_labels": max_labels},
           "code_version": code_version()}
    con = home.connect()
    try:
        version = store_taxonomy(con, d.schema, row)
    finally:
        con.close()
    report = report_path(home, d.schema, version)
    report.write_text(taxonomy_markdown(d.name, version, row))
    log(f"taxonomy v{version} of {d.name} from {path}: {len(labels)} labels -> {d.schema}.intent_taxonomies")
    return TaxonomyResult(dataset=d.name, version=version, labels=row["labels"], rounds=[], report_path=report,
                          backend="person", model=row["model"], prompt_version=PROMPTS["version"], llm_calls=0,
                          seconds=time.perf_counter() - started)


_TABLE_ROW = re.compile(r"^\|\s*\d+\s*\|\s*`?([^|`]+?)`?\s*\|\s*(.*?)\s*\|\s*$")


def _label_lines(text: str) -> str:
    """`name: description` lines of a taxonomy file: the label table of a `taxonomy-vN.md` report when
    the file has one (its other lines are provenance and rounds), else every line but `#` comments."""
    rows = [m.groups() for m in map(_TABLE_ROW.match, text.splitlines()) if m]
    if rows:
        return "\n".join(f"{name}: {description}" for name, description in rows)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
