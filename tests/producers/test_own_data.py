"""The README's second mapping example (labels in their own file, a multi-valued field, a code
table) on generated files in its shape: it ingests, validates, and the texts use it as described."""
from __future__ import annotations

import re

import pytest

from producers.datasets.definition import load_mapping
from producers.enrich.base import UserHistory
from producers.enrich.templates import Synonyms, TemplateEnricher
from producers.ingest import IngestConfig, IngestError, ingest
from producers.serialize.render import header, rendered_events_sql
from producers.stores.warehouse import Home
from tests.fixtures.listens_files import COUNTRIES, UNKNOWN_COUNTRY, write_listens
from validation.run import ValidateConfig, validate


@pytest.fixture(scope="module")
def listens(tmp_path_factory):
    folder = tmp_path_factory.mktemp("listens")
    written = write_listens(folder / "src")
    definition = load_mapping(folder / "src" / "listens.yaml")
    home = Home.resolve(folder / "home")
    ingest(home, definition, IngestConfig(source=folder / "src"))
    return home, definition, written


def test_the_readme_mapping_ingests_and_validates(listens):
    home, definition, written = listens
    report = validate(home, "listens", ValidateConfig(data_docs=False))
    assert report.success, [(r.check, r.column, r.examples) for r in report.failed]
    con = home.connect(read_only=True)
    try:
        events = con.execute("SELECT user_id, epoch(event_time)::BIGINT, track, tags, country, seconds "
                             "FROM listens.events ORDER BY user_id, event_time").fetchall()
        users = con.execute("SELECT user_id, premium, age FROM listens.users ORDER BY user_id").fetchall()
        rendered = con.execute(f"SELECT DISTINCT e.country, r.t_country FROM ({rendered_events_sql(definition)}) r "
                               "JOIN listens.events e USING (user_id, event_time)").fetchall()
    finally:
        con.close()
    plays = sorted(written["plays"], key=lambda p: (p[0], p[1]))
    assert [(u, t, track, tags, c, s) for u, t, track, tags, c, s in events] == plays
    assert any("|" in e[3] for e in events)  # the multi-valued cell is kept whole
    assert users == sorted((u, p, a) for u, (p, a) in written["labels"].items())  # the label file, as it is
    # the code table names the countries; a code it lacks stays as the code
    assert dict(rendered) == {**COUNTRIES, UNKNOWN_COUNTRY: UNKNOWN_COUNTRY}
    assert header(definition) == "Played | Track | Tags | Country | Seconds played"


def test_the_prose_rewrite_counts_per_tag(listens):
    _, definition, written = listens
    rows = [["2021-03-01 10:00", "Heroes", "rock|glam", "United Kingdom", "200"],
            ["2021-03-02 10:00", "Ziggy", "rock", "United Kingdom", "100"]]
    h = UserHistory(1, ["time", "track", "tags", "country", "seconds"],
                    ["Played", "Track", "Tags", "Country", "Seconds played"], rows, "")
    plain = TemplateEnricher(seed=0, synonyms=Synonyms.parse({}))
    texts = [plain.rewrite_one(definition, h, v, "prose").text for v in range(6)]
    assert all("rock" in t and "2 song plays" in t for t in texts)
    assert any("rock: 2 song plays, average seconds played 150.00 seconds" in t for t in texts)
    assert any("glam: 1 song play, average seconds played 200.00 seconds" in t for t in texts)


def test_min_events_per_user_is_a_check_not_a_filter(listens, tmp_path):
    home, definition, written = listens
    strict = definition.model_copy(update={"events": definition.events.model_copy(update={"min_events_per_user": 3})})
    strict_home = Home.resolve(tmp_path / "home")
    ingest(strict_home, strict, IngestConfig(source=home.root.parent / "src"))
    report = validate(strict_home, "listens", ValidateConfig(data_docs=False))
    counts = {}
    for u, *_ in written["plays"]:
        counts[u] = counts.get(u, 0) + 1
    short = sum(1 for n in counts.values() if n < 3)
    assert short and not report.success
    (activity,) = [r for r in report.failed if r.batch == "activity"]
    assert activity.failed == short  # the check counts the short users...
    con = strict_home.connect(read_only=True)
    try:  # ...and none was dropped
        assert con.execute("SELECT count(DISTINCT user_id) FROM listens.events").fetchone()[0] == len(counts)
    finally:
        con.close()


def test_ingest_counts_users_with_events_apart_from_label_rows(listens, tmp_path):
    """The label file covers only some listeners and names one who never played: the summary must not
    report its row count as the users ingested (a user would think the others' events were lost)."""
    home, definition, written = listens
    r = ingest(Home.resolve(tmp_path / "home"), definition, IngestConfig(source=home.root.parent / "src"))
    listeners = {p[0] for p in written["plays"]}
    assert r.n_users == len(written["labels"])
    assert r.n_event_users == len(listeners) != r.n_users
    assert r.n_users_without_events == len(set(written["labels"]) - listeners) == 1


def test_ingest_counts_repeated_rows_without_an_event_key(listens, tmp_path):
    """The mapping declares no events.key, so nothing checks uniqueness: a re-sent row must be said."""
    import shutil

    home, definition, _ = listens
    source = shutil.copytree(home.root.parent / "src", tmp_path / "src")
    clean = ingest(Home.resolve(tmp_path / "clean"), definition, IngestConfig(source=source))
    lines = (source / "plays.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (source / "plays.csv").write_text("".join(lines + lines[1:3]), encoding="utf-8")
    resent = ingest(Home.resolve(tmp_path / "resent"), definition, IngestConfig(source=source))
    assert clean.n_repeated_events == 0
    assert (resent.n_events - clean.n_events, resent.n_repeated_events) == (2, 2)


def test_append_counts_as_new_only_users_without_stored_events(listens, tmp_path):
    """A listener who played before but has no label row is not a new user (the label file is partial)."""
    import shutil

    from producers.ingest.append import append

    home, definition, written = listens
    own = Home.resolve(tmp_path / "home")
    ingest(own, definition, IngestConfig(source=home.root.parent / "src"))
    unlabelled = next(p[0] for p in written["plays"] if p[0] not in written["labels"])
    brand_new = max(p[0] for p in written["plays"]) + 10
    day = shutil.copytree(home.root.parent / "src", tmp_path / "day2")
    last = max(p[1] for p in written["plays"])
    (day / "plays.csv").write_text("listener,played_at,track,tags,country,seconds\n"
                                   f"{unlabelled},{last + 60},Heroes,rock,GB,200\n"
                                   f"{brand_new},{last + 120},Heroes,rock,GB,200\n", encoding="utf-8")
    r = append(own, definition, IngestConfig(source=day))
    assert (r.rows_added, r.users_touched, r.users_new) == (2, 2, 1)
    assert r.n_event_users == len({p[0] for p in written["plays"]}) + 1 != r.n_users


@pytest.mark.parametrize("change, hint", [
    (lambda text: text.encode("latin-1"), "plays.csv is not UTF-8: declare its encoding"),
    (lambda text: re.sub(r",(\d+)\n", r',"\1,5"\n', text).encode(),
     "field seconds has a decimal comma: add `decimal: \",\"`"),
])
def test_rejects_of_a_european_or_windows_export_say_what_to_declare(listens, tmp_path, change, hint):
    import shutil

    home, definition, _ = listens
    source = shutil.copytree(home.root.parent / "src", tmp_path / "src")
    text = (source / "plays.csv").read_text(encoding="utf-8").replace(", live", ", lïve")
    (source / "plays.csv").write_bytes(change(text))
    with pytest.raises(IngestError, match="too many malformed rows") as err:
        ingest(Home.resolve(tmp_path / "home"), definition, IngestConfig(source=source))
    assert hint in str(err.value)


def test_a_declared_decimal_comma_reads_the_european_export(listens, tmp_path):
    """`decimal: ","` on the field: "200,5" is 200.5, where the plain field rejects every such row."""
    import shutil

    home, _, written = listens
    source = shutil.copytree(home.root.parent / "src", tmp_path / "src")
    text = (source / "plays.csv").read_text(encoding="utf-8")
    (source / "plays.csv").write_text(re.sub(r",(\d+)\n", r',"\1,5"\n', text), encoding="utf-8")
    mapping = (source / "listens.yaml").read_text()
    assert mapping.count("column: seconds, dtype: INTEGER") == 1
    (source / "listens.yaml").write_text(
        mapping.replace("column: seconds, dtype: INTEGER", 'column: seconds, dtype: DOUBLE, decimal: ","'))
    own = Home.resolve(tmp_path / "home")
    r = ingest(own, load_mapping(source / "listens.yaml"), IngestConfig(source=source))
    assert r.n_rejects == 0
    con = own.connect(read_only=True)
    try:
        seconds = con.execute("SELECT seconds FROM listens.events ORDER BY user_id, event_time").fetchall()
    finally:
        con.close()
    assert [s for (s,) in seconds] == [p[5] + 0.5 for p in sorted(written["plays"], key=lambda p: (p[0], p[1]))]


@pytest.mark.parametrize("dtype, decimal, thousands, values", [
    ("DOUBLE", ",", "", {"12,50": 12.5, "-3": -3.0, "+0,25": 0.25, "1.234,56": None, "12.5": None, "1,2,3": None}),
    ("DOUBLE", ",", ".", {"1.234,56": 1234.56, "12.345.678": 12345678.0, "1234,5": 1234.5, "12.5": None,
                          "1.23,4": None}),
    ("DOUBLE", ".", ",", {"1,234.56": 1234.56, "1,234,567": 1234567.0, "12,5": None}),
    ("INTEGER", ".", " ", {"1 234": 1234, "12": 12, "12,5": None, "1 23": None}),
    ("BIGINT", ".", "'", {"1'234'567": 1234567, "7.5": None}),
])
def test_local_numbers_follow_their_separators_or_are_rejected(dtype, decimal, thousands, values):
    """No guessing: a value that does not follow the declared separators becomes NULL (a rejected row)."""
    import duckdb

    from producers.ingest.typed_sql import local_number

    con = duckdb.connect()
    sql = local_number("v", dtype, decimal, thousands)
    got = {v: con.execute(f"SELECT {sql} FROM (SELECT ? AS v)", [v]).fetchone()[0] for v in values}
    assert got == values


def test_separators_are_checked_when_the_definition_is_read():
    from producers.datasets.definition import FieldSpec

    with pytest.raises(ValueError, match="dtype 'VARCHAR' must be one of"):
        FieldSpec(name="a", column="a", decimal=",")
    with pytest.raises(ValueError, match="cannot also be the decimal"):
        FieldSpec(name="a", column="a", dtype="DOUBLE", decimal=",", thousands=",")
    with pytest.raises(ValueError, match="raw `column`"):
        FieldSpec(name="a", sql="x", dtype="DOUBLE", decimal=",")
    with pytest.raises(ValueError):
        FieldSpec(name="a", column="a", dtype="DOUBLE", decimal=";")  # not a separator this reads


def test_the_new_separators_keep_every_earlier_definition_fingerprint():
    """CoLES keys its runs by the definition's fingerprint: adding options must not re-key (and so retrain
    or lose) the runs of every home on upgrade. The values are those before `decimal`/`thousands` existed."""
    from producers.datasets.definition import load_builtin

    before = {"movielens-100k": "eb1a3b75f6dc2c5a", "bank-clickstream": "760b169e094726f3",
              "rosbank": "15d0985558f455a2"}
    assert {name: load_builtin(name).fingerprint() for name in before} == before
    d = load_builtin("rosbank")
    amount = next(f for f in d.events.fields if f.dtype.upper() == "DOUBLE" and f.column and not f.sql)
    fields = [f.model_copy(update={"decimal": ","}) if f is amount else f for f in d.events.fields]
    changed = d.model_copy(update={"events": d.events.model_copy(update={"fields": fields})})
    assert changed.fingerprint() != d.fingerprint()
