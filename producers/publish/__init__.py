"""`llm4es publish DATASET`: the dataset's feature files into the Feast repo, and reads back through Feast.

Inputs: the Parquet copies of every registered feature output (`producers.stores.outputs.OUTPUTS`:
aggregates, CoLES and LLM4ES vectors, session embeddings, session intents, and any kind registered
later), found under `data/<schema>/` where the output's description puts them; each is skipped with a
message when absent, nothing at all is an error. Publish has no per-kind code: an output says how it is
served (`publish_as`: user snapshots, vector sets, or sessions with the rollups its producer defines).

What publish does, in this order (under a lock, so two publishes never interleave):

1. Adds each input as a snapshot to its set's history, the offline store Feast reads:
   `data/feast/<schema>/agg_features.parquet`, `.../coles/<set id>.parquet`, `.../llm4es/<set id>.parquet`,
   one row per user and `feature_timestamp` (the as-of time of the events the row was computed from).
   Snapshots accumulate; publishing rows with a `(user_id, feature_timestamp)` already held replaces
   those rows. Session outputs are served as views written afresh (`.../sessions/<view>.parquet`: the
   sessions and the user rollups), holding the current sessions only; a refresh's publish (`users`)
   computes the refreshed users' rows only and keeps every other user's as published.
   Every file is first written beside its target and renamed only when all are written.
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

The package, by job: `flow` (the publish flow), `snapshots` (histories), `manifest` (sets and views),
`repo` (the Feast repo folder and project), `feast_apply` (apply and materialize). Serving reads live in
`producers.stores.serving` (re-exported here), so training reads features without importing publish.
"""
from __future__ import annotations

from producers.publish.feast_apply import materialize
from producers.publish.flow import PublishConfig, PublishResult, publish
from producers.publish.repo import (
    PROJECT_ENV,
    TEMPLATES,
    default_project,
    ensure_repo,
    feast_project,
    package_repo_dir,
    repo_project,
)
from producers.publish.snapshots import removed_keys_path
from producers.stores.serving import (
    ONLINE_STORES,
    PublishError,
    ViewInfo,
    feast_dir,
    get_store,
    historical_features,
    manifest_path,
    online_features,
    published_views,
    registry_path,
    repo_dir,
    store_yaml,
)

__all__ = ["ONLINE_STORES", "PROJECT_ENV", "TEMPLATES", "PublishConfig", "PublishError", "PublishResult", "ViewInfo",
           "default_project", "ensure_repo", "feast_dir", "feast_project", "get_store", "historical_features",
           "manifest_path", "materialize", "online_features", "package_repo_dir", "publish", "published_views",
           "registry_path", "removed_keys_path", "repo_dir", "repo_project", "store_yaml"]


def _reached(phase: str) -> None:
    """A named point of the publish flow: `staging` (history files written, none renamed), `apply` (the new
    registry written beside the live one, not swapped in), `materialize` (after each view). Does nothing;
    the tests replace it to kill a publish at a known phase."""
