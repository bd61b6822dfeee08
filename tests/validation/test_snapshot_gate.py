"""The feature-snapshot gate stops a NaN, a wrong dimension and a drifted space, with a readable message."""
from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from producers.stores.warehouse import float32_lists
from validation.snapshot_gate import SnapshotGateError, check_snapshot, psi, read_snapshot

N, DIM = 400, 16


def vectors(seed: int = 0, n: int = N, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Anisotropic, as embeddings are: a random projection sees the space's shape.
    return rng.standard_normal((n, dim)) * np.linspace(3.0, 0.3, dim) + 0.5


def table(matrix: np.ndarray, users=None) -> pa.Table:
    users = list(range(len(matrix))) if users is None else users
    return pa.table({"user_id": users, "vector": float32_lists(matrix)})


def refreshed(old: np.ndarray, changed: list[int], seed: int = 1) -> np.ndarray:
    """The next snapshot: changed users get a new vector from the same distribution, the rest keep theirs."""
    new = old.copy()
    new[changed] = vectors(seed, n=len(changed))
    return new


def test_a_clean_refresh_passes():
    old = vectors()
    changed = list(range(0, N, 25))
    unchanged = sorted(set(range(N)) - set(changed))
    report = check_snapshot(table(refreshed(old, changed)), table(old), unchanged_users=unchanged)
    assert report.success and not report.failed
    names = {c.check.split(" (")[0] for c in report.checks}
    assert {"vector dimension", "no NaN or infinite values", "norms within the previous snapshot's range",
            "share of expected users present", "drift of the norms"} <= names
    assert "all checks passed" in report.message()
    # A new draw of the whole population (a full re-embed of changed data) does not drift either.
    assert check_snapshot(table(vectors(seed=7)), table(old)).success


def test_a_planted_nan_is_stopped_and_named():
    old = vectors()
    new = old.copy()
    new[17, 3] = np.nan
    new[42, 0] = np.inf
    with pytest.raises(SnapshotGateError) as e:
        check_snapshot(table(new), table(old), unchanged_users=range(N))
    msg = str(e.value)
    assert "FAIL no NaN or infinite values: 2 of 400 users fail (0.50%) (threshold: every value finite)" in msg
    assert "user 17" in msg and "user 42" in msg and "must not be published" in msg
    assert [c.check for c in e.value.report.failed] == ["no NaN or infinite values"]


def test_a_wrong_dimension_is_stopped():
    old = vectors()
    with pytest.raises(SnapshotGateError, match=r"FAIL vector dimension: 400 of 400 users fail .*every vector has 16"):
        check_snapshot(table(vectors(dim=DIM + 1)), table(old))
    # Without a previous snapshot the expected dimension is given, or the most common one.
    mixed = pd.DataFrame({"user_id": [1, 2, 3], "vector": [[0.1] * 4, [0.2] * 4, [0.3] * 5]})
    with pytest.raises(SnapshotGateError, match=r"vector dimension: 1 of 3 users fail.*e\.g\. user 3 \(dim 5\)"):
        check_snapshot(mixed)
    with pytest.raises(SnapshotGateError, match="every vector has 8 values"):
        check_snapshot(mixed.iloc[:2], config=__import__("validation.snapshot_gate").snapshot_gate
                       .SnapshotGateConfig(dim=8))


def test_a_rotated_space_is_stopped_by_projections_and_unchanged_cosines():
    old = vectors()
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((DIM, DIM)))
    rotated = old @ q  # same norms, another space: what a different checkpoint gives
    with pytest.raises(SnapshotGateError) as e:
        check_snapshot(table(rotated), table(old), unchanged_users=range(N))
    failed = {c.check.split(" (")[0]: c for c in e.value.report.failed}
    assert "norms within the previous snapshot's range" not in failed and "drift of the norms" not in failed
    assert "drift of 4 fixed random projections" in failed
    cos = failed["unchanged users keep their vectors"]
    assert cos.figure.startswith("mean_cosine_unchanged = ") and float(cos.figure.split("= ")[1]) < 0.5
    assert cos.threshold == ">= 0.99"


def test_a_rescaled_space_is_stopped_by_norms():
    old = vectors()
    with pytest.raises(SnapshotGateError) as e:
        check_snapshot(table(old * 3), table(old))
    failed = {c.check.split(" (")[0] for c in e.value.report.failed}
    assert {"norms within the previous snapshot's range", "drift of the norms"} <= failed
    assert "norms within the previous snapshot's range" in str(e.value) and "PSI <= 0.2" in str(e.value)


def test_missing_users_and_force():
    old = vectors()
    kept = list(range(0, N - 40))
    with pytest.raises(SnapshotGateError, match=r"share_present = 0.9 .*>= 99.0% of 400.*missing 360"):
        check_snapshot(table(old[kept], kept), table(old))
    report = check_snapshot(table(old[kept], kept), table(old), force=True)
    assert not report.success and report.forced and "published anyway: forced" in report.message()
    # An incremental snapshot is checked against the users it was meant to hold.
    assert check_snapshot(table(old[kept], kept), table(old), expected_users=kept).success


def test_reads_duckdb_tables_and_null_vectors():
    con = duckdb.connect()
    con.register("snap", table(vectors()))
    con.execute("CREATE TABLE s AS SELECT user_id, vector FROM snap")
    con.execute("UPDATE s SET vector = NULL WHERE user_id = 5")
    s = read_snapshot("s", con=con)
    row = {int(u): i for i, u in enumerate(s.users)}  # an UPDATE may move the row
    assert s.lengths[row[5]] == 0 and not s.finite[row[5]] and s.finite.sum() == N - 1
    np.testing.assert_allclose(s.norms[row[6]], np.linalg.norm(vectors()[6].astype(np.float32)), rtol=1e-5)
    with pytest.raises(SnapshotGateError, match="user 5"):
        check_snapshot("s", con=con)


def test_psi_is_zero_for_the_same_sample_and_large_for_a_shift():
    x = np.random.default_rng(0).standard_normal(5000)
    assert psi(x, x) == pytest.approx(0.0, abs=1e-9)
    assert psi(x, x + 1.0) > 0.5


def test_an_empty_snapshot_and_unmatched_unchanged_users_fail():
    empty = pa.table({"user_id": pa.array([], pa.int64()), "vector": pa.array([], pa.list_(pa.float32()))})
    with pytest.raises(SnapshotGateError, match=r"FAIL the snapshot holds users: 0 users"):
        check_snapshot(empty)
    old = vectors()
    # user keys as text in one snapshot and numbers in the other: the check cannot silently pass
    with pytest.raises(SnapshotGateError, match="no unchanged user is in both snapshots"):
        check_snapshot(table(old), table(old), unchanged_users=[str(u) for u in range(N)])
