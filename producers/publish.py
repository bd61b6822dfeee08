"""`llm4es publish DATASET`: the dataset's feature files into the Feast repo, and reads back through Feast.

Inputs (under `data/<schema>/`, each skipped with a message when absent; nothing at all is an error):
`agg_features.parquet` (aggregate features), `coles_embeddings.parquet` (CoLES vectors) and
`embeddings/*.parquet` (LLM4ES vectors, one file per *set*: model + checkpoint + layers + text kind).

What publish does, in this order (under a lock, so two publishes never interleave):

1. Adds each input as a snapshot to its set's history, the offline store Feast reads:
   `data/feast/<schema>/agg_features.parquet`, `.../coles/<set id>.parquet`, `.../llm4es/<set id>.parquet`,
   one row per user and `feature_timestamp` (the as-of time of the events the row was computed from).
   Snapshots accumulate; publishing rows with a `(user_id, feature_timestamp)` already held replaces
   those rows. Every file is first written beside its target and renamed only when all are written.
2. Writes `data/feast/manifest.json` (every published dataset: its entity, its views, their Parquet
   files, features and provenance; read back by `published_views`).
3. Makes sure `<home>/feature_repo` is the Feast repo (the checkout's own folder when the home is
   the checkout, else a copy of the package's `feature_repo` files), its yaml files written with the
   home's Feast project (`PublishConfig.project`, `$LLM4ES_FEAST_PROJECT`, the project the home
   already uses, or one derived from the home's path), and applies its declarations
   (`feature_repo/definitions.py`, built from the manifest) to a copy of the chosen online store's
   registry, deleting objects no longer declared (what `feast -c feature_repo apply` does); then
   rewinds the materialization record of every view that got new rows, so the next
   `materialize-incremental` writes them, and renames the copy over the live registry.
4. Optionally materializes (`materialize-incremental` up to now, view by view) into the online store.

Live readers (`get_online_features` while publish runs) never see a failure or lose a value: views
are never dropped and re-created (new data is new rows in a view's history, written to the online
store over the old rows), the registry is only ever replaced whole (`feature_repo/registry_store.py`),
a view being materialized keeps serving its last values, and a publish killed at any point leaves the
previous registry serving; its temp files are removed by the next publish, which completes the work.

Views of dataset schema `s`: `s__agg_features`, `s__coles_embedding` (the most recently produced CoLES
set), `s__llm4es_embedding` (the default LLM4ES set: the most recently produced one, or the one
`PublishConfig.llm4es_set` names) and `s__llm4es__<label>` for every other LLM4ES set ever published
(e.g. `s__llm4es__<run>_epoch_2__serialized`, `s__llm4es__base_smollm2_135m__enriched`). The default
view reads its set's own history, so it never mixes sets.

Online stores: SQLite (`feature_repo/feature_store.yaml`, `data/feast/online.db`) or Redis
(`feature_repo/feature_store.redis.yaml`, 127.0.0.1:6379 unless `redis_url` says otherwise). Each has
its own registry, because Feast records in the registry how far each view was materialized.

Feast is imported lazily: `llm4es --help` stays fast.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from producers.datasets.definition import schema_name
from producers.errors import Llm4esError
from producers.stores.locks import file_lock
from producers.stores.provenance import code_version
from producers.stores.warehouse import Home

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from feast import FeatureStore

Log = Callable[[str], None]

KINDS = ("agg", "coles", "llm4es", "sessions", "intents")  # the inputs publish looks for
# Every view kind, in the order views are listed. `sessions`/`intents` are the user-level rollups of
# the session-keyed `session_embedding`/`session_intent` views.
VIEW_KINDS = ("agg", "coles", "llm4es", "sessions", "intents", "session_embedding", "session_intent")
SESSION_VIEWS = {"session_embedding": "session_embedding", "session_intent": "session_intent",
                 "sessions": "session_embedding_rollup", "intents": "intent_shares"}  # kind -> view name suffix
ONLINE_STORES = {"sqlite": "feature_store.yaml", "redis": "feature_store.redis.yaml"}
REPO_FILES = ("definitions.py", "registry_store.py")  # copied as they are
TEMPLATES = {"feature_store.yaml": "feature_store.template.yaml",  # written with the home's project
             "feature_store.redis.yaml": "feature_store.redis.template.yaml"}
PROJECT_ENV = "LLM4ES_FEAST_PROJECT"
MANIFEST_FORMAT = 1
KV_KEY = b"llm4es"
DEFAULT_LLM4ES = "llm4es_embedding"
DEFAULT_COLES = "coles_embedding"
AGG = "agg_features"
_LLM4ES_KEY = ("model", "checkpoint", "layers", "text_kind")
_COLES_KEY = ("model", "checkpoint")
_INT_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "HUGEINT"}
_FLOAT_TYPES = {"FLOAT", "DOUBLE", "REAL"}


class PublishError(Llm4esError, ValueError):
    """Nothing to publish, inputs that do not fit, or a Feast repo that cannot take them."""


@dataclass(frozen=True)
class PublishConfig:
    llm4es_set: str | None = None  # the default LLM4ES set: view label, set id, file name or checkpoint
    online_store: str = "sqlite"  # sqlite | redis: whose registry to apply to (and materialize into)
    redis_url: str | None = None  # Feast's `host:port[,db=N,password=...]` (or redis://host:port/N)
    materialize: bool = False  # also materialize-incremental up to now into the online store
    recent_sessions: int = 10  # K of the user rollups: mean embedding and intent shares over the last K sessions
    project: str | None = None  # the Feast project (default: $LLM4ES_FEAST_PROJECT, the home's, or from its path)


@dataclass(frozen=True)
class ViewInfo:
    """One published feature view, as `published_views` lists it."""

    name: str  # `<schema>__llm4es_embedding`, `<schema>__llm4es__<label>`, ...
    kind: str  # agg | coles | llm4es | sessions | intents (user-keyed), session_embedding | session_intent
    is_default: bool  # the view `agg`/`coles`/`llm4es` stands for
    dataset: str
    features: tuple[str, ...]  # feature names in the view (`vector` for embeddings)
    path: Path  # the Parquet history the view reads
    set_id: str
    dim: int | None = None
    model: str | None = None
    checkpoint: str | None = None  # `base` or the checkpoint folder
    epoch: int | None = None
    layers: str | None = None
    text_kind: str | None = None
    run: str | None = None  # the fine-tuning run folder the checkpoint belongs to
    source_hash: str | None = None  # data version
    code_version: str | None = None  # of the code that produced the features
    produced_at: str | None = None  # latest production of the set
    feature_timestamps: tuple[str, ...] = ()  # every published snapshot, oldest first
    join_key: str = "user_id"  # the entity's key: `session_id` for session-keyed views
    vector_features: tuple[str, ...] = ()  # the features declared Array(Float32)


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


# --------------------------------------------------------------------------------------------
# Paths and the repo


def feast_dir(home: Home) -> Path:
    return home.data_dir / "feast"


def manifest_path(home: Home) -> Path:
    return feast_dir(home) / "manifest.json"


def repo_dir(home: Home) -> Path:
    return home.root / "feature_repo"


def package_repo_dir() -> Path:
    """The llm4es package's own `feature_repo` folder (in a checkout: `<checkout>/feature_repo`)."""
    try:
        import feature_repo
    except ImportError:  # an editable install made before the package existed: it sits beside producers/
        return Path(__file__).resolve().parent.parent / "feature_repo"
    return Path(feature_repo.__file__).resolve().parent


def _definitions():
    """`feature_repo.definitions`, imported as a package module (so it only offers `build`)."""
    try:
        from feature_repo import definitions
    except ImportError:
        import importlib.util
        import sys

        name = "feature_repo.definitions"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, package_repo_dir() / "definitions.py")
        definitions = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(definitions)
        sys.modules[name] = definitions
    return definitions


def default_project(home: Home) -> str:
    """`llm4es_<folder>_<hash of the home's path>`: two homes never share a project by accident."""
    digest = hashlib.sha256(str(home.root).encode()).hexdigest()[:8]
    return f"llm4es_{_slug(home.root.name)[:24]}_{digest}"


def repo_project(home: Home) -> str | None:
    """The project the home's repo yaml names, if publish wrote it (a yaml of an older llm4es, which
    named the shared project `llm4es` for every home, does not count)."""
    path = repo_dir(home) / "feature_store.yaml"
    if not path.is_file():
        path = repo_dir(home) / "feature_store.redis.yaml"
    if not path.is_file():
        return None
    text = path.read_text()
    found = re.search(r"^project:\s*(\S+)\s*$", text, re.M)
    return found.group(1) if found and "registry_store_type" in text else None


def feast_project(home: Home, wanted: str | None = None) -> str:
    """The Feast project to publish to: `wanted`, else $LLM4ES_FEAST_PROJECT, else the one the home's repo
    already uses, else `default_project`."""
    name = wanted or os.environ.get(PROJECT_ENV) or repo_project(home) or default_project(home)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_]*", name):
        raise PublishError(f"Feast project {name!r}: use letters, digits and underscores, starting with a letter "
                           f"or digit (from {'--project' if wanted else PROJECT_ENV if os.environ.get(PROJECT_ENV) else 'the home'})")
    return name


def ensure_repo(home: Home, project: str | None = None, log: Log = lambda _: None) -> Path:
    """`<home>/feature_repo` with the package's repo files in it and its yaml files naming `project`
    (default: `feast_project(home)`). In the checkout itself only the yaml files are written (not tracked)."""
    repo, package = repo_dir(home), package_repo_dir()
    project = project or feast_project(home)
    repo.mkdir(parents=True, exist_ok=True)
    wanted = {}
    if repo.resolve() != package:
        for name in REPO_FILES:
            src = package / name
            if not src.is_file():
                raise PublishError(f"the llm4es package lacks {src}")
            wanted[name] = src.read_bytes()
    for name, template in TEMPLATES.items():
        src = package / template
        if not src.is_file():
            raise PublishError(f"the llm4es package lacks {src} (add feature_repo/*.yaml to its package data)")
        text = re.sub(r"^project:.*$", f"project: {project}", src.read_text(), count=1, flags=re.M)
        wanted[name] = text.encode()
    for name, content in wanted.items():
        dst = repo / name
        if dst.is_file() and dst.read_bytes() == content:
            continue
        log(f"{'updating' if dst.exists() else 'writing'} {dst}")
        tmp = dst.with_name(f".{name}.{os.getpid()}.tmp")
        tmp.write_bytes(content)
        os.replace(tmp, dst)
    return repo


def _clean_orphans(home: Home, log: Log) -> None:
    """Remove the temp files of publishes (and registry writes) that were killed: `.<name>.<pid>.tmp`
    and `.<registry>.<pid>.staging` whose process is gone."""
    found = [*feast_dir(home).rglob(".*.tmp"), *feast_dir(home).glob(".*.staging"), *repo_dir(home).glob(".*.tmp")]
    for path in found:
        pid = re.search(r"\.(\d+)\.(?:tmp|staging)$", path.name)
        if pid and _alive(int(pid.group(1))):
            continue
        log(f"removing {path}, left by a publish that did not finish")
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier call of this process: nothing of it is running now (we hold the lock)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reached(phase: str) -> None:
    """A named point of the publish flow: `staging` (history files written, none renamed), `apply` (the new
    registry written beside the live one, not swapped in), `materialize` (after each view). Does nothing;
    the tests replace it to kill a publish at a known phase."""


# --------------------------------------------------------------------------------------------
# publish


def publish(home: Home, dataset: str, config: PublishConfig = PublishConfig(),
            log: Log = lambda _: None) -> PublishResult:
    """Snapshot the dataset's feature files into the offline store, write the manifest, apply the repo."""
    started = time.perf_counter()
    store_yaml(config.online_store)  # fails early on an unknown store
    schema = schema_name(dataset)
    inputs = _find_inputs(home, schema)
    skipped = [k for k in KINDS if not inputs[k]]
    if len(skipped) == len(KINDS):
        src = home.data_dir / schema
        raise PublishError(
            f"nothing to publish for {dataset}: run `llm4es aggregate {dataset}`, `llm4es coles {dataset}`, "
            f"`llm4es embed {dataset}` or `llm4es sessions embed {dataset}` first (none of agg_features.parquet, "
            f"coles_embeddings.parquet, embeddings/*.parquet, session_embeddings.parquet, session_intents.parquet "
            f"is in {src})")
    for k in skipped:
        log(f"{dataset}: no {_describe(k)} to publish, skipping")
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
        entry, writes, new_rows = _stage(home, dataset, schema, inputs, manifest.get("datasets", {}).get(dataset),
                                         config, log)
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
        if _apply_all(home, objects, _pending(manifest), config, log):
            if _clear_pending(manifest):
                _write_json(manifest_path(home), manifest)
            for removed in feast.rglob("*.removed.parquet"):  # cleared in every registry's online store
                removed.unlink()
        if config.materialize:
            _materialize(home, config.online_store, None, config.redis_url, None, log)
    views = _views_of(dataset, entry, feast)
    return PublishResult(dataset, schema, repo, manifest_path(home), config.online_store, views, skipped, new_rows,
                         config.materialize, time.perf_counter() - started)


def _describe(kind: str) -> str:
    return {"agg": "aggregate features (agg_features.parquet)", "coles": "CoLES embeddings (coles_embeddings.parquet)",
            "llm4es": "LLM4ES embeddings (embeddings/*.parquet)",
            "sessions": "session embeddings (session_embeddings.parquet)",
            "intents": "session intents (session_intents.parquet)"}[kind]


def _find_inputs(home: Home, schema: str) -> dict[str, list[Path]]:
    src = home.data_dir / schema
    found = {"agg": [src / "agg_features.parquet"], "coles": [src / "coles_embeddings.parquet"],
             "llm4es": sorted((src / "embeddings").glob("*.parquet")) if (src / "embeddings").is_dir() else [],
             "sessions": [src / "session_embeddings.parquet"], "intents": [src / "session_intents.parquet"]}
    return {k: [p for p in paths if p.is_file() and not p.name.startswith(".")] for k, paths in found.items()}


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "datasets": {}}
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise PublishError(f"{path} is not valid JSON ({e}); delete it and publish every dataset again") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise PublishError(f"{path} has manifest format {manifest.get('format')!r}, this version writes "
                           f"{MANIFEST_FORMAT}; delete {path.parent} and publish again")
    return manifest


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Snapshots


def _connect():
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")  # TIMESTAMPTZ inputs become naive UTC, as the warehouse's
    return con


def _arrow(rel) -> "pa.Table":
    return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.fetch_arrow_table()


def _sql_path(p: Path) -> str:
    return "'" + str(p).replace("'", "''") + "'"


def _kv_provenance(path: Path) -> dict:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    try:
        value = json.loads(meta[KV_KEY]) if KV_KEY in meta else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _user_type(con, path: Path) -> str:
    types = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({_sql_path(path)})").fetchall()}
    if "user_id" not in types:
        raise PublishError(f"{path} has no user_id column")
    return "INT64" if types["user_id"].upper() in _INT_TYPES else "STRING"


def _require(con, path: Path, columns: Sequence[str]) -> dict[str, str]:
    types = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({_sql_path(path)})").fetchall()}
    missing = [c for c in columns if c not in types]
    if missing:
        raise PublishError(f"{path} lacks the column(s) {', '.join(missing)}")
    return types


def _stage(home: Home, dataset: str, schema: str, inputs: dict[str, list[Path]], previous: dict | None,
           config: PublishConfig, log: Log) -> tuple[dict, list[tuple[Path, Path]], dict[str, int]]:
    """The dataset's new manifest entry and the history files to rename into place (written as temps,
    removed again when anything fails)."""
    writes: list[tuple[Path, Path]] = []
    try:
        entry, new_rows = _stage_into(writes, home, dataset, schema, inputs, previous, config, log)
    except BaseException:
        for tmp, _ in writes:
            tmp.unlink(missing_ok=True)
        raise
    return entry, writes, new_rows


def _stage_into(writes: list[tuple[Path, Path]], home: Home, dataset: str, schema: str,
                inputs: dict[str, list[Path]], previous: dict | None, config: PublishConfig,
                log: Log) -> tuple[dict, dict[str, int]]:
    feast = feast_dir(home)
    out = feast / schema
    con = _connect()
    try:
        user_types = {_user_type(con, p) for paths in inputs.values() for p in paths}
        if previous:
            user_types.add(previous["user_id_type"])
        if len(user_types) > 1:
            raise PublishError(f"{dataset}: the feature files disagree on the type of user_id (integer in some, text in "
                               f"others{', or the published history' if previous else ''}); produce them again from "
                               f"one ingest{f' or delete {out}' if previous else ''}")
        user_type = user_types.pop()
        id_sql = "CAST(user_id AS BIGINT)" if user_type == "INT64" else "CAST(user_id AS VARCHAR)"
        sets: dict[str, dict] = {k: dict(v) for k, v in (previous or {}).get("sets", {}).items()}
        new_rows: dict[str, int] = {}
        current: dict[str, list[str]] = {k: [] for k in VIEW_KINDS}
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for path in inputs["agg"]:
            info = _stage_agg(con, path, id_sql, out, writes, log)
            info["published_at"] = now
            sets[info["set_id"]] = {**sets.get(info["set_id"], {}), **info}
            current["agg"].append(info["set_id"])
        for kind, key in (("coles", _COLES_KEY), ("llm4es", _LLM4ES_KEY)):
            for path in inputs[kind]:
                for info in _stage_vectors(con, kind, key, path, id_sql, out, writes, log):
                    info["published_at"] = now
                    sets[info["set_id"]] = {**sets.get(info["set_id"], {}), **info}
                    current[kind].append(info["set_id"])
        for kind in ("sessions", "intents"):
            for path in inputs[kind]:
                for info in _stage_session_views(con, kind, path, id_sql, out, writes, config.recent_sessions, log):
                    info["published_at"] = now
                    sets[info["set_id"]] = info  # written afresh: a session view holds the current production only
                    current[info["kind"]].append(info["set_id"])
    finally:
        con.close()
    for set_id in {s for ids in current.values() for s in ids}:
        new_rows[set_id] = sets[set_id].pop("new_rows", 0)
        # the earliest row not yet known to be in the online store: materialization restarts there
        pending = [*sets[set_id].pop("new_timestamps", []), sets[set_id].get("pending_from")]
        sets[set_id]["pending_from"] = min(t for t in pending if t)
    defaults = dict((previous or {}).get("defaults", {}))
    for kind in ("agg", "coles", *SESSION_VIEWS):
        if current[kind]:
            defaults[kind] = max(current[kind], key=lambda s: sets[s]["produced_at"] or "")
    if current["llm4es"]:
        defaults["llm4es"] = _choose_llm4es(current["llm4es"], sets, _home_relative(home, config.llm4es_set), log)
    elif config.llm4es_set:
        raise PublishError(f"LLM4ES set {config.llm4es_set!r} asked for, but {dataset} has no LLM4ES embeddings files")
    _name_sets(schema, sets)
    is_default = {s: s == defaults.get(sets[s]["kind"]) for s in sets}
    views = [_view_entry(dataset, schema, sets[s], is_default[s])
             for s in sorted(sets, key=lambda s: (VIEW_KINDS.index(sets[s]["kind"]), not is_default[s], sets[s]["name"]))
             if sets[s]["kind"] == "llm4es" or is_default[s]]
    entry = {"dataset": dataset, "schema": schema, "entity": f"{schema}__user", "user_id_type": user_type,
             "session_entity": f"{schema}__session",
             "published_at": now, "published_by": code_version(), "defaults": defaults, "sets": sets, "views": views}
    by_view = {v["set_id"]: v["name"] for v in views}
    return entry, {by_view.get(s, s): n for s, n in new_rows.items()}


def _set_id(kind: str, key: dict) -> str:
    return kind + "-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _stage_agg(con, path: Path, id_sql: str, out: Path, writes: list, log: Log) -> dict:
    types = _require(con, path, ["user_id", "feature_timestamp"])
    prov = _kv_provenance(path)
    features, dtypes, dropped = [], {}, []
    for name, t in types.items():
        if name in ("user_id", "feature_timestamp", "produced_at"):
            continue
        base = t.upper().split("(")[0]
        if base in _INT_TYPES:
            features.append(f'CAST("{name}" AS BIGINT) AS "{name}"')
            dtypes[name] = "Int64"
        elif base in _FLOAT_TYPES or base == "DECIMAL":
            features.append(f'CAST("{name}" AS DOUBLE) AS "{name}"')
            dtypes[name] = "Float64"
        else:
            dropped.append(f"{name} ({t})")
    if dropped:
        log(f"{path.name}: not numeric, not published: {', '.join(dropped)}")
    if not features:
        raise PublishError(f"{path} has no numeric feature columns")
    produced = _timestamp(prov.get("produced_at")) or datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    produced_sql = ('CAST("produced_at" AS TIMESTAMP)' if "produced_at" in types
                    else f"CAST('{produced.replace(tzinfo=None).isoformat()}' AS TIMESTAMP)")
    snapshot = (f"SELECT {id_sql} AS user_id, CAST(feature_timestamp AS TIMESTAMP) AS feature_timestamp, "
                f"{produced_sql} AS produced_at, {', '.join(features)} FROM read_parquet({_sql_path(path)})")
    set_id = "agg"
    target = out / f"{AGG}.parquet"
    stats, history_types = _merge(con, snapshot, target, writes, path)
    # typed as the history holds them: a column that was DOUBLE in an older snapshot stays DOUBLE
    dtypes = {n: "Int64" if history_types[n].upper() == "BIGINT" else "Float64" for n in dtypes}
    info = {"kind": "agg", "set_id": set_id, "source": str(target.relative_to(out.parent)), "file": str(path),
            "dtypes": dtypes, "source_hash": prov.get("source_hash"), "code_version": prov.get("code_version"),
            "ingest_id": prov.get("ingest_id"), "definition_fingerprint": prov.get("definition_fingerprint"),
            "as_of": prov.get("as_of"), **stats}
    log(f"{path.name}: {stats['new_rows']:,} rows at {', '.join(stats['new_timestamps'])} "
        f"({len(dtypes)} features) -> {target}")
    return info


def _stage_vectors(con, kind: str, key_cols: Sequence[str], path: Path, id_sql: str, out: Path, writes: list,
                   log: Log) -> list[dict]:
    types = _require(con, path, ["user_id", "vector", *key_cols, "produced_at"])
    prov = _kv_provenance(path)
    src = f"read_parquet({_sql_path(path)})"
    cols = {c: (f'"{c}"' if c in types else "NULL") for c in ("epoch", "layers", "text_kind", "source_hash",
                                                               "code_version", "feature_timestamp")}
    keys = con.execute(f"SELECT DISTINCT {', '.join(key_cols)} FROM {src} ORDER BY ALL").fetchall()
    infos = []
    for values in keys:
        key = dict(zip(key_cols, values))
        where = " AND ".join(f'"{c}" IS NOT DISTINCT FROM ${c}' for c in key_cols)
        n_null_ts, n_null_vec, dims, epochs, hashes, codes, produced = con.execute(
            f"SELECT count(*) FILTER (WHERE {cols['feature_timestamp']} IS NULL), "
            "count(*) FILTER (WHERE vector IS NULL), list(DISTINCT len(vector)) FILTER (WHERE vector IS NOT NULL), "
            f"list(DISTINCT {cols['epoch']}), list(DISTINCT {cols['source_hash']}), "
            f"list(DISTINCT {cols['code_version']}), max(produced_at) FROM {src} WHERE {where}", key).fetchall()[0]
        label = f"{path.name}" + (f" ({', '.join(f'{k}={v}' for k, v in key.items())})" if len(keys) > 1 else "")
        if len(dims) != 1:
            raise PublishError(f"{label}: vectors of {len(dims)} different lengths ({sorted(dims)[:5]})" if dims
                               else f"{label}: no vectors")
        if n_null_vec:
            log(f"{label}: {n_null_vec:,} users without a vector, not published")
        if n_null_ts:
            log(f"{label}: {n_null_ts:,} rows have no feature_timestamp (made before it existed); using their "
                "produced_at, a later time, so no point-in-time join sees them too early")
        snapshot = (f"SELECT {id_sql} AS user_id, CAST(coalesce({cols['feature_timestamp']}, produced_at) AS TIMESTAMP) "
                    "AS feature_timestamp, CAST(produced_at AS TIMESTAMP) AS produced_at, "
                    f"CAST(vector AS FLOAT[]) AS vector, CAST({cols['source_hash']} AS VARCHAR) AS source_hash, "
                    f"CAST({cols['code_version']} AS VARCHAR) AS code_version FROM {src} "
                    f"WHERE {where} AND vector IS NOT NULL")
        set_id = _set_id(kind, key)
        target = out / kind / f"{set_id}.parquet"
        stats, _ = _merge(con, snapshot, target, writes, path, params=key)
        epochs = [e for e in epochs if e is not None]
        hashes = sorted(h for h in hashes if h is not None)
        codes = sorted(c for c in codes if c is not None)
        info = {"kind": kind, "set_id": set_id, "source": str(target.relative_to(out.parent)), "file": str(path),
                **key, "epoch": int(epochs[0]) if len(epochs) == 1 else None, "dim": int(dims[0]),
                "run": _run_of(key["checkpoint"]),
                "source_hash": hashes[0] if len(hashes) == 1 else (",".join(hashes) if hashes else prov.get("source_hash")),
                "code_version": codes[0] if len(codes) == 1 else (",".join(codes) if codes else prov.get("code_version")),
                "texts_digest": prov.get("texts_digest"), "pooling": prov.get("pooling"), **stats}
        info["produced_at"] = max(stats["produced_at"] or "", produced.isoformat() if produced else "") or None
        log(f"{label}: {stats['new_rows']:,} vectors of {info['dim']} at {', '.join(stats['new_timestamps'])} -> {target}")
        infos.append(info)
    return infos


def _stage_session_views(con, kind: str, path: Path, id_sql: str, out: Path, writes: list, recent: int,
                         log: Log) -> list[dict]:
    """A session-keyed view and its user rollup from `session_embeddings.parquet` or `session_intents.parquet`.

    Rows are timestamped with the session's end: a session's vector or intent is known once it ended, so a
    point-in-time join at time t sees exactly the sessions that ended by t, and the rollup row at a session's
    end summarises the user's last `recent` sessions up to it. Unlike user snapshots, these files are
    written afresh on every publish (a re-built session table may have other session ids).
    """
    if recent < 1:
        raise PublishError(f"recent_sessions must be at least 1, not {recent}")
    prov = _kv_provenance(path)
    src = f"read_parquet({_sql_path(path)})"
    value = "embedding" if kind == "sessions" else "label"
    types = _require(con, path, ["session_id", "user_id", "session_end", value])
    produced = _timestamp(prov.get("produced_at")) or datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    produced_sql = f"CAST('{produced.replace(tzinfo=None).isoformat()}' AS TIMESTAMP)"
    extra = ("CAST(embedding AS FLOAT[]) AS embedding" if kind == "sessions" else
             "CAST(label AS VARCHAR) AS intent, CAST(probabilities AS FLOAT[]) AS intent_probabilities, "
             f"CAST({'taxonomy_version' if 'taxonomy_version' in types else 'NULL'} AS BIGINT) AS taxonomy_version")
    con.execute(f"CREATE OR REPLACE TEMP TABLE sess AS SELECT CAST(session_id AS VARCHAR) AS session_id, "
                f"{id_sql} AS user_id, CAST(session_end AS TIMESTAMP) AS feature_timestamp, {produced_sql} AS produced_at, "
                f"{extra}, row_number() OVER (PARTITION BY {id_sql} ORDER BY session_end, session_id) AS n "
                f"FROM {src} WHERE {value} IS NOT NULL AND session_end IS NOT NULL")
    n_sessions, n_ids = con.execute("SELECT count(*), count(DISTINCT session_id) FROM sess").fetchall()[0]
    if not n_sessions:
        raise PublishError(f"{path}: no sessions to publish")
    if n_ids != n_sessions:
        raise PublishError(f"{path}: {n_sessions - n_ids:,} session ids appear more than once")
    window = f"PARTITION BY user_id ORDER BY n ROWS BETWEEN {recent - 1} PRECEDING AND CURRENT ROW"
    # Two sessions of a user ending at the same instant: the rollup row is the later one's.
    latest = "QUALIFY row_number() OVER (PARTITION BY user_id, feature_timestamp ORDER BY n DESC) = 1"
    common = {"source_hash": prov.get("source_hash") or (prov.get("data") or {}).get("source_hash"),
              "code_version": prov.get("code_version"), "file": str(path), "recent_sessions": recent,
              "produced_at": produced.isoformat()}
    if kind == "sessions":
        dims = [d for (d,) in con.execute("SELECT DISTINCT len(embedding) FROM sess").fetchall()]
        if len(dims) != 1:
            raise PublishError(f"{path}: session embeddings of {len(dims)} different lengths ({sorted(dims)[:5]})")
        dim = int(dims[0])
        session_sql = "SELECT session_id, user_id, feature_timestamp, produced_at, embedding FROM sess"
        # Element-wise mean over the last K vectors, in SQL: one row per (session, dimension), a window per dimension.
        rollup_sql = f"""
            WITH long AS (SELECT user_id, n, generate_subscripts(embedding, 1) AS i, unnest(embedding) AS x FROM sess),
            means AS (SELECT user_id, n, i, avg(x) OVER (PARTITION BY user_id, i ORDER BY n
                      ROWS BETWEEN {recent - 1} PRECEDING AND CURRENT ROW) AS m FROM long),
            mean AS (SELECT user_id, n, CAST(list(m ORDER BY i) AS FLOAT[]) AS recent_mean_embedding FROM means
                     GROUP BY user_id, n)
            SELECT s.user_id, s.feature_timestamp, s.produced_at, s.embedding AS last_session_embedding,
                   mean.recent_mean_embedding, CAST(s.n AS BIGINT) AS sessions_so_far
            FROM sess AS s JOIN mean USING (user_id, n) {latest}"""
        meta = {"model": prov.get("model") or "session-encoder", "checkpoint": prov.get("checkpoint"),
                "epoch": prov.get("epoch"), "run": prov.get("run_dir") or prov.get("run"), "dim": dim}
        kinds = ("session_embedding", "sessions")
    else:
        labels = _intent_labels(con, prov)
        shares = ", ".join(f"avg(CAST(intent = '{lbl.replace(chr(39), chr(39) * 2)}' AS DOUBLE)) OVER w AS "
                           f'"share__{_slug(lbl)}"' for lbl in labels)
        session_sql = ("SELECT session_id, user_id, feature_timestamp, produced_at, intent, intent_probabilities, "
                       "taxonomy_version FROM sess")
        rollup_sql = (f"SELECT user_id, feature_timestamp, produced_at, {shares}, count(*) OVER w AS recent_sessions "
                      f"FROM sess WINDOW w AS ({window}) {latest}")
        versions = [v for (v,) in con.execute("SELECT DISTINCT taxonomy_version FROM sess").fetchall()]
        meta = {"model": prov.get("llm_model") or prov.get("model"), "labels": labels, "dim": len(labels),
                "taxonomy_version": versions[0] if len(versions) == 1 else None,
                "classifier": prov.get("classifier")}
        kinds = ("session_intent", "intents")
    infos = []
    for view_kind, query in zip(kinds, (session_sql, rollup_sql)):
        target = out / "sessions" / f"{view_kind}.parquet"
        stats, types_out = _write_fresh(con, query, target, writes, path)
        info = {"kind": view_kind, "set_id": view_kind, "source": str(target.relative_to(out.parent)), **common,
                **meta, "columns": types_out, **stats}
        log(f"{path.name}: {stats['new_rows']:,} {'sessions' if view_kind.startswith('session_') else 'user rollup rows'}"
            f" -> {target}")
        infos.append(info)
    con.execute("DROP TABLE sess")
    return infos


def _intent_labels(con, prov: dict) -> list[str]:
    """The taxonomy's labels in order (recorded by `llm4es intents distill`), else the labels present."""
    labels = [str(lbl) for lbl in prov.get("labels") or []]
    if not labels:
        labels = [v for (v,) in con.execute("SELECT DISTINCT intent FROM sess WHERE intent IS NOT NULL ORDER BY 1")
                  .fetchall()]
    slugs = [_slug(lbl) for lbl in labels]
    if len(set(slugs)) != len(slugs):
        raise PublishError(f"intent labels {labels} do not give distinct feature names")
    return labels


def _write_fresh(con, query: str, target: Path, writes: list, source: Path) -> tuple[dict, dict[str, str]]:
    """Write the query's rows to a temp file beside `target` (appended to `writes`): no history kept."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE fresh AS SELECT * FROM ({query}) ORDER BY feature_timestamp, user_id")
    n_rows, first, last = con.execute("SELECT count(*), min(feature_timestamp), max(feature_timestamp) FROM fresh"
                                      ).fetchall()[0]
    types = {r[0]: r[1] for r in con.execute("DESCRIBE fresh").fetchall()}
    stats = {"new_rows": int(n_rows), "n_rows": int(n_rows), "new_timestamps": [first.isoformat(), last.isoformat()],
             "feature_timestamps": [last.isoformat()], "first_timestamp": first.isoformat()}
    stats["data_version"] = _write_beside(_arrow(con.sql("SELECT * FROM fresh")), target, writes,
                                          {"written_from": str(source), **stats})
    _note_removed_keys(con, target, "session_id" if "session_id" in types else "user_id", writes)
    con.execute("DROP TABLE fresh")
    return stats, types


def removed_keys_path(history: Path) -> Path:
    """Beside a history written afresh: the keys its previous version had and it lacks, until publish has
    cleared their online rows."""
    return history.with_name(f"{history.stem}.removed.parquet")


def _note_removed_keys(con, target: Path, key: str, writes: list) -> None:
    """The keys of `target`'s previous version (and of a removal list not cleared yet) that `fresh` lacks."""
    removed = removed_keys_path(target)
    known = [f"SELECT DISTINCT {key} FROM read_parquet({_sql_path(p)})" for p in (target, removed) if p.is_file()]
    if not known:
        return
    gone = _arrow(con.sql(f"SELECT * FROM ({' UNION '.join(known)}) EXCEPT SELECT DISTINCT {key} FROM fresh ORDER BY 1"))
    if gone.num_rows:
        _write_beside(gone, removed, writes, {"removed_from": str(target)})


def _merge(con, snapshot: str, target: Path, writes: list, source: Path,
           params: dict | None = None) -> tuple[dict, dict[str, str]]:
    """Write `target`'s history plus the snapshot to a temp file beside it (appended to `writes`)."""

    con.execute(f"CREATE OR REPLACE TEMP TABLE snap AS SELECT * FROM ({snapshot}) "
                "QUALIFY row_number() OVER (PARTITION BY user_id, feature_timestamp ORDER BY produced_at DESC) = 1",
                params or {})
    n_new, new_ts = con.execute("SELECT count(*), list(DISTINCT feature_timestamp ORDER BY feature_timestamp) "
                                "FROM snap").fetchall()[0]
    if not n_new:
        raise PublishError(f"{source}: no rows to publish")
    if target.is_file():
        old = (f"SELECT * FROM read_parquet({_sql_path(target)}) AS h WHERE NOT EXISTS (SELECT 1 FROM snap AS s "
               "WHERE s.user_id = h.user_id AND s.feature_timestamp = h.feature_timestamp)")
        query = f"SELECT * FROM ({old}) UNION ALL BY NAME SELECT * FROM snap"
    else:
        query = "SELECT * FROM snap"
    con.execute(f"CREATE OR REPLACE TEMP TABLE hist AS SELECT * FROM ({query}) ORDER BY feature_timestamp, user_id")
    n_rows, all_ts, produced = con.execute(
        "SELECT count(*), list(DISTINCT feature_timestamp ORDER BY feature_timestamp), max(produced_at) FROM hist"
    ).fetchall()[0]
    table = _arrow(con.sql("SELECT * FROM hist ORDER BY feature_timestamp, user_id"))
    stats = {"new_rows": int(n_new), "new_timestamps": [t.isoformat() for t in new_ts], "n_rows": int(n_rows),
             "feature_timestamps": [t.isoformat() for t in all_ts],
             "produced_at": produced.isoformat() if produced else None}
    history_types = {r[0]: r[1] for r in con.execute("DESCRIBE hist").fetchall()}
    stats["data_version"] = _write_beside(table, target, writes, {"history_of": str(source), **stats})
    con.execute("DROP TABLE snap")
    con.execute("DROP TABLE hist")
    return stats, history_types


def _write_beside(table: "pa.Table", target: Path, writes: list, provenance: dict) -> str:
    """`table` with `provenance` in its metadata, to a temp file beside `target` (appended to `writes`, renamed
    into place only when every file of the publish is written); returns the file's hash (its data version)."""
    import pyarrow.parquet as pq

    meta = dict(table.schema.metadata or {})
    meta[KV_KEY] = json.dumps({**provenance, "code_version": code_version()}).encode()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    pq.write_table(table.replace_schema_metadata(meta), tmp)
    writes.append((tmp, target))
    return _file_hash(tmp)


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _timestamp(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _run_of(checkpoint: str | None) -> str | None:
    """`runs/ml/r1/models/epoch-2` -> `runs/ml/r1`; `base` -> None."""
    if not checkpoint or checkpoint == "base":
        return None
    p = PurePosixPath(checkpoint.replace("\\", "/"))
    if re.fullmatch(r"(epoch|step)-\d+", p.name):
        parent = p.parent
        return str(parent.parent if parent.name == "models" else parent)
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")[:48].strip("_") or "x"


def _labels(info: dict) -> list[str]:
    """Readable candidate labels for an LLM4ES set, shortest first."""
    checkpoint, run = info["checkpoint"], info.get("run")
    if checkpoint == "base":
        ck = f"base_{_slug(str(info['model']).rstrip('/').split('/')[-1])}"
    elif run is not None:
        # `epoch-2` -> <run>_epoch_2; `step-40` (max_steps ended inside an epoch) -> <run>_step_40
        folder = PurePosixPath(checkpoint.replace("\\", "/")).name
        ck = f"{_slug(PurePosixPath(run).name)}_{_slug(folder)}"
    else:
        ck = _slug("_".join(PurePosixPath(checkpoint.replace("\\", "/")).parts[-2:]))
    short = f"{ck}__{_slug(info.get('text_kind') or 'texts')}"
    layers = f"{short}__l{_slug(info.get('layers') or 'all')}"
    return [short, layers, f"{layers}__{info['set_id'].split('-')[-1][:8]}"]


def _name_sets(schema: str, sets: dict[str, dict]) -> None:
    """Give every set a stable view name: kept once given, new ones avoid the names taken."""
    taken = {info["name"] for info in sets.values() if info.get("name")}
    for set_id in sorted(sets, key=lambda s: (sets[s].get("produced_at") or "", s)):
        info = sets[set_id]
        if info.get("name"):
            continue
        if info["kind"] == "agg":
            info["name"] = f"{schema}__{AGG}"
        elif info["kind"] == "coles":
            info["name"] = f"{schema}__{DEFAULT_COLES}"
        elif info["kind"] in SESSION_VIEWS:
            info["name"] = f"{schema}__{SESSION_VIEWS[info['kind']]}"
        else:
            info["name"] = next(n for n in (f"{schema}__llm4es__{label}" for label in _labels(info)) if n not in taken)
        taken.add(info["name"])


def _home_relative(home: Home, wanted: str | None) -> str | None:
    """A checkpoint folder given as a path (absolute, or relative to the cwd) as the embeddings record it."""
    if not wanted or not Path(wanted).exists():
        return wanted
    try:
        return Path(wanted).resolve().relative_to(home.root.resolve()).as_posix()
    except ValueError:
        return str(Path(wanted).resolve())


def _choose_llm4es(current: list[str], sets: dict[str, dict], wanted: str | None, log: Log) -> str:
    if wanted is None:
        chosen = max(current, key=lambda s: (sets[s]["produced_at"] or "", s))
        log(f"default LLM4ES set: {sets[chosen]['checkpoint']} ({sets[chosen]['text_kind']}, layers "
            f"{sets[chosen]['layers']}), the most recently produced")
        return chosen
    w = wanted.strip()
    matches = []
    for s in current:
        info = sets[s]
        names = {s, Path(info["file"]).name, Path(info["file"]).stem, info["checkpoint"]}
        names |= {label for label in _labels(info)}
        if info.get("name"):
            names |= {info["name"], info["name"].split("__llm4es__")[-1]}
        if w in names or w.rstrip("/") in names:
            matches.append(s)
    if len(matches) != 1:
        choices = "; ".join(f"{_labels(sets[s])[0]} ({sets[s]['checkpoint']})" for s in sorted(current))
        raise PublishError(f"LLM4ES set {wanted!r} {'matches several' if matches else 'matches none'} of the "
                           f"sets; name one by label, checkpoint or file: {choices}")
    return matches[0]


def _view_entry(dataset: str, schema: str, info: dict, is_default: bool) -> dict:
    kind = info["kind"]
    if kind in SESSION_VIEWS:
        return _session_view_entry(dataset, schema, info)
    if kind == "agg":
        name = f"{schema}__{AGG}"
        features = [{"name": n, "dtype": t} for n, t in info["dtypes"].items()]
        what = f"aggregate features of {dataset} users (activity, numeric statistics, top categories)"
    else:
        name = f"{schema}__{DEFAULT_LLM4ES if kind == 'llm4es' else DEFAULT_COLES}" if is_default else info["name"]
        features = [{"name": "vector", "dtype": "Array(Float32)", "vector_length": info["dim"]}]
        what = (f"{'LLM4ES' if kind == 'llm4es' else 'CoLES'} embeddings of {dataset} users"
                f"{' (the default set)' if is_default and kind == 'llm4es' else ''}: model {info['model']}, "
                f"checkpoint {info['checkpoint']}" + (f" (epoch {info['epoch']})" if info.get("epoch") is not None else "")
                + (f", layers {info['layers']}, {info['text_kind']} texts" if kind == "llm4es" else "")
                + f", {info['dim']} dimensions")
    tags = {"kind": kind, "dataset": dataset, "set_id": info["set_id"], "is_default": str(is_default).lower()}
    for k in ("model", "checkpoint", "epoch", "layers", "text_kind", "run", "dim", "source_hash", "code_version",
              "produced_at", "texts_digest", "ingest_id", "definition_fingerprint", "data_version"):
        if info.get(k) is not None:
            tags[k] = str(info[k])
    tags["feature_timestamp"] = info["feature_timestamps"][-1]
    tags["snapshots"] = str(len(info["feature_timestamps"]))
    description = (f"{what}. One row per user and snapshot (feature_timestamp = as-of time of the events used); "
                   f"{len(info['feature_timestamps'])} snapshot(s), the latest as of {tags['feature_timestamp']}; "
                   f"produced {info.get('produced_at')} by {info.get('code_version')} from data {info.get('source_hash')}.")
    return {"name": name, "kind": kind, "is_default": is_default, "set_id": info["set_id"], "source": info["source"],
            "features": features, "tags": tags, "description": description}


def _session_view_entry(dataset: str, schema: str, info: dict) -> dict:
    kind, user = info["kind"], info["columns"]["user_id"].upper()
    user_dtype = "Int64" if user in _INT_TYPES else "String"
    dim, recent = info["dim"], info["recent_sessions"]
    if kind == "session_embedding":
        features = [{"name": "user_id", "dtype": user_dtype},
                    {"name": "embedding", "dtype": "Array(Float32)", "vector_length": dim}]
        what = f"session embeddings of {dataset} ({dim} dimensions, self-supervised session encoder), one row per session"
    elif kind == "session_intent":
        features = [{"name": "user_id", "dtype": user_dtype}, {"name": "intent", "dtype": "String"},
                    {"name": "intent_probabilities", "dtype": "Array(Float32)", "vector_length": dim},
                    {"name": "taxonomy_version", "dtype": "Int64"}]
        what = (f"intent labels of {dataset} sessions (LLM taxonomy v{info.get('taxonomy_version')} distilled into a "
                f"classifier; probabilities in the order {', '.join(info['labels'])}), one row per session")
    elif kind == "sessions":
        features = [{"name": "last_session_embedding", "dtype": "Array(Float32)", "vector_length": dim},
                    {"name": "recent_mean_embedding", "dtype": "Array(Float32)", "vector_length": dim},
                    {"name": "sessions_so_far", "dtype": "Int64"}]
        what = (f"per user of {dataset}: the last session's embedding and the mean over the last {recent} sessions, "
                "one row per session end")
    else:
        features = [*({"name": f"share__{_slug(lbl)}", "dtype": "Float64"} for lbl in info["labels"]),
                    {"name": "recent_sessions", "dtype": "Int64"}]
        what = (f"per user of {dataset}: the share of each intent among the last {recent} sessions "
                f"({', '.join(info['labels'])}), one row per session end")
    tags = {"kind": kind, "dataset": dataset, "set_id": info["set_id"], "is_default": "true",
            "recent_sessions": str(recent), "feature_timestamp": info["feature_timestamps"][-1]}
    for k in ("model", "checkpoint", "epoch", "run", "dim", "taxonomy_version", "classifier", "source_hash",
              "code_version", "produced_at", "data_version"):
        if info.get(k) is not None:
            tags[k] = info[k] if isinstance(info[k], str) else json.dumps(info[k], default=str)
    if info.get("labels"):
        tags["labels"] = json.dumps(info["labels"])
    description = (f"{what}; feature_timestamp = the session's end, so a point-in-time join only sees sessions "
                   f"that ended by then ({info['first_timestamp']} .. {info['feature_timestamps'][-1]}); produced "
                   f"{info.get('produced_at')} by {info.get('code_version')}.")
    entry = {"name": f"{schema}__{SESSION_VIEWS[kind]}", "kind": kind, "is_default": True, "set_id": info["set_id"],
             "source": info["source"], "features": features, "tags": tags, "description": description}
    if kind.startswith("session_"):
        entry["entity"] = "session"
    return entry


def _views_of(dataset: str, entry: dict, feast: Path) -> list[ViewInfo]:
    return [_view_info(dataset, v, entry["sets"][v["set_id"]], feast) for v in entry["views"]]


def _view_info(dataset: str, view: dict, info: dict, feast: Path) -> ViewInfo:
    tags = view["tags"]
    return ViewInfo(
        name=view["name"], kind=view["kind"], is_default=view["is_default"], dataset=dataset,
        features=tuple(f["name"] for f in view["features"]), path=feast / view["source"], set_id=view["set_id"],
        dim=int(tags["dim"]) if "dim" in tags else None, model=tags.get("model"), checkpoint=tags.get("checkpoint"),
        epoch=int(tags["epoch"]) if "epoch" in tags else None, layers=tags.get("layers"),
        text_kind=tags.get("text_kind"), run=tags.get("run"), source_hash=tags.get("source_hash"),
        code_version=tags.get("code_version"), produced_at=tags.get("produced_at"),
        feature_timestamps=tuple(info["feature_timestamps"]),
        join_key="session_id" if view.get("entity") == "session" else "user_id",
        vector_features=tuple(f["name"] for f in view["features"] if f["dtype"].startswith("Array")))


# --------------------------------------------------------------------------------------------
# Feast


def store_yaml(online_store: str) -> str:
    if online_store not in ONLINE_STORES:
        raise PublishError(f"online store {online_store!r}: expected one of {', '.join(ONLINE_STORES)}")
    return ONLINE_STORES[online_store]


def _quiet_feast() -> None:
    os.environ.setdefault("FEAST_USAGE", "False")
    import logging

    for name in ("feast", "ibis"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:  # unless the application configured it
            logger.setLevel(logging.ERROR)


def _redis_connection(url: str) -> str:
    """Feast's `host:port[,db=N,...]`; a `redis://[:password@]host:port[/db]` URL is translated."""
    if "://" not in url:
        return url
    from urllib.parse import urlparse

    u = urlparse(url)
    parts = [f"{u.hostname or 'localhost'}:{u.port or 6379}"]
    if u.path.strip("/"):
        parts.append(f"db={u.path.strip('/')}")
    if u.password:
        parts.append(f"password={u.password}")
    if u.username and u.username != "default":
        parts.append(f"username={u.username}")
    if u.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def get_store(home: Home, online_store: str = "sqlite", redis_url: str | None = None,
              registry: Path | None = None) -> "FeatureStore":
    """The FeatureStore of `<home>/feature_repo` with the online store's yaml (Redis at `redis_url` if given;
    the registry file `registry` instead of the yaml's, as publish does to stage a new registry)."""
    yaml_name = store_yaml(online_store)
    repo = repo_dir(home)
    if not (repo / yaml_name).is_file():
        raise PublishError(f"no Feast repo at {repo}: run `llm4es publish DATASET` first")
    _quiet_feast()
    from feast import FeatureStore

    if (redis_url is None or online_store != "redis") and registry is None:
        return FeatureStore(repo_path=str(repo), fs_yaml_file=repo / yaml_name)
    import yaml
    from feast.repo_config import RepoConfig

    raw = yaml.safe_load(os.path.expandvars((repo / yaml_name).read_text()))
    if redis_url is not None and online_store == "redis":
        raw["online_store"] = {**raw.get("online_store", {}), "connection_string": _redis_connection(redis_url)}
    if registry is not None:
        raw["registry"] = {**raw["registry"], "path": str(registry)}
    config = RepoConfig(**raw)
    config.repo_path = repo
    return FeatureStore(repo_path=str(repo), config=config)


def registry_path(home: Home, online_store: str) -> Path:
    """The registry file of the online store's yaml."""
    import yaml

    registry = yaml.safe_load((repo_dir(home) / store_yaml(online_store)).read_text())["registry"]
    return (repo_dir(home) / (registry["path"] if isinstance(registry, dict) else registry)).resolve()


def _registry_exists(home: Home, online_store: str) -> bool:
    """Whether the online store's registry was written (by an apply)."""
    if not (repo_dir(home) / store_yaml(online_store)).is_file():
        return False
    return registry_path(home, online_store).is_file()


def _pending(manifest: dict) -> dict[str, datetime]:
    """View name -> the earliest feature_timestamp of its rows that may not be in the online stores yet."""
    pending = {}
    for entry in manifest.get("datasets", {}).values():
        for view in entry["views"]:
            when = _timestamp(entry["sets"][view["set_id"]].get("pending_from"))
            if when is not None:
                pending[view["name"]] = when
    return pending


def _clear_pending(manifest: dict) -> bool:
    """Forget every `pending_from` (the registries now hold the rewinds); whether any was there."""
    cleared = [info.pop("pending_from") for entry in manifest.get("datasets", {}).values()
               for info in entry["sets"].values() if "pending_from" in info]
    return bool(cleared)


def _apply_all(home: Home, objects: dict[str, Any], pending: dict[str, datetime], config: PublishConfig,
               log: Log) -> bool:
    """Apply to the chosen online store's registry and, best effort, to the other stores' existing registries
    (so a store used before never serves data older than what was published). Whether every one was applied."""
    _apply(home, objects, pending, config.online_store, config.redis_url, log)
    complete = True
    for other in ONLINE_STORES:
        if other == config.online_store or not _registry_exists(home, other):
            continue
        try:
            _apply(home, objects, pending, other, config.redis_url, log)
        except PublishError as e:
            complete = False
            log(f"warning: the {other} registry was not updated ({e.__cause__ or e}); its online store may serve "
                f"older features: publish again with online store {other} when it is reachable")
    return complete


def _apply(home: Home, objects: dict[str, Any], pending: dict[str, datetime], online_store: str,
           redis_url: str | None, log: Log) -> None:
    """`feast apply` of these declarations (add or update them, delete what the registry holds beyond them),
    on a copy of the live registry that is renamed over it only when complete.

    Views are updated in place, never deleted and added again: their online rows keep serving. Feast
    keeps a view's materialization intervals across updates, so `materialize-incremental` would skip
    new rows older than its last run (a new snapshot of 1998 data); in the copy, each view with new rows
    gets its intervals cut back to just before the earliest of them (`pending`), and a view that now
    reads another set or file loses them, so the next materialization writes those rows over the old
    ones (the online stores overwrite at equal timestamps too: Redis runs with `skip_dedup`).
    """
    from feast import Entity, FeatureView
    from feast.data_source import DataSource

    wanted = list(objects.values())
    views = {o.name: o for o in wanted if isinstance(o, FeatureView)}
    entities = {o.name for o in wanted if isinstance(o, Entity)}
    sources = {o.name for o in wanted if isinstance(o, DataSource)}
    live = registry_path(home, online_store)
    staged = live.with_name(f".{live.name}.{os.getpid()}.staging")
    try:
        if live.is_file():
            shutil.copyfile(live, staged)
        store = get_store(home, online_store, redis_url, registry=staged)
        with _quiet():
            registered = {v.name: v for v in store.list_feature_views()} if live.is_file() else {}
            stale: list[Any] = [v for n, v in registered.items() if n not in views]
            if registered:
                stale += [e for e in store.list_entities() if e.name not in entities]
                stale += [d for d in store.list_data_sources() if d.name not in sources]
            if stale:
                log(f"{online_store}: removing from the registry: {', '.join(sorted(o.name for o in stale))}")
            log(f"feast apply ({online_store}): {len(views)} views, {len(entities)} entities")
            store.apply(wanted, objects_to_delete=stale, partial=False)
            rewinds = _rewinds(registered, views, pending)
            if rewinds:
                _rewind(store, rewinds)
                log(f"{online_store}: new data for {', '.join(sorted(rewinds))}: the next materialization writes it "
                    "over the rows they serve now")
            for name in sorted(n for n, until in rewinds.items() if until is None):
                gone = _keys_only_in(registered[name].batch_source.path, views[name].batch_source.path)
                if gone:
                    log(f"{online_store}: {name} now reads another set: clearing the online rows of {len(gone):,} "
                        "keys it does not hold")
                    _clear_online(store, store.get_feature_view(name), gone)
            for name in sorted(n for n in views if n in registered):
                removed = removed_keys_path(Path(views[name].batch_source.path))
                if removed.is_file():  # a history written afresh lost keys (a re-built session table)
                    import pyarrow.parquet as pq

                    gone = pq.read_table(removed).column(0).to_pylist()
                    log(f"{online_store}: {name} no longer holds {len(gone):,} keys: clearing their online rows")
                    _clear_online(store, store.get_feature_view(name), gone)
        _reached("apply")
        os.replace(staged, live)
    except PublishError:
        raise
    except Exception as e:
        raise PublishError(f"feast apply ({online_store}) failed ({type(e).__name__}: {e}); the previous registry "
                           f"still serves, the snapshots and manifest are saved: publish again") from e
    finally:
        staged.unlink(missing_ok=True)


def _rewinds(registered: dict[str, Any], views: dict[str, Any], pending: dict[str, datetime]
             ) -> dict[str, datetime | None]:
    """View name -> the time its materialization must restart from (None: from the start of its history)."""
    from datetime import timedelta

    out: dict[str, datetime | None] = {}
    for name, view in views.items():
        old = registered.get(name)
        if old is None or not old.materialization_intervals:
            continue  # never materialized: its first materialization reads everything
        if (old.tags.get("set_id") != view.tags.get("set_id")
                or old.batch_source.path != view.batch_source.path):
            out[name] = None
        elif name in pending:
            out[name] = pending[name] - timedelta(seconds=1)  # materialization ranges start inclusive or not
    return out


def _keys_only_in(old: str, new: str) -> list:
    """The entity keys of the Parquet history `old` that `new` lacks (none when `old` is gone)."""
    if not Path(old).is_file() or not Path(new).is_file():
        return []
    con = _connect()
    try:
        key = "session_id" if "session_id" in {r[0] for r in con.execute(
            f"DESCRIBE SELECT * FROM read_parquet({_sql_path(Path(new))})").fetchall()} else "user_id"
        return [k for (k,) in con.execute(
            f"SELECT DISTINCT {key} FROM read_parquet({_sql_path(Path(old))}) EXCEPT "
            f"SELECT DISTINCT {key} FROM read_parquet({_sql_path(Path(new))}) ORDER BY 1").fetchall()]
    finally:
        con.close()


def _clear_online(store: "FeatureStore", view: Any, keys: list) -> None:
    """Null every feature of `view` for these entity keys in the online store (Feast's write path, as a
    materialization of missing values writes them): a view that switched sets serves nothing of the old one."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    join_key = view.entity_columns[0].name
    now = datetime.now(timezone.utc)
    rows = []
    for k in keys:
        value = Value(string_val=k) if isinstance(k, str) else Value(int64_val=int(k))
        rows.append((EntityKey(join_keys=[join_key], entity_values=[value]), {f.name: Value() for f in view.features},
                     now, None))
    store.provider.online_write_batch(store.config, view, rows, progress=None)


def _rewind(store: "FeatureStore", rewinds: dict[str, datetime | None]) -> None:
    """Cut the views' materialization intervals back to end at the rewind time, in the (staged) registry."""
    registry = store.registry
    for proto in registry.cached_registry_proto.feature_views:
        if proto.spec.project != store.project or proto.spec.name not in rewinds:
            continue
        until = rewinds[proto.spec.name]
        until = until.replace(tzinfo=timezone.utc) if until is not None and until.tzinfo is None else until
        kept = []
        for interval in proto.meta.materialization_intervals:
            start = interval.start_time.ToDatetime(tzinfo=timezone.utc)
            end = interval.end_time.ToDatetime(tzinfo=timezone.utc)
            if until is not None and start < until:
                kept.append((start, min(end, until)))
        del proto.meta.materialization_intervals[:]
        for start, end in kept:
            interval = proto.meta.materialization_intervals.add()
            interval.start_time.FromDatetime(start)
            interval.end_time.FromDatetime(end)
    registry.commit()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Feast's own prints and its dependencies' deprecation warnings are not ours to show."""
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


@contextlib.contextmanager
def _stdout_to(log: Log) -> Iterator[None]:
    """Feast prints progress to stdout: hand its lines to `log` instead (colours stripped)."""
    import warnings

    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for line in buf.getvalue().splitlines():
            line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
            if line:
                log(line)


def materialize(home: Home, online_store: str = "sqlite", end: datetime | None = None, redis_url: str | None = None,
                views: Sequence[str] | None = None, log: Log = lambda _: None) -> None:
    """`feast materialize-incremental end` (default now), view by view: the latest snapshot of every user
    into the online store. Each view's rows are written over the ones it serves, never removed first.

    Holds the publish lock: Feast commits its whole cached registry after each view, so a materialization
    running beside a publish would put back the registry the publish had just replaced."""
    with file_lock(feast_dir(home) / ".publish.lock"):
        _materialize(home, online_store, end, redis_url, views, log)


def _materialize(home: Home, online_store: str, end: datetime | None, redis_url: str | None,
                 views: Sequence[str] | None, log: Log) -> None:
    store = get_store(home, online_store, redis_url)
    end = end or datetime.now(timezone.utc)
    if online_store == "sqlite":
        _sqlite_wal(store)
    names = list(views) if views else [v.name for v in store.list_feature_views()]
    log(f"materializing into {online_store} up to {end.isoformat(timespec='seconds')}")
    try:
        for name in names:
            with _stdout_to(log):
                store.materialize_incremental(end_date=end, feature_views=[name])
            _reached("materialize")
    finally:
        _release_offline_connection()


def _sqlite_wal(store: "FeatureStore") -> None:
    """Readers of the SQLite online store never wait for a materialization's writes (WAL journal; it stays set
    in the file)."""
    import sqlite3

    path = Path(store.config.online_store.path)
    path = path if path.is_absolute() else Path(store.config.repo_path) / path
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=30)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def _release_offline_connection() -> None:
    """Drop the DuckDB connection ibis keeps as its default backend after Feast's offline reads.

    Left alive, it is torn down during interpreter exit in the wrong order and DuckDB's bindings
    print dozens of "nanobind: leaked instance" lines after every command.
    """
    import gc
    import sys

    ibis = sys.modules.get("ibis")
    if ibis is not None:
        ibis.options.default_backend = None
    gc.collect()


# --------------------------------------------------------------------------------------------
# Reads


def published_views(home: Home, dataset: str) -> list[ViewInfo]:
    """The dataset's published views (empty when nothing was published), defaults first within a kind."""
    manifest = _read_manifest(manifest_path(home))
    entry = manifest.get("datasets", {}).get(dataset)
    if not entry:
        return []
    return _views_of(dataset, entry, feast_dir(home))


def _resolve_views(home: Home, dataset: str, views: Sequence[str]) -> tuple[list[ViewInfo], str]:
    published = {v.name: v for v in published_views(home, dataset)}
    if not published:
        raise PublishError(f"nothing is published for {dataset}: run `llm4es publish {dataset}` first")
    schema = schema_name(dataset)
    chosen = []
    for v in views:
        name = v if v in published else f"{schema}__{v}"
        if name not in published:
            raise PublishError(f"{dataset} has no published view {v!r}; published: {', '.join(sorted(published))}")
        chosen.append(published[name])
    if not chosen:
        raise PublishError("name at least one view")
    keys = {v.join_key for v in chosen}
    if len(keys) > 1:
        raise PublishError(f"views keyed by user and by session cannot be read together: "
                           f"{', '.join(f'{v.name} ({v.join_key})' for v in chosen)}")
    key = keys.pop()
    entity = "STRING" if key == "session_id" else _read_manifest(manifest_path(home))["datasets"][dataset]["user_id_type"]
    return chosen, entity


def _refs(views: list[ViewInfo]) -> list[str]:
    return [f"{v.name}:{f}" for v in views for f in v.features]


def _vector_columns(views: list[ViewInfo]) -> list[str]:
    return [f"{v.name}__{f}" for v in views for f in v.vector_features]


def _as_vectors(values) -> list:
    import numpy as np

    out = []
    for v in values:
        if v is None or (isinstance(v, float) and v != v):
            out.append(None)
        else:
            out.append(np.asarray(v, dtype=np.float32))
    return out


def historical_features(home: Home, dataset: str, views: Sequence[str], entity_df: "pd.DataFrame",
                        online_store: str | None = None) -> "pd.DataFrame":
    """Point-in-time features: for each (user_id, event_timestamp) row, each view's latest snapshot at or
    before event_timestamp (none: missing); session-keyed views take (session_id, event_timestamp) rows. Rows in `entity_df`'s order, its columns first, then one column
    per feature named `<view>__<feature>`; vectors as float32 numpy arrays (None where missing).
    `views` are full view names or the part after `<schema>__` (`llm4es_embedding`, `agg_features`).
    The offline store is the same for every online store; `online_store` only picks whose registry to
    read (default: the first applied one, SQLite's before Redis')."""
    import pandas as pd

    chosen, user_type = _resolve_views(home, dataset, views)
    key = chosen[0].join_key
    missing = [c for c in (key, "event_timestamp") if c not in entity_df.columns]
    if missing:
        raise PublishError(f"entity_df needs the column(s) {', '.join(missing)}")
    df = entity_df.copy()
    df[key] = df[key].astype("int64" if user_type == "INT64" else str)
    df["event_timestamp"] = pd.to_datetime(df["event_timestamp"], utc=True)
    df["__llm4es_row"] = range(len(df))
    if online_store is None:
        online_store = next((s for s in ONLINE_STORES if _registry_exists(home, s)), "sqlite")
    store = get_store(home, online_store)
    try:
        with _quiet():
            out = store.get_historical_features(entity_df=df, features=_refs(chosen), full_feature_names=True).to_df()
    finally:
        _release_offline_connection()
    out = out.sort_values("__llm4es_row").drop(columns="__llm4es_row").reset_index(drop=True)
    for col in _vector_columns(chosen):
        out[col] = _as_vectors(out[col].tolist())
    return out[[*entity_df.columns, *(f"{v.name}__{f}" for v in chosen for f in v.features)]]


def online_features(home: Home, dataset: str, views: Sequence[str], ids: Sequence, online_store: str = "sqlite",
                    redis_url: str | None = None) -> "pd.DataFrame":
    """The materialized (latest) features of these users (or sessions, for session-keyed views): the key column
    (`user_id` or `session_id`) then `<view>__<feature>` columns, in `ids` order; vectors as float32 numpy
    arrays (None where the store has nothing)."""
    import pandas as pd

    chosen, user_type = _resolve_views(home, dataset, views)
    key = chosen[0].join_key
    ids = [int(u) for u in ids] if user_type == "INT64" else [str(u) for u in ids]
    store = get_store(home, online_store, redis_url)
    with _quiet():
        result = store.get_online_features(features=_refs(chosen), entity_rows=[{key: u} for u in ids],
                                           full_feature_names=True).to_dict()
    out = pd.DataFrame({key: ids})
    vectors = set(_vector_columns(chosen))
    for v in chosen:
        for f in v.features:
            col = f"{v.name}__{f}"
            out[col] = _as_vectors(result[col]) if col in vectors else result[col]
    return out
