"""The generic adapter: a CSV it has never seen, ingested from the README's mapping alone."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from producers.cli import cli
from producers.datasets.definition import DefinitionError, parse_definition

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_mapping() -> str:
    """The example mapping in the README, verbatim: the docs and the code cannot drift apart."""
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    (shop,) = [b for b in blocks if b.startswith("name: shop")]
    return shop


def write_shop(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shop.yaml").write_text(readme_mapping())
    (folder / "purchases.csv").write_text(
        "customer,ts,item,cat_code,amount,search\n"
        "1,2024-03-01 10:00,apple,10,2.5,fruit\n"
        "1,2024-03-02 11:30,pear,10,3.0,\n"
        "1,2024-03-09 09:15,soap,20,4.75,\"soap, lavender\"\n"
        "2,2024-03-01 12:00,bread,30,1.2,bakery\n"
        "2,2024-03-03 08:00,milk,0,0.99,\n"
        "2,2024-03-04 18:45,cheese,99,7.1,cheese\n"
        "2,2024-03-05 18:45,broken,10,abc,\n"   # an amount that does not parse
    )
    (folder / "customers.csv").write_text("customer,churn,segment\n1,0,gold\n2,1,silver\n")
    (folder / "categories.csv").write_bytes("id;name\n10;Fruit & vegetables\n20;Hygiène\n30;Bakery\n".encode("latin-1"))
    return folder


def test_unseen_csv_ingests_from_the_mapping_alone(tmp_path):
    folder = write_shop(tmp_path / "shop")
    home = tmp_path / "home"
    runner = CliRunner()
    result = runner.invoke(cli, ["--home", str(home), "ingest", "shop", "--mapping", str(folder / "shop.yaml"),
                                 "--max-reject-share", "0.2"])
    assert result.exit_code == 0, result.output
    import duckdb

    con = duckdb.connect(str(home / "data" / "warehouse.duckdb"), read_only=True)
    events = con.execute("SELECT user_id, event_time, item, category, amount, query, weekend "
                         "FROM shop.events ORDER BY user_id, event_time").fetchall()
    assert len(events) == 6
    assert [str(e[1]) for e in events[:3]] == ["2024-03-01 10:00:00", "2024-03-02 11:30:00", "2024-03-09 09:15:00"]
    assert events[2][5] == "soap, lavender" and events[1][5] is None
    assert [e[6] for e in events[:3]] == [False, True, True]  # Fri, Sat, Sat
    assert con.execute("SELECT row_number, reason FROM shop.rejects").fetchall() == [
        (8, 'field amount: cannot read "abc" as DOUBLE')]
    codes = dict(con.execute("SELECT code, description FROM shop.codes WHERE code_table = 'category'").fetchall())
    assert codes == {"0": "Uncategorized", "10": "Fruit & vegetables", "20": "Hygiène", "30": "Bakery"}
    assert con.execute("SELECT user_id, churned, segment FROM shop.users ORDER BY 1").fetchall() == [
        (1, 0, "gold"), (2, 1, "silver")]
    con.close()

    result = runner.invoke(cli, ["--home", str(home), "validate", "shop", "--no-data-docs"])
    # The broken row makes 1 of 7 rows (14%) rejected: above the gate's default 1%.
    assert result.exit_code == 1
    assert "rejected-row share" in result.output


def test_a_parquet_event_file_works_the_same(tmp_path):
    import duckdb

    folder = write_shop(tmp_path / "shop")
    duckdb.sql(f"COPY (SELECT * FROM read_csv('{folder / 'purchases.csv'}', all_varchar=true) WHERE item <> 'broken') "
               f"TO '{folder / 'purchases.parquet'}' (FORMAT parquet)")
    mapping = readme_mapping().replace("purchases: {file: purchases.csv}", "purchases: {file: purchases.parquet}")
    (folder / "shop.yaml").write_text(mapping)
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "ingest", "shop",
                                      "--mapping", str(folder / "shop.yaml")])
    assert result.exit_code == 0, result.output
    assert "6 events" in result.output.replace(",", "")


@pytest.mark.parametrize("edit, message", [
    (("kind: numeric, column: amount", "kind: number, column: amount"), "events.fields.2.kind"),
    (("table: customers\n  user", "table: clients\n  user"), "table 'clients' is used but not declared"),
    (("codes: category}", "codes: colour}"), "code table 'colour'"),
    (("format: \"%Y-%m-%d %H:%M\"", "format: day_index"), "needs an `origin`"),
])
def test_a_malformed_mapping_names_the_entry(edit, message):
    text = readme_mapping().replace(*edit)
    with pytest.raises(DefinitionError, match=re.escape(message)):
        parse_definition(text, origin="shop.yaml")


def test_mapping_name_must_match_the_dataset_argument(tmp_path):
    folder = write_shop(tmp_path / "shop")
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "ingest", "store",
                                      "--mapping", str(folder / "shop.yaml")])
    assert result.exit_code == 1
