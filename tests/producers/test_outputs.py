"""The one write path of feature outputs: staged table + Parquet copy with provenance, swapped in together."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producers.stores.outputs import FeatureOutput, OutputError, read_output, read_provenance, write_output
from producers.stores.warehouse import Home, table_names

OUT = FeatureOutput(kind="toy", table="toy", entity="user", key="user_id", timestamp="feature_timestamp",
                    file="toy.parquet", scalars=(("score", "DOUBLE"),), companions=("toy_meta",))
SCHEMA = "shop"


def _write(home: Home, scores: list[float], fail: bool = False):
    def meta(con) -> None:
        con.execute(f"CREATE TABLE {OUT.staging_name(SCHEMA, 'toy_meta')} AS SELECT {len(scores)} AS n")
        if fail:
            raise RuntimeError("killed after staging")

    rows = pa.table({"user_id": pa.array([3, 1, 2][:len(scores)]), "score": pa.array(scores)})
    return write_output(home, OUT, SCHEMA, rows, "SELECT user_id, score FROM new_rows", {"run": len(scores)},
                        also=meta)


@pytest.fixture
def home(tmp_path) -> Home:
    home = Home.resolve(tmp_path)
    con = home.connect()
    con.execute(f"CREATE SCHEMA {SCHEMA}")
    con.close()
    return home


def test_table_meta_and_parquet_are_written_together_with_provenance(home):
    path = _write(home, [0.5, 1.5, 2.5])
    assert path == home.data_dir / SCHEMA / "toy.parquet"
    rows, provenance = read_output(path)
    assert rows.column("user_id").to_pylist() == [1, 2, 3]  # ordered by the output's key
    assert provenance == {"run": 3}
    con = home.connect(read_only=True)
    assert con.execute(f"SELECT count(*) FROM {SCHEMA}.toy").fetchone()[0] == 3
    assert con.execute(f"SELECT n FROM {SCHEMA}.toy_meta").fetchone()[0] == 3
    con.close()


def test_a_failure_after_staging_leaves_the_previous_table_and_file(home):
    path = _write(home, [0.5, 1.5])
    before = pq.read_table(path)
    with pytest.raises(RuntimeError, match="killed after staging"):
        _write(home, [9.0, 9.0, 9.0], fail=True)
    assert pq.read_table(path).equals(before) and read_provenance(path) == {"run": 2}
    con = home.connect(read_only=True)
    assert con.execute(f"SELECT count(*) FROM {SCHEMA}.toy").fetchone()[0] == 2
    assert [t for t in table_names(con, SCHEMA) if t.endswith("__staging")] == []
    con.close()
    assert [p.name for p in path.parent.iterdir()] == ["toy.parquet"]  # no temp file left


def test_a_file_without_provenance_is_named_in_the_error(home, tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"user_id": [1]}), plain)
    with pytest.raises(OutputError, match="plain.parquet holds no llm4es provenance"):
        read_provenance(plain)
    assert read_provenance(plain, missing_ok=True) == {}
