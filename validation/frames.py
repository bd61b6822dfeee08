"""Great Expectations suites run on in-memory pandas frames, with one GX context per process.

The gates of a refresh (`validation.snapshot_gate`, `validation.aggregate_gate`) and the sessions checks
(`validation.run.check_sessions`) validate small frames: GX's own bookkeeping, not the data, is their cost.
So:
- the context, its pandas source and one dataframe asset are made once per process (the frame is a batch
  parameter of every run, whatever its shape);
- a suite is built in memory once per process for each list of expectations (not registered), and reused;
- a run first asks GX for counts only (BASIC results): only when an expectation failed or saw an unexpected
  value is the frame validated again with the caller's result format, whose failing values and row keys the
  reports show. The results are then exactly those of one run with that format; when all is clean they
  differ only in the empty lists of failing examples that BASIC leaves out;
- while GX validates, an expectation's `configuration` is built once per expectation object instead of at
  every read (see `_memo_configurations`): GX 1.x rebuilds it from the pydantic model a hundred times per
  expectation and run, about 40% of a small frame's validation.
"""
from __future__ import annotations

import contextlib
import contextvars
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
    definition = _batch_definition()  # first: a suite needs a context to exist
    suite = _suite(batch, list(expectations))
    data = definition.get_batch(batch_parameters={"dataframe": frame})
    with _memo_configurations():
        results = data.validate(suite, result_format={**result_format, "result_format": "BASIC"},
                                expectation_parameters=parameters).results
    if all(er.success and not (er.result or {}).get("unexpected_count") for er in results):
        return results
    with _memo_configurations():
        return data.validate(suite, result_format=result_format, expectation_parameters=parameters).results


@functools.lru_cache(maxsize=1)
def _batch_definition():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # callers print their own progress
    asset = context.data_sources.add_pandas("frames").add_dataframe_asset("frame")
    return asset.add_batch_definition_whole_dataframe("all")


_SUITES: dict[str, Any] = {}
MAX_SUITES = 64


def _suite(batch: str, expectations: list[tuple[str, dict, dict]]):
    """The GX suite of these expectations, built once per process and reused (validating only reads it).

    Keyed by the batch and the expectations' repr, which holds every name, kwarg and meta: the session
    checks and the gates' fixed checks are built once; a gate whose thresholds come from the data (the norm
    range) gets a new suite when they move. At most `MAX_SUITES` are kept (the oldest go first)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    key = repr((batch, expectations))
    if key not in _SUITES:
        suite = gx.ExpectationSuite(name=batch)
        for name, kwargs, meta in expectations:
            suite.add_expectation(getattr(gxe, name)(**kwargs, meta=meta))
        while len(_SUITES) >= MAX_SUITES:
            del _SUITES[next(iter(_SUITES))]
        _SUITES[key] = suite
    return _SUITES[key]


_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("gx_configuration_memo", default=None)


@contextlib.contextmanager
def _memo_configurations():
    """Within this block (one validation of a frame), each GX expectation object builds its `configuration` once.

    GX's `Expectation.configuration` is a property that rebuilds an ExpectationConfiguration from the
    pydantic model at every read, and GX reads it for every kwarg of every metric it plans. Within one
    validation the expectation objects do not change (GX makes them from configurations and only reads
    them), so the first result stands for the later reads. Outside such a block (data docs, any other GX
    use in the process) the property behaves as GX wrote it: the memo lives in a context variable that is
    unset there."""
    _install_memo()
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


@functools.lru_cache(maxsize=1)
def _install_memo() -> bool:
    from great_expectations.expectations.expectation import Expectation

    built = getattr(Expectation.__dict__.get("configuration"), "fget", None)
    if built is None:  # another GX layout: leave it alone (slower, never wrong)
        return False

    def configuration(self):
        memo = _MEMO.get()
        if memo is None:
            return built(self)
        hit = memo.get(id(self))
        if hit is None or hit[0] is not self:  # the object is kept, so its id cannot be reused meanwhile
            hit = memo[id(self)] = (self, built(self))
        return hit[1]

    configuration.__doc__ = built.__doc__
    Expectation.configuration = property(configuration)
    return True
