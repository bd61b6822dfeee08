"""The publish flow: stage the snapshots, write the manifest, apply the repo, optionally materialize."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from producers.datasets.definition import schema_name
from producers.publish.feast_apply import _apply_all, _materialize, _reached
from producers.publish.manifest import _clear_pending, _pending, _write_json
from producers.publish.repo import (
    _clean_orphans,
    _definitions,
    ensure_repo,
    feast_project,
    repo_project,
)
from producers.publish.snapshots import _stage
from producers.stores.locks import file_lock
from producers.stores.outputs import OUTPUTS, export_behind
from producers.stores.serving import (
    MANIFEST_FORMAT,
    PublishError,
    ViewInfo,
    _read_manifest,
    _views_of,
    feast_dir,
    manifest_path,
    store_yaml,
)
from producers.stores.warehouse import Home

Log = Callable[[str], None]


@dataclass(frozen=True)
class PublishConfig:
    llm4es_set: str | None = None  # the default LLM4ES set: view label, set id, file name or checkpoint
    online_store: str = "sqlite"  # sqlite | redis: whose registry to apply to (and materialize into)
    redis_url: str | None = None  # Feast's `host:port[,db=N,password=...]` (or redis://host:port/N)
    materialize: bool = False  # also materialize-incremental up to now into the online store
    recent_sessions: int = 10  # K of the user rollups: mean embedding and intent shares over the last K sessions
    project: str | None = None  # the Feast project (default: $LLM4ES_FEAST_PROJECT, the home's, or from its path)


@dataclass
class PublishResult:
    dataset: str
    schema: str
    repo: Path
    manifest: Path
    online_store: str
    views: list[ViewInfo]
    skipped: list[str] = field(default_factory=list)  # kinds without input files
    new_rows: dict[str, int] = field(default_factory=dict)  # rows of this publish per view
    materialized: bool = False
    seconds: float = 0.0


def publish(home: Home, dataset: str, config: PublishConfig = PublishConfig(),
            log: Log = lambda _: None, inputs: dict[str, list[Path]] | None = None,
            users: list | None = None) -> PublishResult:
    """Snapshot the dataset's feature files into the offline store, write the manifest, apply the repo.

    `inputs` (a refresh): the files to add per kind instead of every registered output's files.
    `users` (a refresh of some users): the only users whose sessions changed; the session views keep every
    other user's published rows and compute these users' only (the session files need hold no other's)."""
    started = time.perf_counter()
    store_yaml(config.online_store)  # fails early on an unknown store
    schema = schema_name(dataset)
    if inputs is None:
        export_behind(home, schema, log)  # copies a refresh left behind their tables are written again first
        inputs = {kind: output.files(home, schema) for kind, output in OUTPUTS.items()}  # every registered output
    else:
        inputs = {kind: list(inputs.get(kind, [])) for kind in OUTPUTS}
    skipped = [k for k in OUTPUTS if not inputs[k]]
    if len(skipped) == len(OUTPUTS):
        commands = sorted({f"`{o.produced_by} {dataset}`" for o in OUTPUTS.values() if o.produced_by})
        raise PublishError(
            f"nothing to publish for {dataset}: run {', '.join(commands[:-1])} or {commands[-1]} first (none of "
            f"{', '.join(o.file.replace('{set}', '*') for o in OUTPUTS.values())} is in {home.data_dir / schema})")
    for k in skipped:
        log(f"{dataset}: no {OUTPUTS[k].description} to publish, skipping")
    feast = feast_dir(home)
    feast.mkdir(parents=True, exist_ok=True)
    with file_lock(feast / ".publish.lock"):
        project = feast_project(home, config.project)
        _clean_orphans(home, log)
        manifest = _read_manifest(manifest_path(home))
        clash = [d for d, e in manifest.get("datasets", {}).items() if d != dataset and e.get("schema") == schema]
        if clash:
            raise PublishError(f"{dataset} and the published {clash[0]} share the schema name {schema}, "
                               "so their views would have the same names")
        entry, writes, new_rows, online = _stage(home, dataset, schema, inputs,
                                                 manifest.get("datasets", {}).get(dataset), config, log, users)
        manifest.setdefault("datasets", {})[dataset] = entry
        manifest["format"] = MANIFEST_FORMAT
        try:  # the declarations must build before anything is replaced
            objects = _definitions().build(manifest, feast)
        except Exception as e:
            for tmp, _ in writes:
                tmp.unlink(missing_ok=True)
            raise PublishError(f"the Feast declarations for {dataset} do not build: {e}") from e
        _reached("staging")
        # From here on a kill leaves the histories ahead of the registry: the manifest records which
        # views have rows not materialized yet (`pending_from`), so the next publish still rewinds them.
        for tmp, target in writes:
            os.replace(tmp, target)
        _write_json(manifest_path(home), manifest)
        log(f"{dataset}: {len(entry['views'])} views in {manifest_path(home)}")
        if repo_project(home) not in (None, project):
            log(f"Feast project: {project} (was {repo_project(home)}); views are materialized afresh under it")
        repo = ensure_repo(home, project, log)
        pending = _pending(manifest)
        complete, caught_up = _apply_all(home, objects, pending, config, log)
        if complete:
            if _clear_pending(manifest):
                _write_json(manifest_path(home), manifest)
            for removed in feast.rglob("*.removed.parquet"):  # cleared in every registry's online store
                removed.unlink()
        if config.materialize and users is not None:
            # a refresh: the views that served every key's latest row take the changed keys' rows as they are;
            # materializing them would read their whole histories for those few rows. Every store the home
            # serves from is refreshed, not only the chosen one: a cron `llm4es refresh` (SQLite by default)
            # would otherwise leave a Redis that publish filled serving the changed users' old rows.
            for store, up_to_date in caught_up.items():
                try:
                    _materialize(home, store, None, config.redis_url, None, log,
                                 direct={n: t for n, t in online.items() if n in up_to_date},
                                 idle=up_to_date - set(pending))
                except Exception as e:
                    if store == config.online_store:
                        raise
                    log(f"warning: the {store} online store was not refreshed ({type(e).__name__}: {e}); it "
                        f"serves the changed users' previous rows until `llm4es publish {dataset} --online-store "
                        f"{store} --materialize`")
        elif config.materialize:
            _materialize(home, config.online_store, None, config.redis_url, None, log)
    views = _views_of(dataset, entry, feast)
    return PublishResult(dataset, schema, repo, manifest_path(home), config.online_store, views, skipped, new_rows,
                         config.materialize, time.perf_counter() - started)
