"""Great Expectations suites run on in-memory pandas frames, with one GX context per process.

The gates of a refresh (`validation.snapshot_gate`, `validation.aggregate_gate`) and the sessions checks
(`validation.run.check_sessions`) validate small frames: GX's own bookkeeping, not the data, is their cost.
So the context, its pandas source and one dataframe asset are made once per process (the frame is a
batch parameter of every run, whatever its shape), a suite is built in memory per run rather than
registered, and a run first asks GX for counts only (BASIC results): only when an expectation failed or
saw an unexpected value is the frame validated again with the caller's result format, whose failing values
and row keys the reports show. The results are then exactly those of one run with that format; when all
is clean they differ only in the empty lists of failing examples that BASIC leaves out.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterable

import pandas as pd

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no network here, and none wanted


def validate_frame(batch: str, frame: pd.DataFrame, expectations: Iterable[tuple[str, dict, dict]],
                   result_format: dict, parameters: dict[str, Any] | None = None) -> list:
    """GX's results (ExpectationValidationResult, each with its `meta`) of `expectations` on `frame`.

    `batch` names the suite (what the frame holds); `expectations`: (GX expectation class name,
    its kwargs, its meta); `parameters`: values of the kwargs written as {"$PARAMETER": name}."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    definition = _batch_definition()  # first: a suite needs a context to exist
    suite = gx.ExpectationSuite(name=batch)
    for name, kwargs, meta in expectations:
        suite.add_expectation(getattr(gxe, name)(**kwargs, meta=meta))
    results = definition.get_batch(batch_parameters={"dataframe": frame}).validate(
        suite, result_format={**result_format, "result_format": "BASIC"}, expectation_parameters=parameters).results
    if all(er.success and not (er.result or {}).get("unexpected_count") for er in results):
        return results
    return definition.get_batch(batch_parameters={"dataframe": frame}).validate(
        suite, result_format=result_format, expectation_parameters=parameters).results


@functools.lru_cache(maxsize=1)
def _batch_definition():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # callers print their own progress
    asset = context.data_sources.add_pandas("frames").add_dataframe_asset("frame")
    return asset.add_batch_definition_whole_dataframe("all")
