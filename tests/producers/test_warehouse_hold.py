"""`Home.hold()`: one warehouse connection shared by every `Home.connect` inside the block."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import pytest

from producers.stores.warehouse import Home, WarehouseError, WarehouseLockedError, transaction
from tests.fixtures.spies import record_connects

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def counted(monkeypatch):
    """The warehouse paths `duckdb.connect` is asked to open, in order."""
    return record_connects(monkeypatch)


def make(home: Home) -> None:
    con = home.connect()
    try:
        con.execute("CREATE TABLE t AS SELECT 1 AS x")
    finally:
        con.close()


def test_connections_inside_a_hold_are_cursors_of_one_opened_once(tmp_path, counted):
    home = Home.resolve(tmp_path / "home")
    make(home)
    counted.clear()
    other = Home(tmp_path / "home" / "data" / "..")  # another Home object, another spelling, the same warehouse
    with home.hold():
        assert counted == []  # opened at the first use, not before
        for h, read_only in ((home, True), (other, False), (home, False), (other, True)):
            con = h.connect(read_only=read_only)
            con.execute("INSERT INTO t VALUES (2)")  # a read_only cursor can write: see Home.hold
            con.close()  # a cursor: the database stays open
        with other.hold():  # nested
            con = home.connect()
            assert con.execute("SELECT count(*) FROM t").fetchall() == [(5,)]
            con.close()
        con = home.connect(read_only=True)  # the inner hold's end closed nothing
        assert con.execute("SELECT count(*) FROM t").fetchall() == [(5,)]
        con.close()
    assert counted == [str(home.warehouse_path)]
    # the hold's end closed the connection: the same process can open the file read-only again
    con = duckdb.connect(str(home.warehouse_path), read_only=True)
    assert con.execute("SELECT count(*) FROM t").fetchall() == [(5,)]
    con.close()


def test_worker_threads_inside_a_hold_get_their_own_cursors(tmp_path, counted):
    home = Home.resolve(tmp_path / "home")
    make(home)
    counted.clear()
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            con = home.connect()
            try:
                for _ in range(20):
                    con.execute("INSERT INTO t VALUES (?)", [k])
            finally:
                con.close()
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    with home.hold():
        threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        con = home.connect(read_only=True)
        assert con.execute("SELECT count(*) FROM t").fetchall() == [(1 + 6 * 20,)]
        con.close()
    assert errors == [] and counted == [str(home.warehouse_path)]


def test_a_block_killed_inside_a_transaction_leaves_the_table_as_it_was_and_closes(tmp_path):
    home = Home.resolve(tmp_path / "home")
    make(home)

    class Killed(BaseException):
        pass

    with pytest.raises(Killed), home.hold():
        con = home.connect()
        with transaction(con):
            con.execute("INSERT INTO t VALUES (2)")
            raise Killed()
    con = duckdb.connect(str(home.warehouse_path), read_only=True)  # closed: openable with another configuration
    assert con.execute("SELECT x FROM t").fetchall() == [(1,)]
    con.close()


def test_inside_a_hold_read_only_without_a_warehouse_is_still_refused(tmp_path):
    home = Home.resolve(tmp_path / "home")
    with home.hold(), pytest.raises(WarehouseError, match="no warehouse at .*run `llm4es ingest` first"):
        home.connect(read_only=True)
    assert not home.warehouse_path.exists()


HOLD = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("holding", flush=True)
time.sleep(120)
"""


def test_a_hold_on_a_warehouse_another_process_writes_names_that_process(tmp_path):
    home = Home.resolve(tmp_path / "home")
    make(home)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(home.warehouse_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with home.hold(), pytest.raises(WarehouseLockedError, match=f"process {holder.pid}.*try again"):
            home.connect(read_only=True)
    finally:
        holder.kill()
        holder.wait()
    with home.hold():  # the failed open left no hold behind: the next one opens the file
        con = home.connect(read_only=True)
        assert con.execute("SELECT x FROM t").fetchall() == [(1,)]
        con.close()


HOLDING_REFRESH = """
import sys, time
from producers.stores.warehouse import Home
home = Home.resolve(sys.argv[1])
with home.hold():
    con = home.connect()
    con.execute("INSERT INTO t VALUES (2)")
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    con.execute("INSERT INTO t VALUES (3)")
    con.close()
"""


def test_a_hold_waits_for_another_processs_hold_instead_of_failing(tmp_path):
    """Two refreshes of one warehouse (say two datasets' cron jobs): the second queues behind the first."""
    home = Home.resolve(tmp_path / "home")
    make(home)
    holder = subprocess.Popen([sys.executable, "-c", HOLDING_REFRESH, str(home.root), "1.5"], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "holding"
        with home.hold():
            con = home.connect(read_only=True)
            seen = con.execute("SELECT x FROM t ORDER BY x").fetchall()
            con.close()
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
        holder.wait()
    assert seen == [(1,), (2,), (3,)]  # opened only after the other hold had written and closed


def test_inside_a_hold_the_gate_is_read_once_and_ingest_append_and_validate_are_seen(tmp_path, monkeypatch):
    """The stored definition, last ingest and data-gate verdict are remembered within a hold (every stage
    of a refresh reads them first), and forgotten by the commands that change them."""
    import validation.gate as gate
    from producers.datasets.definition import load_builtin
    from producers.ingest import IngestConfig, ingest
    from producers.ingest.append import append
    from producers.stores.warehouse import last_ingest, stored_definition
    from tests.fixtures.movielens_files import write_grouplens
    from tests.producers.test_append import new_ratings, write_delta
    from validation.run import ValidateConfig, validate

    ml = load_builtin("movielens-100k")
    home = Home.resolve(tmp_path / "home")
    source = write_grouplens(tmp_path / "ml-100k")
    checked = []
    real = gate._require_valid
    monkeypatch.setattr(gate, "_require_valid", lambda con, dataset: checked.append(dataset) or real(con, dataset))
    with home.hold():
        ingest(home, ml, IngestConfig(source=source))
        con = home.connect(read_only=True)
        with pytest.raises(gate.ValidationGateError, match="has not been validated"):
            gate.require_valid(con, ml.name)
        assert validate(home, ml.name, ValidateConfig(data_docs=False)).success
        gate.require_valid(con, ml.name)
        gate.require_valid(home.connect(read_only=True), ml.name)  # another cursor of the hold: remembered
        assert checked == [ml.name, ml.name]
        first = last_ingest(con, ml.schema)["ingest_id"]
        last_ingest(con, ml.schema)["ingest_id"] = "changed by the caller"  # the caller's own copy
        assert last_ingest(con, ml.schema)["ingest_id"] == first
        assert stored_definition(con, ml.name) is not stored_definition(con, ml.name)  # each its own object
        append(home, ml, IngestConfig(write_delta(tmp_path / "delta", new_ratings(source, [2]))))
        assert last_ingest(con, ml.schema)["ingest_id"] != first
        with pytest.raises(gate.ValidationGateError, match="re-ingested after its last validation"):
            gate.require_valid(con, ml.name)
        con.close()
    checked.clear()
    con = home.connect(read_only=True)  # no hold: nothing remembered
    for _ in range(2):
        with pytest.raises(gate.ValidationGateError, match="re-ingested"):
            gate.require_valid(con, ml.name)
    con.close()
    assert checked == [ml.name, ml.name]
