"""Reads of the published features: the manifest's views, point-in-time (offline) and online features.

The stores-layer half of the Feast repo: `producers.publish` writes the history files, the manifest
(`data/feast/manifest.json`) and the registries; this module only reads them, so training and
evaluation read features without importing publish. Feast is imported lazily.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from producers.datasets.definition import schema_name
from producers.errors import Llm4esError
from producers.stores.warehouse import Home

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureStore


ONLINE_STORES = {"sqlite": "feature_store.yaml", "redis": "feature_store.redis.yaml"}


MANIFEST_FORMAT = 1


class PublishError(Llm4esError, ValueError):
    """Nothing to publish, inputs that do not fit, or a Feast repo that cannot take them."""


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


def feast_dir(home: Home) -> Path:
    return home.data_dir / "feast"


def manifest_path(home: Home) -> Path:
    return feast_dir(home) / "manifest.json"


def repo_dir(home: Home) -> Path:
    return home.root / "feature_repo"


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


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Feast's own prints and its dependencies' deprecation warnings are not ours to show."""
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _release_offline_connection() -> None:
    """Drop the DuckDB connection ibis keeps as its default backend after Feast's offline reads.

    Left alive, it is torn down during interpreter exit in the wrong order and DuckDB's bindings
    print dozens of "nanobind: leaked instance" lines after every command. Closed here rather than
    collected: a full `gc.collect()` cost 0.2-0.4 s in a process holding torch, whatever the data size
    (most of a refresh's publish).
    """
    import sys

    ibis = sys.modules.get("ibis")
    if ibis is not None:
        backend = ibis.options.default_backend
        ibis.options.default_backend = None
        if backend is not None:
            backend.disconnect()


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


def published_views(home: Home, dataset: str) -> list[ViewInfo]:
    """The dataset's published views (empty when nothing was published), defaults first within a kind."""
    manifest = _read_manifest(manifest_path(home))
    entry = manifest.get("datasets", {}).get(dataset)
    if not entry:
        return []
    return _views_of(dataset, entry, feast_dir(home))


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
    if key == "session_id":
        entity = "STRING"
    else:
        entity = _read_manifest(manifest_path(home))["datasets"][dataset]["user_id_type"]
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


def _home(home: Home | str | Path) -> Home:
    """A downstream caller's home as a folder works too (`historical_features("/srv/llm4es", ...)`): a Path
    failed deep inside with "'PosixPath' object has no attribute 'data_dir'"."""
    return home if isinstance(home, Home) else Home.resolve(home)


def historical_features(home: Home | str | Path, dataset: str, views: Sequence[str], entity_df: "pd.DataFrame",
                        online_store: str | None = None) -> "pd.DataFrame":
    """Point-in-time features: for each (user_id, event_timestamp) row, each view's latest snapshot at or
    before event_timestamp (none: missing); session-keyed views take (session_id, event_timestamp) rows.
    Rows in `entity_df`'s order, its columns first, then one column per feature named `<view>__<feature>`;
    vectors as float32 numpy arrays (None where missing).
    `views` are full view names or the part after `<schema>__` (`llm4es_embedding`, `agg_features`).
    The offline store is the same for every online store; `online_store` only picks whose registry to
    read (default: the first applied one, SQLite's before Redis')."""
    import pandas as pd

    home = _home(home)
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


def online_features(home: Home | str | Path, dataset: str, views: Sequence[str], ids: Sequence,
                    online_store: str = "sqlite", redis_url: str | None = None) -> "pd.DataFrame":
    """The materialized (latest) features of these users (or sessions, for session-keyed views): the key column
    (`user_id` or `session_id`) then `<view>__<feature>` columns, in `ids` order; vectors as float32 numpy
    arrays (None where the store has nothing)."""
    import pandas as pd

    home = _home(home)
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
