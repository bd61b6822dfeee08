"""The Feast feature repo of llm4es: the templates of `feature_store.yaml` (SQLite online store) and
`feature_store.redis.yaml` (Redis), `definitions.py` (declarations built from the manifest `llm4es publish`
writes) and `registry_store.py` (the registry written by atomic rename).

`producers.publish` writes the yaml files, with the home's Feast project, to `<home>/feature_repo`, and
copies the other files there when the home is not this checkout.
"""
