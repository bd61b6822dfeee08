"""Feast declarations for every dataset `llm4es publish` has published: plain data, no pipeline code.

The declarations come from the manifest that `llm4es publish` writes: `<home>/data/feast/manifest.json`,
found relative to this file (the repo is `<home>/feature_repo`), so the same file serves the checkout
(home = checkout root) and any other home (publish copies the repo there). Per dataset (schema `s`):

- entity `s__user`, join key `user_id` (INT64 or STRING, as the dataset's user ids);
- `s__agg_features`: the aggregate features (one Float64/Int64 field per numeric column);
- `s__coles_embedding`: the CoLES vectors (`vector`, Array(Float32) of `vector_length` = dim);
- `s__llm4es_embedding`: the default LLM4ES embeddings set (the most recently produced one unless
  publish was told otherwise), and `s__llm4es__<set>` for each other set (other epochs of a
  fine-tuning run, the base model, other text kinds), so a downstream step can compare them;
- entity `s__session`, join key `session_id`, and the session-keyed views `s__session_embedding`
  (`user_id`, `embedding`) and `s__session_intent` (`user_id`, `intent`, `intent_probabilities`,
  `taxonomy_version`), one row per session timestamped with its end; their user rollups
  `s__session_embedding_rollup` (last session's embedding, mean over the last K sessions) and
  `s__intent_shares` (share of each intent over the last K sessions), one row per user and session end;
- a view for any other output kind registered with `producers.stores.outputs.register` (built from the
  manifest like the rest: nothing here names a kind).

Every view reads one Parquet file under `data/feast/<schema>/` holding all published snapshots of
its set (one row per user and `feature_timestamp`, the as-of time of the events the row was
computed from); its `ttl` is a century, i.e. rows never expire: a point-in-time join returns the
latest snapshot at or before the entity's timestamp, however old, and never a later one.
Provenance (model, checkpoint, epoch, layers, text kind, data and code version, produced_at) is in
each view's tags and description.

Imported as part of the llm4es package (`feature_repo.definitions`, by `producers.publish`) this
module only offers `build()`; loaded by Feast as a repo file it declares the objects as module
globals, which is how `feast apply` finds them. Only the standard library and Feast are imported,
so a copy of the repo works wherever Feast is installed.
"""
from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Float32, Float64, Int32, Int64, String

MANIFEST_FORMAT = 1
# "No expiry": Feast's own ttl=0 means no limit in point-in-time joins, but makes the first
# `materialize-incremental` start one year before now, which skips snapshots of older data
# (MovieLens is from 1998). A century keeps every snapshot valid and materializable.
NO_EXPIRY = timedelta(days=36_500)
TIMESTAMP_FIELD = "feature_timestamp"
CREATED_FIELD = "produced_at"
JOIN_KEY = "user_id"
SESSION_KEY = "session_id"  # session-keyed views (`s__session_embedding`, `s__session_intent`)

_DTYPES = {"Float64": Float64, "Float32": Float32, "Int64": Int64, "Int32": Int32, "String": String,
           "Array(Float32)": Array(Float32)}
_ENTITY_TYPES = {"INT64": (ValueType.INT64, Int64), "STRING": (ValueType.STRING, String)}


def manifest_path(repo_dir: Path) -> Path:
    """`<home>/data/feast/manifest.json` for the repo `<home>/feature_repo`."""
    return repo_dir.resolve().parent / "data" / "feast" / "manifest.json"


def load_manifest(path: Path) -> dict:
    """The manifest, or an empty one when nothing was published yet."""
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "datasets": {}}
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: manifest format {manifest.get('format')!r}, this repo reads {MANIFEST_FORMAT}; "
                         "publish again with this version of llm4es")
    return manifest


def build(manifest: dict, feast_dir: Path) -> dict[str, Any]:
    """Entities, sources and feature views by name; Parquet paths in the manifest are relative to `feast_dir`."""
    objects: dict[str, Any] = {}
    for dataset, entry in sorted(manifest.get("datasets", {}).items()):
        value_type, entity_dtype = _ENTITY_TYPES[entry["user_id_type"]]
        entity = Entity(name=entry["entity"], join_keys=[JOIN_KEY], value_type=value_type,
                        description=f"a user of the {dataset} dataset", tags={"dataset": dataset})
        objects[entity.name] = entity
        session = None
        if any(v.get("entity") == "session" for v in entry["views"]):
            session = Entity(name=entry["session_entity"], join_keys=[SESSION_KEY], value_type=ValueType.STRING,
                             description=f"a session of the {dataset} dataset", tags={"dataset": dataset})
            objects[session.name] = session
        for view in entry["views"]:
            keyed_by_session = view.get("entity") == "session"
            source = FileSource(
                name=f"{view['name']}__source",
                # absolute: the DuckDB offline store reads the path as is, relative to the working directory
                path=str((feast_dir / view["source"]).resolve()),
                timestamp_field=TIMESTAMP_FIELD,
                created_timestamp_column=CREATED_FIELD,
                description=f"every published snapshot of {view['name']}",
            )
            fields = [Field(name=SESSION_KEY, dtype=String) if keyed_by_session
                      else Field(name=JOIN_KEY, dtype=entity_dtype)]
            for f in view["features"]:
                fields.append(Field(name=f["name"], dtype=_DTYPES[f["dtype"]], vector_length=f.get("vector_length", 0)))
            objects[source.name] = source
            objects[view["name"]] = FeatureView(
                name=view["name"], entities=[session if keyed_by_session else entity], ttl=NO_EXPIRY, schema=fields,
                source=source, online=True, description=view["description"], tags=dict(view["tags"]), owner="llm4es")
    return objects


if __name__ != "feature_repo.definitions":  # loaded by Feast as a repo file: declare
    _REPO = Path(__file__).resolve().parent
    _MANIFEST = manifest_path(_REPO)
    globals().update(build(load_manifest(_MANIFEST), _MANIFEST.parent))
