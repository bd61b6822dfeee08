"""The quality gate on a feature snapshot (one vector per user) before it is served.

The checks are Great Expectations expectations, as in the data gate, on two small frames:
- `vectors`: one row per user: its vector's length, whether every value is finite, its norm
  -> the dimension is the expected one, no NaN/inf, user keys unique, norms within the range
  learned from the previous snapshot (its 0.1%..99.9% quantiles, widened by `norm_slack`)
- `figures`: one row of snapshot-wide figures
  -> share of the expected users present; drift against the previous snapshot: population
  stability index (PSI) of the norms and of `n_projections` fixed random projections (bins from
  the previous snapshot's deciles), and the mean cosine between old and new vectors of the users
  whose events did not change (the same model on the same events must give the same vector)

`check_snapshot` returns a report naming each check, its figure and its threshold, and raises
SnapshotGateError with that report when a check fails, unless the caller passes `force=True`.
Without a previous snapshot only the checks that need none run (dimension, finiteness, keys).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from producers.errors import Llm4esError
from producers.stores.warehouse import sql_ident

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

EXAMPLES = 5


class SnapshotGateError(Llm4esError, RuntimeError):
    """A feature snapshot failed its quality gate; `report` says which checks and why."""

    def __init__(self, report: "SnapshotReport"):
        super().__init__(report.message())
        self.report = report


@dataclass(frozen=True)
class SnapshotGateConfig:
    dim: int | None = None  # expected vector dimension; None: the previous snapshot's, else the most common
    norm_quantiles: tuple[float, float] = (0.001, 0.999)  # of the previous snapshot's norms
    norm_slack: float = 0.25  # the learned range is widened by this share of its ends
    norm_mostly: float = 0.99  # share of users whose norm must fall in the range
    min_share_present: float = 0.99  # of the expected users (default: the previous snapshot's)
    max_psi: float = 0.2  # population stability index; 0.1-0.25 is the usual "some shift" band
    n_projections: int = 4
    projection_seed: int = 0
    min_mean_cosine: float = 0.99  # unchanged users, old vs new vector
    bins: int = 10


@dataclass
class GateCheck:
    check: str  # what a person reads
    expectation: str  # the GX expectation that decided it
    success: bool
    figure: str  # what was measured
    threshold: str  # what it had to be
    examples: list[Any] = field(default_factory=list)  # failing users (or values)


@dataclass
class SnapshotReport:
    success: bool
    forced: bool
    checks: list[GateCheck]
    n_users: int
    dim: int | None
    noun: str = "users"  # what a row is: a session gate counts sessions

    @property
    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.success]

    def message(self) -> str:
        head = (f"feature snapshot of {self.n_users:,} {self.noun}: " +
                ("all checks passed" if self.success else f"{len(self.failed)} of {len(self.checks)} checks failed"
                 + (" (published anyway: forced)" if self.forced else "; it must not be published")))
        lines = [head]
        for c in self.checks:
            mark = "ok  " if c.success else "FAIL"
            ex = f"; e.g. {', '.join(map(str, c.examples[:EXAMPLES]))}" if c.examples and not c.success else ""
            lines.append(f"  {mark} {c.check}: {c.figure} (threshold: {c.threshold}){ex}")
        if not self.success and not self.forced:
            lines.append("Fix the producer, or pass force=True (--force) to publish it anyway.")
        return "\n".join(lines)


@dataclass
class Snapshot:
    """A snapshot as arrays: user keys, vector lengths, finiteness, norms, and the full-dimension rows."""
    users: np.ndarray
    lengths: np.ndarray
    finite: np.ndarray
    norms: np.ndarray
    values: np.ndarray  # float64, flattened
    offsets: np.ndarray

    def matrix(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(users, vectors) of the rows with `dim` finite values."""
        ok = np.flatnonzero((self.lengths == dim) & self.finite)
        if not len(ok):
            return self.users[ok], np.zeros((0, dim))
        idx = self.offsets[ok][:, None] + np.arange(dim)[None, :]
        return self.users[ok], self.values[idx]


def read_snapshot(data, user_column: str = "user_id", vector_column: str = "vector", con=None) -> Snapshot:
    """`data`: a pandas frame, an Arrow table, or (with `con`, a DuckDB connection) a table name or query."""
    if isinstance(data, str):
        if con is None:
            raise ValueError("a table name needs `con`, the DuckDB connection that holds it")
        sql = data if data.lstrip().lower().startswith(("select", "with", "from")) else f"SELECT * FROM {data}"
        data = con.sql(f"SELECT {sql_ident(user_column)}, {sql_ident(vector_column)} FROM ({sql})").to_arrow_table()
    if isinstance(data, pd.DataFrame):
        vectors = pa.array([None if v is None else np.asarray(v, dtype=np.float64) for v in data[vector_column]],
                           type=pa.list_(pa.float64()))
        users = data[user_column].to_numpy()
    else:
        table = data.combine_chunks() if isinstance(data, pa.Table) else data
        col = table.column(vector_column)
        vectors = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        users = table.column(user_column).to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(vectors.type):
        vectors = vectors.cast(pa.list_(vectors.type.value_type))
    if pa.types.is_large_list(vectors.type):
        vectors = vectors.cast(pa.list_(vectors.type.value_type))
    valid = np.asarray(vectors.is_valid(), dtype=bool)
    if vectors.null_count:  # a missing vector is an empty one (dimension 0, not finite)
        import pyarrow.compute as pc

        vectors = pc.if_else(vectors.is_valid(), vectors, pa.scalar([], vectors.type))
    lengths = np.asarray(vectors.value_lengths(), dtype=np.int64)
    raw_offsets = np.asarray(vectors.offsets, dtype=np.int64)
    offsets = raw_offsets[:-1] - raw_offsets[0]  # flatten() starts at the first row's values
    values = np.asarray(vectors.flatten().cast(pa.float64()).fill_null(np.nan), dtype=np.float64)
    # A trailing sentinel (0, finite) keeps every offset a valid reduceat index, empty last rows included.
    ext = np.append(values, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        sums = np.add.reduceat(ext * ext, offsets) if len(offsets) else np.zeros(0)
        fin = np.logical_and.reduceat(np.isfinite(ext), offsets) if len(offsets) else np.zeros(0, bool)
    sums = np.where(lengths > 0, sums, 0.0)
    finite = (lengths > 0) & fin & valid
    return Snapshot(users, lengths, finite, np.sqrt(sums), values, offsets)


def check_snapshot(snapshot, previous=None, config: SnapshotGateConfig = SnapshotGateConfig(), *,
                   unchanged_users: Iterable | None = None, expected_users: Iterable | None = None,
                   user_column: str = "user_id", vector_column: str = "vector", con=None,
                   force: bool = False, noun: str = "users") -> SnapshotReport:
    """Run the gate on `snapshot` (against `previous`, when given); raise SnapshotGateError on failure unless `force`.

    `unchanged_users`: users whose events did not change since `previous` (their vectors must not move);
    `expected_users`: who must be present (default: the previous snapshot's users; none: not checked).
    """
    new = snapshot if isinstance(snapshot, Snapshot) else read_snapshot(snapshot, user_column, vector_column, con)
    old = None
    if previous is not None:
        old = previous if isinstance(previous, Snapshot) else read_snapshot(previous, user_column, vector_column, con)
    dim = config.dim or _expected_dim(old) or _expected_dim(new)
    vectors, figures, expectations = _frames_and_expectations(new, old, dim, config, unchanged_users, expected_users)
    checks = _run_gx(vectors, figures, expectations)
    report = SnapshotReport(success=all(c.success for c in checks), forced=force, checks=checks,
                            n_users=len(new.users), dim=dim, noun=noun)
    if not report.success and not force:
        raise SnapshotGateError(report)
    return report


def _expected_dim(s: Snapshot | None) -> int | None:
    if s is None or not len(s.lengths):
        return None
    lengths, counts = np.unique(s.lengths[s.lengths > 0], return_counts=True)
    return int(lengths[np.argmax(counts)]) if len(lengths) else None


@dataclass
class _Expectation:
    batch: str  # "vectors" or "figures"
    expectation: str
    kwargs: dict
    check: str
    threshold: str
    figure_column: str | None = None  # figures batch: the column whose value is the figure
    examples: list = field(default_factory=list)  # shown when the check fails (e.g. missing users)
    when_missing: str = "n/a"  # the figure's text when it could not be measured (NaN): a failure


def _frames_and_expectations(new: Snapshot, old: Snapshot | None, dim: int | None, config: SnapshotGateConfig,
                             unchanged: Iterable | None, expected: Iterable | None):
    vectors = pd.DataFrame({"user_id": new.users, "dim": new.lengths, "finite": new.finite, "norm": new.norms})
    ex = [
        _Expectation("vectors", "ExpectColumnValuesToBeInSet", {"column": "dim", "value_set": [dim]},
                     "vector dimension", f"every vector has {dim} values"),
        _Expectation("vectors", "ExpectColumnValuesToBeInSet", {"column": "finite", "value_set": [True]},
                     "no NaN or infinite values", "every value finite"),
        _Expectation("vectors", "ExpectColumnValuesToBeUnique", {"column": "user_id"},
                     "one vector per user", "user keys unique"),
        _Expectation("vectors", "ExpectTableRowCountToBeBetween", {"min_value": 1},
                     "the snapshot holds users", "at least 1 user"),
    ]
    figures: dict[str, float] = {}
    if old is not None:
        ok_old = old.finite & (old.lengths == dim)
        lo, hi = np.quantile(old.norms[ok_old], config.norm_quantiles) if ok_old.any() else (0.0, 0.0)
        lo, hi = float(lo) * (1 - config.norm_slack), float(hi) * (1 + config.norm_slack)
        ex.append(_Expectation("vectors", "ExpectColumnValuesToBeBetween",
                               {"column": "norm", "min_value": lo, "max_value": hi, "mostly": config.norm_mostly},
                               "norms within the previous snapshot's range",
                               f"{config.norm_mostly:.0%} of norms in [{lo:.4g}, {hi:.4g}] (previous "
                               f"{config.norm_quantiles[0]:.1%}..{config.norm_quantiles[1]:.1%} quantiles "
                               f"± {config.norm_slack:.0%})"))
        ok_new = new.finite & (new.lengths == dim)
        figures["psi_norm"] = psi(old.norms[ok_old], new.norms[ok_new], config.bins)
        ex.append(_Expectation("figures", "ExpectColumnValuesToBeBetween",
                               {"column": "psi_norm", "max_value": config.max_psi},
                               "drift of the norms (PSI vs previous)", f"PSI <= {config.max_psi}", "psi_norm"))
        _, old_m = old.matrix(dim)
        _, new_m = new.matrix(dim)
        directions = projections(dim, config.n_projections, config.projection_seed)
        psis = [psi(old_m @ d, new_m @ d, config.bins) for d in directions]
        figures["psi_projection_max"] = max(psis) if psis else 0.0
        ex.append(_Expectation("figures", "ExpectColumnValuesToBeBetween",
                               {"column": "psi_projection_max", "max_value": config.max_psi},
                               f"drift of {config.n_projections} fixed random projections (largest PSI vs previous)",
                               f"PSI <= {config.max_psi}", "psi_projection_max"))
        if expected is None:
            expected = old.users
    if expected is not None:
        figures["share_present"], expectation = share_present(expected, new.users[new.lengths > 0],
                                                              config.min_share_present, "expected users")
        ex.append(expectation)
    if unchanged is not None and old is not None:
        cos, n = mean_cosine(old, new, dim, unchanged)
        figures["mean_cosine_unchanged"] = cos
        ex.append(_Expectation("figures", "ExpectColumnValuesToBeBetween",
                               {"column": "mean_cosine_unchanged", "min_value": config.min_mean_cosine},
                               f"unchanged users keep their vectors (mean cosine old vs new, {n:,} users)",
                               f">= {config.min_mean_cosine}", "mean_cosine_unchanged",
                               when_missing="no unchanged user is in both snapshots (check the user keys' type)"))
    return vectors, pd.DataFrame([figures]) if figures else None, ex


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10) -> float:
    """Population stability index of `actual` against `expected`, on `expected`'s quantile bins."""
    expected, actual = np.asarray(expected, float), np.asarray(actual, float)
    if not len(expected) or not len(actual):
        return float("nan")
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    e = np.bincount(np.searchsorted(edges, expected, side="right"), minlength=len(edges) + 1) / len(expected)
    a = np.bincount(np.searchsorted(edges, actual, side="right"), minlength=len(edges) + 1) / len(actual)
    e, a = np.clip(e, 1e-4, None), np.clip(a, 1e-4, None)  # an empty bin must not give an infinite index
    return float(np.sum((a - e) * np.log(a / e)))


def projections(dim: int, k: int, seed: int) -> np.ndarray:
    """`k` unit directions, fixed by `seed`, so two runs project on the same axes."""
    d = np.random.default_rng(seed).standard_normal((k, dim))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def mean_cosine(old: Snapshot, new: Snapshot, dim: int, users: Iterable) -> tuple[float, int]:
    """Mean cosine between each listed user's old and new vector (users in both snapshots), and how many."""
    wanted = {_plain(u) for u in users}
    ou, om = old.matrix(dim)
    nu, nm = new.matrix(dim)
    pos = {_plain(u): i for i, u in enumerate(ou) if _plain(u) in wanted}
    pairs = [(pos[_plain(u)], j) for j, u in enumerate(nu) if _plain(u) in pos]
    if not pairs:
        return float("nan"), 0
    i, j = map(np.asarray, zip(*pairs))
    a, b = om[i], nm[j]
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.divide(np.sum(a * b, axis=1), denom, out=np.zeros(len(i)), where=denom > 0)
    return float(cos.mean()), len(i)


def _run_gx(vectors: pd.DataFrame, figures: pd.DataFrame | None, expectations: list[_Expectation]) -> list[GateCheck]:
    return run_frames({"vectors": vectors, "figures": figures}, expectations, {"vectors": "user_id"})


def run_frames(frames: dict[str, pd.DataFrame | None], expectations: list[_Expectation],
               keys: dict[str, str], nouns: dict[str, str] | None = None) -> list[GateCheck]:
    """Each batch's expectations on its frame (one GX suite per batch; a batch without a frame is skipped).
    `keys`: per batch, the column that names a failing row (`user_id`); `nouns`: what a row is ("users")."""
    from validation.frames import validate_frame

    results: dict[int, GateCheck] = {}
    for batch, frame in frames.items():
        batch_ex = [(i, e) for i, e in enumerate(expectations) if e.batch == batch]
        if not batch_ex or frame is None:
            continue
        fmt = {"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES}
        if batch in keys:
            fmt["unexpected_index_column_names"] = [keys[batch]]
        out = validate_frame(f"snapshot.{batch}", frame, [(e.expectation, e.kwargs, {"index": i}) for i, e in batch_ex],
                             fmt)
        for er in out:
            i = er.expectation_config.meta["index"]
            results[i] = _gate_check(expectations[i], er, frame, keys.get(batch, "user_id"),
                                     (nouns or {}).get(batch, "users"))
    return [results[i] for i in sorted(results)]


def _gate_check(e: _Expectation, er, frame: pd.DataFrame, key: str = "user_id", noun: str = "users") -> GateCheck:
    r = er.result or {}
    raised = (er.exception_info or {}).get("raised_exception")
    if e.figure_column is not None:
        value = float(frame[e.figure_column].iloc[0])
        figure = f"{e.figure_column} = {value:.4g}" if not math.isnan(value) else f"{e.figure_column}: {e.when_missing}"
        # NaN (nothing to compare) cannot pass a bound
        return GateCheck(e.check, e.expectation, bool(er.success) and not math.isnan(value), figure, e.threshold,
                         list(e.examples))
    n = int(r.get("element_count") or len(frame))
    bad = int(r.get("unexpected_count") or 0)
    if raised:
        return GateCheck(e.check, e.expectation, False, f"could not run: {er.exception_info}", e.threshold)
    if e.expectation == "ExpectTableRowCountToBeBetween":
        return GateCheck(e.check, e.expectation, bool(er.success), f"{r.get('observed_value', n)} {noun}",
                         e.threshold)
    if e.expectation.startswith("ExpectTableColumns"):
        return GateCheck(e.check, e.expectation, bool(er.success), f"{len(frame.columns)} columns", e.threshold)
    figure = f"{bad:,} of {n:,} {noun} fail ({(bad / n if n else 0):.2%})"
    if e.kwargs.get("column") == "norm" and n:
        figure += f"; norms {frame['norm'].min():.4g}..{frame['norm'].max():.4g}"
    examples = []
    for row in r.get("partial_unexpected_index_list") or []:
        who = row.get(key)
        col = e.kwargs.get("column")
        value = frame.loc[frame[key] == who, col].iloc[0] if col in frame and col != key else None
        examples.append(f"{'user ' if key == 'user_id' else ''}{who}" +
                        (f" ({col} {_plain(value)})" if value is not None else ""))
    if not examples:
        examples = [str(_plain(v)) for v in r.get("partial_unexpected_list") or []]
    return GateCheck(e.check, e.expectation, bool(er.success), figure, e.threshold, examples)


def share_present(expected: Iterable, present: Iterable, min_share: float, who: str) -> tuple[float, _Expectation]:
    """The share of `expected` users found in `present`, and its expectation (examples name the missing)."""
    want = {_plain(u) for u in expected}
    have = {_plain(u) for u in present}
    share = len(want & have) / len(want) if want else 1.0
    missing = sorted(want - have, key=str)
    return share, _Expectation("figures", "ExpectColumnValuesToBeBetween",
                               {"column": "share_present", "min_value": min_share},
                               f"share of {who} present", f">= {min_share:.1%} of {len(want):,}", "share_present",
                               examples=[f"missing {u}" for u in missing[:EXAMPLES]])


def _plain(v):
    return v.item() if hasattr(v, "item") else v
