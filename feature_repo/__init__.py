"""The Feast feature repo of llm4es: `feature_store.yaml` (SQLite online store), `feature_store.redis.yaml`
(Redis) and `definitions.py` (declarations built from the manifest `llm4es publish` writes).

`producers.publish` copies these files to `<home>/feature_repo` when the home is not this checkout.
"""
