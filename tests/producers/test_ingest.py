"""Ingest of MovieLens in the GroupLens layout: typing, rejects, atomicity, idempotence."""
from __future__ import annotations

import pytest

from producers.datasets.definition import load_builtin
from producers.ingest import IngestConfig, IngestError, ingest
from tests.fixtures.movielens_files import append_lines, replace_lines, zip_folder

ML = load_builtin("movielens-100k")


def run(home, source, **kw):
    return ingest(home, ML, IngestConfig(source=source, **kw))


def snapshot(home):
    """Every table of the dataset schema, fully, to compare before and after a failed run."""
    con = home.connect()
    try:
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'movielens_100k' "
            "ORDER BY 1").fetchall()]
        return {t: con.execute(f"SELECT * FROM movielens_100k.{t}").fetchall() for t in tables}
    finally:
        con.close()


def test_grouplens_folder_is_typed(home, grouplens):
    r = run(home, grouplens)
    n_lines = len((grouplens / "u.data").read_text().splitlines())
    assert (r.n_events, r.n_users, r.n_rejects) == (n_lines, 12, 0)
    con = home.connect()
    cols = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns "
                            "WHERE table_schema = 'movielens_100k' AND table_name = 'events'").fetchall())
    assert cols == {"user_id": "BIGINT", "event_time": "TIMESTAMP", "movie_id": "BIGINT", "title": "VARCHAR",
                    "year": "INTEGER", "genres": "VARCHAR", "rating": "INTEGER"}
    # u.item is latin-1: the accented title must arrive intact, the year split off the title.
    title, year = con.execute(
        "SELECT title, year FROM movielens_100k.events WHERE movie_id = 6 LIMIT 1").fetchone() or (None, None)
    item6 = (grouplens / "u.item").read_bytes().decode("latin-1").splitlines()[5].split("|")
    assert title == "Misérables, Les" and str(year) == item6[1][-5:-1]
    genres = con.execute("SELECT genres FROM movielens_100k.events WHERE movie_id = 1 LIMIT 1").fetchone()[0]
    flags = (grouplens / "u.item").read_text(encoding="latin-1").splitlines()[0].split("|")[5:]
    expected = [g for g, f in zip(["Unknown genre", "Action", "Adventure", "Animation", "Children's", "Comedy",
                                   "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical",
                                   "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"], flags) if f == "1"]
    assert genres == ", ".join(expected)
    first = (grouplens / "u.data").read_text().splitlines()[0].split("\t")
    got = con.execute("SELECT epoch(event_time)::BIGINT, rating FROM movielens_100k.events "
                      "WHERE user_id = ? AND movie_id = ?", [int(first[0]), int(first[1])]).fetchone()
    assert got == (int(first[3]), int(first[2]))
    assert con.execute(
        "SELECT count(*) FROM movielens_100k.users WHERE gender IN ('M', 'F') AND age > 0").fetchone()[0] == 12


def test_zip_as_grouplens_ships_it(home, grouplens, tmp_path):
    r = run(home, zip_folder(grouplens, tmp_path / "ml-100k.zip"))
    assert r.n_users == 12 and r.n_rejects == 0


def test_reingest_never_duplicates(home, grouplens):
    first = run(home, grouplens)
    again = run(home, grouplens)
    assert again.skipped and again.ingest_id == first.ingest_id
    forced = run(home, grouplens, force=True)
    assert not forced.skipped and forced.n_events == first.n_events
    con = home.connect()
    assert con.execute("SELECT count(*) FROM movielens_100k.events").fetchone()[0] == first.n_events
    assert con.execute("SELECT count(*) FROM movielens_100k.ingest_log").fetchone()[0] == 2


def test_a_few_garbled_lines_become_rejects_with_line_numbers(home, grouplens):
    replace_lines(grouplens / "u.data", {
        3: b"1\t2\t3",  # a column missing
        10: b"2\t5\tfive\t880000000",  # rating not a number
        11: b"2\t6\t4\tyesterday",  # time not a number
        40: b"3\t7\t4\t88\xff\xfe0000",  # not UTF-8
    })
    n_lines = len((grouplens / "u.data").read_bytes().splitlines())
    r = run(home, grouplens, max_reject_share=0.05)
    assert r.n_rejects == 4 and r.n_events == n_lines - 4
    con = home.connect()
    rows = con.execute("SELECT row_number, reason FROM movielens_100k.rejects ORDER BY row_number").fetchall()
    assert [n for n, _ in rows] == [3, 10, 11, 40]
    reasons = dict(rows)
    assert "MISSING COLUMNS" in reasons[3]
    assert "field rating" in reasons[10] and '"five"' in reasons[10]
    assert "field event_time" in reasons[11] and "unix seconds" in reasons[11]
    assert "INVALID ENCODING" in reasons[40]
    assert con.execute("SELECT DISTINCT source FROM movielens_100k.rejects").fetchall() == [("u.data",)]


def test_line_numbers_stay_exact_after_structural_rejects(home, grouplens):
    """Accepted rows after a rejected line keep their own line numbers in later rejects."""
    replace_lines(grouplens / "u.data", {2: b"x", 3: b"y\tz", 5: b"1\t2\t9.5.1\t880000000"})
    run(home, grouplens, max_reject_share=0.5)
    con = home.connect()
    rejected = con.execute("SELECT row_number FROM movielens_100k.rejects ORDER BY 1").fetchall()
    assert [r[0] for r in rejected] == [2, 3, 5]


def test_many_garbled_lines_fail_and_leave_previous_tables_intact(home, grouplens, tmp_path):
    run(home, grouplens)
    before = snapshot(home)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in grouplens.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    replace_lines(broken / "u.data", {n: b"garbage line" for n in range(5, 40)})
    with pytest.raises(IngestError) as err:
        run(home, broken)
    msg = str(err.value)
    assert "u.data" in msg and "35 of" in msg and "5, 6, 7" in msg and "--max-reject-share" in msg
    assert snapshot(home) == before


@pytest.mark.parametrize("fail_on", ["users", "ingest_log"])
def test_failure_mid_swap_rolls_back_every_table(home, grouplens, monkeypatch, fail_on):
    import producers.stores.warehouse as wh

    run(home, grouplens)
    before = snapshot(home)
    append_lines(grouplens / "u.data", ["1\t40\t5\t880000000"])  # changes the source
    real = wh._swap_one

    def swap_then_fail(con, schema, name):
        if name == fail_on:
            raise RuntimeError("injected failure")
        real(con, schema, name)

    monkeypatch.setattr(wh, "_swap_one", swap_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        run(home, grouplens)
    after = snapshot(home)
    assert after == before
    assert not [t for t in after if t.endswith("__staging")]


def test_missing_file_and_missing_column_are_named(home, grouplens):
    from producers.ingest.source_files import SourceError

    (grouplens / "u.user").unlink()
    with pytest.raises(SourceError, match=r"people.*u\.user"):
        run(home, grouplens)


def test_lookup_with_repeated_keys_is_refused(home, grouplens):
    append_lines(grouplens / "u.item", ["1|Toy Story again (1995)|01-Jan-1995||x|" + "|".join(["0"] * 19)])
    with pytest.raises(IngestError, match="u.item.*repeat"):
        run(home, grouplens)


def test_an_unreadable_csv_names_the_file(home, grouplens):
    (grouplens / "u.user").write_bytes(b'1|24|M|"technician|85711\n2|53|F|other|94043\n')
    # The declared dialect is kept (no re-sniffing): the broken quote is a rejected row, named.
    with pytest.raises(IngestError, match=r"u\.user: .* rejected .*\n.*row 1: .*unterminated quote"):
        run(home, grouplens)
