"""Later stages run only on data whose last validation passed."""
from __future__ import annotations

import duckdb

from producers.errors import Llm4esError
from producers.stores.warehouse import last_ingest, one, remembered, stored_definition, table_exists


class ValidationGateError(Llm4esError, RuntimeError):
    """The dataset has not passed validation since it was last ingested."""


def require_valid(con: duckdb.DuckDBPyConnection, dataset: str, force: bool = False) -> None:
    if force:
        return
    # within a hold (a refresh), checked once: validate and ingest forget it (warehouse.forget_dataset_state)
    def check() -> bool:
        _require_valid(con, dataset)  # raises when the gate is shut: nothing is remembered then
        return True

    remembered(con, ("valid", dataset), check)


def _require_valid(con: duckdb.DuckDBPyConnection, dataset: str) -> None:
    schema = stored_definition(con, dataset).schema
    ingest = last_ingest(con, schema)
    last = None
    if table_exists(con, schema, "validation_log"):
        last = one(con, f'SELECT run_id, ingest_id, success, n_failed, report FROM "{schema}".validation_log '
                   "ORDER BY started_at DESC LIMIT 1")
    if last is None:
        raise ValidationGateError(f"{dataset} has not been validated: run `llm4es validate {dataset}` "
                                  "(or pass --force to skip the gate)")
    run_id, ingest_id, success, n_failed, report = last
    if ingest and ingest_id != ingest["ingest_id"]:
        raise ValidationGateError(f"{dataset} was re-ingested after its last validation: run "
                                  f"`llm4es validate {dataset}` (or pass --force)")
    if not success:
        raise ValidationGateError(f"{dataset} failed its last validation ({n_failed} checks failed, see {report}); "
                                  "fix the data and re-ingest, or pass --force to run anyway")
