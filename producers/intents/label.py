"""`intents label`: the LLM gives a sample of sessions one taxonomy label each, cached in `intent_llm_labels`.

Two modes share one prompt (the taxonomy's names and descriptions, then the session):
- `generate`: the model answers in words; `parse_label` maps the answer to a label name (exact,
  then the first name mentioned); an answer naming none is kept with label NULL and its raw text.
- `score` (local back end only): no generation; `LocalBackend.score_choices` gives each label
  name's log-likelihood as the answer, the highest wins. Always a valid label, one forward pass
  over the prompt plus a few tokens per name: much cheaper on a CPU.

Cache: a session is skipped when (session_id, taxonomy version, model, mode, prompt hash) is
already in `intent_llm_labels`; answers are written after every back-end call, so a killed run
resumes where it stopped. A back-end failure (`GenerationError`) is not stored: it is retried by
the next run.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime, timezone

from producers.enrich.backends import Backend, GenerationError, stable_seed
from producers.intents.common import Log, backend_for, generate_batched, model_name, tqdm_disable
from producers.intents.config import IntentsError, LabelConfig, LabelResult
from producers.intents.prompts import label_prompt, parse_label, prompt_hash
from producers.intents.session_text import read_session_texts, sample_sessions
from producers.intents.store import LabelRow, cached_labels, load_taxonomy, store_labels
from producers.stores.warehouse import Home, stored_definition

UNPARSABLE = "<unparsable>"
RAW_KEEP = 2000


def label_sessions(home: Home, dataset: str, config: LabelConfig = LabelConfig(), log: Log = lambda _: None,
                   backend: Backend | None = None) -> LabelResult:
    started = time.perf_counter()
    config.check()
    backend = backend_for(config.llm, backend, log)
    model = model_name(config.llm, backend)
    if config.mode == "score" and not callable(getattr(backend, "score_choices", None)):
        raise IntentsError(f"score mode needs a back end that scores choices (the local one), not {backend.name!r}")
    con = home.connect(read_only=True)
    try:
        d = stored_definition(con, dataset)
        taxonomy = load_taxonomy(con, d, config.taxonomy_version)
        ids = sample_sessions(con, d, config.sample_size or None, config.seed, config.min_events, salt="label")
        texts = read_session_texts(con, d, ids, config.text)
        cache = cached_labels(con, d.schema, taxonomy.version, model, config.mode)
    finally:
        con.close()
    if not ids:
        raise IntentsError(f"{d.name} has no session with at least {config.min_events} event(s) to label")
    names = taxonomy.names
    prompts = {s: label_prompt(d.event_noun, taxonomy.labels, texts[s]) for s in ids}
    hashes = {s: prompt_hash(m) for s, m in prompts.items()}
    labels: dict[str, str | None] = {}
    for s in ids:
        if (s, hashes[s]) in cache:
            labels[s] = cache[(s, hashes[s])][0]
    pending = [s for s in ids if s not in labels]
    from_cache = len(labels)
    log(f"labelling {len(ids):,} sessions of {d.name} with taxonomy v{taxonomy.version} ({len(names)} labels), "
        f"{config.mode} mode, {backend.name} backend, {model}: {from_cache:,} cached, {len(pending):,} to ask")

    latencies: list[float] = []
    failed = 0

    def store(batch_ids: list[str], answers: list[str | None], found: list[str | None], each: float) -> None:
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        rows = [LabelRow(s, taxonomy.version, lb, (raw or "")[:RAW_KEEP], backend.name, model, config.mode,
                         hashes[s], each, now)
                for s, raw, lb in zip(batch_ids, answers, found)]
        con = home.connect()
        try:
            store_labels(con, d.schema, rows)
        finally:
            con.close()

    if config.mode == "generate" and pending:
        def on_batch(indices: list[int], out: list, each: float) -> None:
            nonlocal failed
            keep = [(pending[i], a) for i, a in zip(indices, out) if not isinstance(a, GenerationError)]
            for i, a in zip(indices, out):
                if isinstance(a, GenerationError):
                    failed += 1
                    log(f"session {pending[i]}: {a}")
            found = [parse_label(a, names) for _, a in keep]
            for (s, _), lb in zip(keep, found):
                labels[s] = lb
            latencies.extend([each] * len(keep))
            store([s for s, _ in keep], [a for _, a in keep], found, each)

        generate_batched(backend, [prompts[s] for s in pending],
                         [stable_seed(config.seed, "label", s) for s in pending], config.progress,
                         desc="intent labels", on_batch=on_batch)
    elif config.mode == "score" and pending:
        from tqdm.auto import tqdm

        size = max(1, int(getattr(backend, "batch_size", 1) or 1))
        for start in tqdm(range(0, len(pending), size), desc="intent scores", unit="batch",
                          disable=tqdm_disable(config.progress)):
            batch = pending[start:start + size]
            raws, found = [], []
            t0 = time.perf_counter()
            for s in batch:
                scores = backend.score_choices(prompts[s], names, norm=config.score_norm)
                best = max(range(len(names)), key=lambda k: scores[k])
                found.append(names[best])
                raws.append(json.dumps({n: round(float(v), 4) for n, v in zip(names, scores)}))
            each = (time.perf_counter() - t0) / len(batch)
            for s, lb in zip(batch, found):
                labels[s] = lb
            latencies.extend([each] * len(batch))
            store(batch, raws, found, each)

    counts = Counter(labels[s] if labels[s] is not None else UNPARSABLE for s in ids if s in labels)
    distribution = {n: counts.get(n, 0) for n in names}
    if counts.get(UNPARSABLE):
        distribution[UNPARSABLE] = counts[UNPARSABLE]
    unparsable = counts.get(UNPARSABLE, 0)
    seconds = time.perf_counter() - started
    per_session = sum(latencies) / len(latencies) if latencies else None
    log(f"{len(labels) - unparsable:,} labelled, {unparsable:,} unparsable, {from_cache:,} from cache, "
        f"{failed:,} failed -> {d.schema}.intent_llm_labels"
        f"{f' ({per_session:.2f} s per session)' if per_session is not None else ''}")
    return LabelResult(dataset=d.name, taxonomy_version=taxonomy.version, mode=config.mode, backend=backend.name,
                       model=model, sampled=len(ids), labelled=len(labels) - unparsable, unparsable=unparsable,
                       from_cache=from_cache, generated=len(labels) - from_cache, distribution=distribution,
                       llm_seconds_per_session=per_session, failed=failed, seconds=seconds)


def distribution_text(result: LabelResult) -> str:
    total = sum(result.distribution.values()) or 1
    return ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in result.distribution.items())
