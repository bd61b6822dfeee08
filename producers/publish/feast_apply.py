"""Feast apply and materialize: the declarations onto a staged copy of a registry, swapped in whole."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from producers.publish.repo import repo_project
from producers.publish.snapshots import _connect, _sql_path, removed_keys_path
from producers.stores.locks import file_lock
from producers.stores.serving import (
    ONLINE_STORES,
    PublishError,
    _quiet,
    _registry_exists,
    _release_offline_connection,
    feast_dir,
    get_store,
    registry_path,
    repo_dir,
    store_yaml,
)
from producers.stores.warehouse import Home

if TYPE_CHECKING:
    import pyarrow as pa
    from feast import FeatureStore

    from producers.publish.flow import PublishConfig

Log = Callable[[str], None]


def _reached(phase: str) -> None:
    import producers.publish as package  # the kill tests replace `producers.publish._reached`

    package._reached(phase)


def _apply_all(home: Home, objects: dict[str, Any], pending: dict[str, datetime], config: PublishConfig,
               log: Log) -> tuple[bool, dict[str, set[str]]]:
    """Apply to the chosen online store's registry and, best effort, to the other stores' existing registries
    (so a store used before never serves data older than what was published). Whether every one was applied,
    and per applied store (the chosen one first) the views it served up to date before this apply
    (`_caught_up`)."""
    wanted = _wanted_fingerprint(objects)  # before an apply adds what Feast infers to the objects
    caught_up = {config.online_store: _apply(home, objects, pending, config.online_store, config.redis_url, log,
                                             wanted)}
    complete = True
    for other in ONLINE_STORES:
        if other == config.online_store or not _registry_exists(home, other):
            continue
        try:
            caught_up[other] = _apply(home, objects, pending, other, config.redis_url, log, wanted)
        except PublishError as e:
            complete = False
            log(f"warning: the {other} registry was not updated ({e.__cause__ or e}); its online store may serve "
                f"older features: publish again with online store {other} when it is reachable")
    return complete, caught_up


def _definition(proto) -> bytes:
    """A proto's bytes without any `meta` in it (creation and update times, materialization intervals, state):
    what it declares."""
    def strip(msg) -> None:
        for field, value in msg.ListFields():
            if field.name == "meta":
                msg.ClearField(field.name)
            elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
                for item in (value if field.is_repeated else [value]):
                    strip(item)

    proto = type(proto).FromString(proto.SerializeToString())
    strip(proto)
    return proto.SerializeToString(deterministic=True)


def _wanted_fingerprint(objects: dict[str, Any]) -> str:
    """A hash of the declarations as built (each object's proto), to know a registry already holds them."""
    h = hashlib.sha256()
    for name in sorted(objects):
        h.update(f"{type(objects[name]).__name__}\0{name}\0".encode())
        h.update(_definition(objects[name].to_proto()))
    return h.hexdigest()


def _registry_fingerprint(registry: Path) -> str:
    """A hash of what the registry file declares: every object's definition, in any order, without what
    materializations and applies stamp on them (their `meta`: intervals, state, update times)."""
    from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

    proto = RegistryProto.FromString(registry.read_bytes())
    h = hashlib.sha256()
    for field in proto.DESCRIPTOR.fields:
        if field.name in ("version_id", "last_updated") or field.message_type is None:
            continue
        items = list(getattr(proto, field.name)) if field.is_repeated else (
            [getattr(proto, field.name)] if proto.HasField(field.name) else [])
        blobs = [_definition(item) for item in items]
        h.update(f"{field.name}\0{len(blobs)}\0".encode())
        for blob in sorted(blobs):
            h.update(hashlib.sha256(blob).digest())
    return h.hexdigest()


def applied_path(registry: Path) -> Path:
    """Beside a registry: the fingerprints of the declarations last applied to it and of the registry that
    apply left, so a publish whose declarations are those, onto that registry, need not apply them again."""
    return registry.with_name(f"{registry.name}.applied.json")


def _already_applied(live: Path, key: str, objects: dict[str, Any]) -> bool:
    """Whether `live` holds exactly what applying these declarations (`key`: their fingerprint and the store's
    settings) made of it, and the apply would do nothing else (no online keys to clear).

    Every view's tags name its history file's hash (`data_version`): equal declarations read the very files
    that apply saw, so its rewinds (`_rewind`) still hold: rows it rewound for are either materialized since or
    still after the registry's intervals. A view without that tag is applied again."""
    from feast import FeatureView

    path = applied_path(live)
    if not live.is_file() or not path.is_file():
        return False
    try:
        recorded = json.loads(path.read_text())
    except ValueError:
        return False
    views = [o for o in objects.values() if isinstance(o, FeatureView)]
    if any(not v.tags.get("data_version") or removed_keys_path(Path(v.batch_source.path)).is_file() for v in views):
        return False
    return recorded == {"wanted": key, "registry": _registry_fingerprint(live)}


def _record_applied(live: Path, key: str) -> None:
    path = applied_path(live)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"wanted": key, "registry": _registry_fingerprint(live)}))
    os.replace(tmp, path)


def _registered_views(live: Path, project: str) -> dict[str, Any]:
    from feast import FeatureView
    from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

    proto = RegistryProto.FromString(live.read_bytes())
    return {v.spec.name: FeatureView.from_proto(v) for v in proto.feature_views if v.spec.project == project}


def _apply(home: Home, objects: dict[str, Any], pending: dict[str, datetime], online_store: str,
           redis_url: str | None, log: Log, wanted_fingerprint: str | None = None) -> set[str]:
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
    yaml_text = (repo_dir(home) / store_yaml(online_store)).read_text()  # the project, the online store
    key = hashlib.sha256(json.dumps([wanted_fingerprint or _wanted_fingerprint(objects), yaml_text,
                                     redis_url if online_store == "redis" else None]).encode()).hexdigest()
    if _already_applied(live, key, objects):
        log(f"feast apply ({online_store}): the registry already holds these {len(views)} views, not applied")
        project = repo_project(home)
        return _caught_up(_registered_views(live, project), views) if project else set()
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
            caught_up = _caught_up(registered, views)
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
        _record_applied(live, key)
        return caught_up
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


def _caught_up(registered: dict[str, Any], views: dict[str, Any]) -> set[str]:
    """The views whose online rows were, before this apply, the latest of every key of their history: still the
    same set and file, materialized up to at least the latest feature_timestamp the registry knew them to hold
    (its `feature_timestamp` tag). A publish that did not materialize rewound them below it (`_rewind`), so
    only these can take a refresh's rows straight into the online store (`_write_online`)."""
    out = set()
    for name, view in views.items():
        old = registered.get(name)
        if (old is None or not old.materialization_intervals or old.tags.get("set_id") != view.tags.get("set_id")
                or old.batch_source.path != view.batch_source.path or not old.tags.get("feature_timestamp")):
            continue
        latest = _aware(datetime.fromisoformat(old.tags["feature_timestamp"]))
        if _aware(max(end for _, end in old.materialization_intervals)) >= latest:
            out.add(name)
    return out


def _aware(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t


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
                 views: Sequence[str] | None, log: Log, direct: dict[str, "pa.Table"] | None = None,
                 idle: set[str] = frozenset()) -> None:
    """`direct` (a refresh): view -> the rows to write straight into the online store instead of materializing
    the view (`_write_online`); `idle`: views with nothing to materialize (up to date, no new rows)."""
    store = get_store(home, online_store, redis_url)
    end = end or datetime.now(timezone.utc)
    if online_store == "sqlite":
        _sqlite_wal(store)
    names = list(views) if views else [v.name for v in store.list_feature_views()]
    if direct is not None:
        names = _write_online(store, [n for n in names if n not in idle], direct, end, log, online_store)
        if not names:
            return
    log(f"materializing into {online_store} up to {end.isoformat(timespec='seconds')}")
    try:
        for name in names:
            with _stdout_to(log):
                store.materialize_incremental(end_date=end, feature_views=[name])
            _reached("materialize")
    finally:
        _release_offline_connection()


def _write_online(store: "FeatureStore", names: list[str], rows: dict[str, "pa.Table"], end: datetime,
                  log: Log, online_store: str) -> list[str]:
    """Write each view's `rows` (the latest row of every key this publish changed) into the online store and
    record the materialization up to `end` in the registry, as `materialize-incremental` would after reading
    the view's whole history: its other keys' rows are already served (`_caught_up`). The views left to
    materialize: those without rows here, or with rows after `end` (materialization would not serve them)."""
    from feast.utils import _utc_now

    naive_end = end.astimezone(timezone.utc).replace(tzinfo=None)  # the histories' timestamps are naive UTC
    chosen = {n: rows[n] for n in names
              if n in rows and all(t <= naive_end for t in rows[n].column("feature_timestamp").to_pylist())}
    if not chosen:
        return names
    # a refresh writes into every store the home serves: say which
    log(f"writing the changed keys' rows into the {online_store} online store: "
        f"{', '.join(f'{n} ({t.num_rows:,})' for n, t in sorted(chosen.items()))}")
    with _quiet():
        for name, table in sorted(chosen.items()):
            if table.num_rows:
                store.write_to_online_store(name, table.to_pandas())
        _reached("materialize")
        registry = store.registry
        for name in sorted(chosen):
            view = registry.get_feature_view(name, store.project, allow_cache=True)
            start = view.most_recent_end_time or (_utc_now() - view.ttl)
            registry.apply_materialization(view, store.project, _aware(start), _aware(end), commit=False)
        registry.commit()
    return [n for n in names if n not in chosen]


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
