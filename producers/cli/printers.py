"""What each command prints: one function per command result, no logic beyond formatting.

Everything goes through `console` (stdout) and `err_console` (stderr); tests swap them for wide
consoles, so refer to them as `printers.console` from other modules.
"""
from __future__ import annotations

from typing import Any


class _LazyConsole:
    """A rich Console made when something is first printed: importing rich takes ~0.1 s, which
    `llm4es --help` and an option error (printed by click) do not need."""

    def __init__(self, **kwargs: Any):
        self._kwargs = kwargs
        self._console = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kwargs)
        return getattr(self._console, name)


def Table(*args: Any, **kwargs: Any):
    """rich's Table, imported when a table is made (see _LazyConsole)."""
    from rich.table import Table

    return Table(*args, **kwargs)


console = _LazyConsole(highlight=False)
err_console = _LazyConsole(stderr=True, highlight=False)


def print_datasets(rows: list[tuple[str, str, str, str]]) -> None:
    table = Table("dataset", "kind", "in warehouse", "description")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def print_fetched(fetched: dict) -> None:
    for name, path in fetched.items():
        console.print(f"[green]✓[/] {name}: {path}")


def print_synth_clicks(r) -> None:
    intents = ", ".join(f"{name} {n:,}" for name, n in r.sessions_by_intent.items())
    console.print(f"[green]✓[/] {r.out_dir}: {r.n_visitors:,} visitors, {r.n_sessions:,} sessions, {r.n_events:,} "
                  f"clicks in {r.seconds:.1f}s ({r.noise_share:.0%} noise clicks, {r.opened_share:.0%} opened a "
                  f"product)", soft_wrap=True)
    console.print(f"planted intents (sessions): {intents}", soft_wrap=True)
    console.print(f"next: llm4es ingest bank-clickstream --source {r.out_dir}", soft_wrap=True)


def print_ingest(r, seconds: float) -> None:
    verb = "already ingested" if r.skipped else f"ingested in {seconds:.1f}s"
    users = f"{r.n_users:,} users"
    if r.n_users_without_events is not None and (r.n_users_without_events or r.n_event_users != r.n_users):
        users = (f"{r.n_event_users:,} users with events, {r.n_users:,} in the users file "
                 f"({r.n_users_without_events:,} of them without events)")
    console.print(f"[green]✓[/] {r.dataset}: {r.n_events:,} events, {users}, "
                  f"{r.n_rejects:,} rejected rows ({verb}; ingest {r.ingest_id}, data {r.source_hash})")
    table = Table("file", "rows read", "rejected", "share", title="source files", title_justify="left")
    for f in r.files:
        table.add_row(f.file, f"{f.rows_read:,}", f"{f.rows_rejected:,}", f"{f.reject_share:.2%}")
    console.print(table)
    if r.n_rejects:
        console.print(f"rejected rows are in table {r.schema}.rejects (source, row_number, raw_record, reason)")
    if r.n_repeated_events:
        console.print(f"[yellow]warning:[/] {r.n_repeated_events:,} events repeat another event in every column; "
                      "the dataset declares no events.key, so they are kept and count as events (declare "
                      "`events.key`, e.g. a transaction id, and validation fails on repeated keys)")


def print_append(r, seconds: float) -> None:
    users = f"{r.n_users:,} users"
    if r.n_event_users is not None and r.n_event_users != r.n_users:  # a users file that lists not exactly them
        users = f"{r.n_event_users:,} users with events, {r.n_users:,} in the users file"
    if not r.changed:
        console.print(f"[green]✓[/] {r.dataset}: nothing new ({r.duplicates_skipped:,} events already stored); "
                      "the warehouse is unchanged")
        return
    console.print(f"[green]✓[/] {r.dataset}: +{r.rows_added:,} events for {r.users_touched:,} users "
                  f"({r.users_new:,} new), {r.duplicates_skipped:,} duplicates skipped, {r.rejects:,} rejected rows, "
                  f"events {r.min_event_time} .. {r.max_event_time}; now {r.n_events:,} events, {users} "
                  f"(appended in {seconds:.1f}s; ingest {r.ingest_id}, data {r.source_hash})", soft_wrap=True)
    if r.dedupe_on_all_columns:
        console.print("the dataset declares no events.key: duplicates were rows equal in every column")
    for table, path in r.fallback_files.items():
        console.print(f"table {table} read from the earlier source {path} (unchanged)", soft_wrap=True)
    console.print(f"delta logged in {r.schema}.ingest_delta; run `llm4es validate {r.dataset}` before later stages",
                  soft_wrap=True)


def print_validation(report) -> None:
    scope = getattr(report, "scope", "all")
    title = f"validation of {report.dataset}" + (f" ({scope})" if scope != "all" else "")
    table = Table("", "check", "table", "checked", "failed", "examples", title=title, title_justify="left")
    for r in report.results:
        mark = "[green]✓[/]" if r.success else "[red]✗[/]"
        examples = r.error or _examples(r)
        table.add_row(mark, r.check, r.batch, f"{r.checked:,}", f"{r.failed:,}" if r.failed else "", examples)
    console.print(table)
    verdict = "[green]passed[/]" if report.success else f"[red]FAILED[/] ({len(report.failed)} checks)"
    console.print(f"{report.dataset}: {verdict}; result {report.json_path}", soft_wrap=True)
    if report.data_docs:
        console.print(f"Data Docs: {report.data_docs}", soft_wrap=True)


def _examples(r) -> str:
    """Failing values, each with the key of its row where GX gave one: `user_id=13: 5`."""
    def text(v) -> str:
        return "null" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    if getattr(r, "lines", None):  # where in the files, when ingest traced it (empty keys): more use than values
        return "; ".join(r.lines)
    if r.where:
        parts = []
        for row in r.where:
            key = ", ".join(f"{k}={text(v)}" for k, v in row.items() if k != r.column)
            parts.append(f"{key}: {text(row.get(r.column))}" if r.column in row else key)
        return "; ".join(parts)
    return ", ".join(text(x) for x in r.examples)


def print_serialize(r, max_tokens: int, seconds: float) -> None:
    console.print(f"[green]✓[/] {r.dataset}: {r.n_texts:,} texts from {r.n_events:,} of {r.n_events_total:,} events "
                  f"in {seconds:.1f}s; {r.n_cut:,} users cut to the {max_tokens}-token budget "
                  f"(largest text {r.max_tokens_seen:,} tokens)")
    console.print(f"header: {r.header}", soft_wrap=True)
    console.print(f"texts: table texts, {r.parquet}", soft_wrap=True)


def print_aggregate(r, seconds: float) -> None:
    console.print(f"[green]✓[/] {r.dataset}: {r.n_users:,} rows (users), {r.n_features} features as of {r.as_of} "
                  f"in {seconds:.1f}s", soft_wrap=True)
    console.print(f"features: table {r.table}, {r.parquet_path}", soft_wrap=True)


def print_enrich(r) -> None:
    console.print(f"[green]✓[/] {r.dataset}: {r.written:,} {r.enricher} texts for {r.users:,} users "
                  f"x {r.variants} variants in {r.seconds:.1f}s")
    console.print("formats: " + ", ".join(f"{k} {v:,}" for k, v in sorted(r.by_format.items())))
    if r.enricher == "llm":
        refusals = ", ".join(f"{k} {v}" for k, v in sorted(r.refusals.items())) or "none"
        console.print(f"LLM: {r.generated:,} generated, {r.cached:,} from the cache, {r.fallbacks:,} fell back to "
                      f"a template (refused: {refusals})")
        if r.fallbacks:
            err_console.print(f"[bold yellow]warning:[/] {r.fallbacks:,} of {r.users * r.variants:,} llm texts "
                              f"({r.fallback_share:.0%}) are template fallbacks, not LLM output (marked fallback = "
                              f"true in the texts table)" + (f"; first back-end error: {r.first_error}"
                                                             if r.first_error else ""), soft_wrap=True)


def print_finetune(r) -> None:
    from training.finetune.config import epochs_text

    mfu = "" if r.mfu is None else f", MFU {r.mfu:.1%}"
    console.print(f"[green]✓[/] {r.dataset}: {r.steps} steps ({epochs_text(r.steps, r.steps_per_epoch or r.steps)}, "
                  f"{r.epochs_done} complete) on {r.n_texts:,} texts, final loss {r.final_loss:.4f}, "
                  f"{r.tokens_per_second:,.0f} tokens/s{mfu}"
                  f"{f' (resumed from {r.resumed_from})' if r.resumed_from else ''}")
    console.print(f"run: {r.run_dir}", soft_wrap=True)
    for m in r.models:
        console.print(f"model: {m}", soft_wrap=True)


def print_embed(r) -> None:
    for s in r.sets:
        console.print(f"[green]✓[/] {r.dataset}: {s.n_users:,} vectors of size {s.dim} ({s.checkpoint}, layers "
                      f"{s.layers}, {s.text_kind}); {s.n_computed:,} computed at {s.tokens_per_s:,.0f} tokens/s"
                      f"{f' ({s.compute_tokens_per_s:,.0f} in the model' if s.compute_tokens_per_s else ''}"
                      f"{f', MFU {s.mfu:.1%})' if s.mfu is not None else (')' if s.compute_tokens_per_s else '')}"
                      f"{f', {s.n_resumed:,} resumed' if s.n_resumed else ''}")
        console.print(f"  {s.parquet}", soft_wrap=True)


def print_coles(r) -> None:
    trained = (f"{r.epochs_trained} epochs trained" if r.epochs_trained else "a finished run reused")
    console.print(f"[green]✓[/] {r.dataset}: {r.n_users:,} vectors of size {r.dim} ({r.model}, epoch {r.epoch}; "
                  f"{trained}{f', resumed from epoch {r.resumed_from}' if r.resumed_from else ''}"
                  f"{f', final loss {r.final_loss:.4f}' if r.final_loss is not None else ''}) in {r.seconds:.0f}s")
    console.print(f"  {r.parquet_path}", soft_wrap=True)


def print_sessions_build(r) -> None:
    how = f"column {r.spec.get('column')}" if r.mode == "column" else f"a gap of {r.spec.get('gap_minutes'):g} minutes"
    e = r.events_per_session
    console.print(f"[green]✓[/] {r.dataset}: {r.n_sessions:,} sessions of {r.n_events:,} events by {how} "
                  f"(events per session: median {e['median']:g}, p90 {e['p90']:g}, max {e['max']:g}) in "
                  f"{r.seconds:.1f}s; checks passed", soft_wrap=True)
    console.print(f"  checks: {r.validation_path}", soft_wrap=True)


def print_sessions_train(r, dataset: str) -> None:
    trained = f"{r.epochs_trained} epoch(s) trained" if r.epochs_trained else "a finished run reused"
    console.print(f"[green]✓[/] {r.dataset}: encoder at epoch {r.epochs} on {r.n_sessions:,} sessions ({trained}"
                  f"{f', resumed from epoch {r.resumed_from}' if r.resumed_from else ''}"
                  f"{f', loss {r.losses[0]:.3f} -> {r.final_loss:.3f}' if r.losses else ''}; "
                  f"{r.sessions_per_second:,.0f} sessions/s on {r.device}) in {r.seconds:.0f}s", soft_wrap=True)
    console.print(f"  {r.run_dir}", soft_wrap=True)
    console.print(f"next: llm4es sessions embed {dataset}")


def print_sessions_embed(r, dataset: str) -> None:
    console.print(f"[green]✓[/] {r.dataset}: {r.n_sessions:,} session vectors of size {r.dim} (epoch {r.epoch}) in "
                  f"{r.seconds:.1f}s", soft_wrap=True)
    console.print(f"  {r.parquet_path}", soft_wrap=True)
    console.print(f"next: llm4es intents build {dataset}, or llm4es publish {dataset}")


def print_intents_build(r, dataset: str) -> None:
    console.print(f"[green]✓[/] {r.dataset}: taxonomy v{r.version}, {len(r.labels)} labels ({r.backend}, {r.model}; "
                  f"{r.llm_calls} LLM calls) in {r.seconds:.0f}s", soft_wrap=True)
    for label in r.labels:
        console.print(f"  {label['name']}: {label['description']}", soft_wrap=True)
    console.print(f"  {r.report_path}", soft_wrap=True)
    console.print(f"next: llm4es intents label {dataset}")


def print_intents_label(r, dataset: str) -> None:
    each = f"; {r.llm_seconds_per_session:.2f} s per session" if r.llm_seconds_per_session is not None else ""
    console.print(f"[green]✓[/] {r.dataset}: {r.labelled:,} of {r.sampled:,} sessions labelled with taxonomy "
                  f"v{r.taxonomy_version} ({r.mode}, {r.model}; {r.from_cache:,} from cache, {r.unparsable:,} "
                  f"unparsable, {r.failed:,} failed{each}) in {r.seconds:.0f}s", soft_wrap=True)
    console.print("  " + ", ".join(f"{k} {v:,}" for k, v in r.distribution.items()), soft_wrap=True)
    console.print(f"next: llm4es intents distill {dataset}")


def print_intents_distill(r, dataset: str) -> None:
    labeller = r.provenance.get("llm_model") or "LLM"
    llm_each = (f"{r.llm_seconds_per_session * 1000:,.3f} ms over {r.llm_sessions} held-out sessions"
                if r.llm_seconds_per_session is not None else "not measured")
    console.print(f"[green]✓[/] {r.dataset}: {r.classifier} on {r.n_train:,} sessions labelled by {labeller}; held "
                  f"out {r.n_test:,}: micro F1 {r.micro_f1:.3f}, macro F1 {r.macro_f1:.3f} against {labeller}",
                  soft_wrap=True)
    console.print(f"  latency per session: classifier {r.classifier_seconds_per_session * 1000:.3f} ms, "
                  f"{labeller} {llm_each}", soft_wrap=True)
    # a label with fewer than 2 LLM examples is left out of the fit, so no session is ever given it
    never = [n for n in r.labels if n not in r.trained_labels]
    if never:
        console.print(f"[yellow]warning:[/] the classifier never predicts {', '.join(never)} (fewer than 2 sessions "
                      "with that LLM label): label more sessions (`llm4es intents label --sample-size`) and distill "
                      "again", soft_wrap=True)
    console.print(f"  report: {r.report_md}", soft_wrap=True)
    console.print(f"  {r.n_predicted:,} sessions labelled -> {r.parquet_path}", soft_wrap=True)
    console.print(f"next: llm4es publish {dataset}")


def print_publish(r) -> None:
    table = Table(title=f"{r.dataset}: Feast views ({r.online_store} online store)", title_justify="left")
    for column in ("view", "kind", "features", "produced by", "as of"):
        table.add_column(column)
    for v in r.views:
        # generic over output kinds: what a view's tags hold, not which kind it is
        what = f"{v.model} @ {v.checkpoint}, layers {v.layers}, {v.text_kind}" if v.layers else v.model or ""
        features = (f"vector[{v.dim}]" if v.dim and v.features == ("vector",) else
                    f"{', '.join(v.features)}" if len(v.features) <= 4 else f"{len(v.features)} columns")
        table.add_row(v.name + (" (default)" if v.is_default and v.layers else ""), v.kind, features, what,
                      v.feature_timestamps[-1] if v.feature_timestamps else "")
    console.print(table)
    console.print(f"[green]✓[/] repo {r.repo} applied in {r.seconds:.1f}s"
                  f"{'; online store filled' if r.materialized else ''}", soft_wrap=True)
    if not r.materialized:
        console.print(f"next: feast -c {r.repo} materialize-incremental $(date -u +%Y-%m-%dT%H:%M:%S)", soft_wrap=True)


def print_evaluation(r) -> None:
    for protocol in r.report["config"]["protocols"]:
        rows = r.table(protocol)
        table = Table(title=f"{r.dataset}: {'paper protocol (test set)' if protocol == 'paper' else 'repeated CV'}",
                      title_justify="left")
        table.add_column("features")
        for column in rows[0][1]:
            table.add_column(column, justify="right")
        for name, cells in rows:
            table.add_row(name, *cells.values())
        console.print(table)
    for target, sets in r.report["results"].items():
        for name, entry in sets.items():
            if entry.get("chosen_view"):
                console.print(f"{target} / {name}: epoch view {entry['chosen_view']} chosen on the training folds")
    for name, reason in r.report.get("missing", {}).items():
        console.print(f"not evaluated: {name} ({reason})", soft_wrap=True)
    if r.merge_note:
        console.print(r.merge_note, soft_wrap=True)
    console.print(f"reports: {r.paths['markdown']} (+ .json, .png; this call: {r.paths['run_markdown'].parent}); "
                  f"{r.seconds:.0f}s", soft_wrap=True)


class DemoPrinter:
    """How `llm4es demo` shows the steps producers.demo.run_demo reports (producers.demo.DemoDisplay)."""

    def start(self, dataset: str, hardware: str, cuts: list[str]) -> None:
        console.print(f"[bold]llm4es demo[/] on {dataset}, hardware class [bold]{hardware}[/]")
        for cut in cuts:
            console.print(f"[yellow]CPU budget:[/] {cut}")

    def step(self, i: int, steps: int, title: str, elapsed_s: float) -> None:
        console.rule(f"[bold]{i}/{steps} {title}[/] [dim]({elapsed_s:.0f}s)[/]")

    def line(self, text: str, soft_wrap: bool = False) -> None:
        console.print(text, soft_wrap=soft_wrap)

    def validation(self, report) -> None:
        print_validation(report)

    def evaluation(self, result) -> None:
        print_evaluation(result)
