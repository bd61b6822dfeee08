"""Dataset names that share a warehouse schema are refused (issue 11, point 5); a warehouse held by another
process is a message, not a traceback (point 9)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

import producers.cli.printers
from producers.cli import cli
from producers.datasets.definition import parse_definition, schema_name
from producers.ingest import IngestConfig, ingest
from producers.stores.warehouse import Home, WarehouseError, stored_definition
from tests.producers.test_generic import write_shop


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch):
    monkeypatch.setattr(producers.cli.printers, "console", Console(highlight=False, width=250))
    monkeypatch.setattr(producers.cli.printers, "err_console", Console(stderr=True, highlight=False, width=250))


def _ingest_as(home: Home, folder: Path, name: str):
    text = (folder / "shop.yaml").read_text().replace("name: shop\n", f"name: '{name}'\n", 1)
    return ingest(home, parse_definition(text, f"{name}.yaml"), IngestConfig(source=folder, max_reject_share=0.2))


@pytest.mark.parametrize("first, second", [("shop-eu", "Shop_EU"), ('a"b', "a b")])
def test_a_name_whose_schema_holds_another_dataset_is_refused(tmp_path, first, second):
    assert schema_name(first) == schema_name(second)
    folder = write_shop(tmp_path / "shop")
    home = Home.resolve(tmp_path / "home")
    _ingest_as(home, folder, first)
    con = home.connect(read_only=True)
    (events_before,) = con.execute(f'SELECT count(*) FROM "{schema_name(first)}".events').fetchall()[0]
    con.close()

    with pytest.raises(WarehouseError) as err:
        _ingest_as(home, folder, second)
    message = str(err.value)
    assert repr(second) in message and repr(first) in message and schema_name(first) in message

    con = home.connect(read_only=True)
    assert stored_definition(con, first).name == first  # the first dataset is untouched
    assert con.execute(f'SELECT count(*) FROM "{schema_name(first)}".events').fetchall()[0][0] == events_before
    with pytest.raises(WarehouseError, match=f"holds dataset {first!r}"):  # later stages refuse it too
        stored_definition(con, second)
    con.close()
    _ingest_as(home, folder, first)  # the owner itself re-ingests as before


def test_validate_under_the_other_name_is_refused_through_the_cli(tmp_path):
    folder = write_shop(tmp_path / "shop")
    home = Home.resolve(tmp_path / "home")
    _ingest_as(home, folder, "shop-eu")
    result = CliRunner().invoke(cli, ["--home", str(home.root), "validate", "Shop_EU"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "'Shop_EU'" in result.output and "'shop-eu'" in result.output and "passed" not in result.output


HOLD = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
con.execute("CREATE TABLE IF NOT EXISTS held (x INT)")
print("holding", flush=True)
time.sleep(120)
"""


def test_read_only_commands_while_another_process_writes_the_warehouse(tmp_path):
    home = Home.resolve(tmp_path / "home")
    home.data_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(home.warehouse_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        for args in (["datasets"], ["validate", "movielens-100k"]):
            result = CliRunner().invoke(cli, ["--home", str(home.root), *args])
            assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
            assert "Traceback" not in result.output
            assert f"process {holder.pid}" in result.output and "try again" in result.output, result.output
            assert "import sys, time, duckdb" in result.output  # the holder's command line
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    result = CliRunner().invoke(cli, ["--home", str(home.root), "datasets"])
    assert result.exit_code == 0, result.output
