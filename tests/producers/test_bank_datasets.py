"""The three bank datasets of the LLM4ES paper (Rosbank, Sber age group, Sber gender), ingested from
small files in the exact layouts they are distributed in."""
from __future__ import annotations

import csv
import gzip
import shutil
from datetime import datetime, timedelta

import pytest

from producers.datasets.definition import builtin_names, load_builtin
from producers.ingest import IngestConfig, ingest
from producers.stores.warehouse import Home
from tests.fixtures.bank_files import (
    AGE_BAD_LINES,
    AGE_KNOWN,
    GENDER_BAD_LINES,
    GENDER_KNOWN,
    GENDER_MCC_DESCRIPTIONS,
    GENDER_ONLY_RUSSIAN_MCC,
    GENDER_TR_TYPES,
    ROSBANK_BAD_LINES,
    ROSBANK_KNOWN,
    write_age_group,
    write_gender,
    write_rosbank,
)

ORIGIN = datetime(2019, 1, 1)


@pytest.fixture
def home(tmp_path):
    return Home.resolve(tmp_path / "home")


def run(home, name, folder, **kw):
    return ingest(home, load_builtin(name), IngestConfig(source=folder, **kw))


def read_rows(path, delimiter=","):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def column_types(con, schema, table):
    return dict(con.execute("SELECT column_name, data_type FROM information_schema.columns "
                            "WHERE table_schema = ? AND table_name = ?", [schema, table]).fetchall())


def code(con, schema, table, value):
    row = con.execute(f"SELECT description FROM {schema}.codes WHERE code_table = ? AND code = ?",
                      [table, value]).fetchone()
    return row[0] if row else None


def rejects(con, schema):
    return {n: reason for n, reason in con.execute(f"SELECT row_number, reason FROM {schema}.rejects").fetchall()}


def test_bank_definitions_are_builtin():
    assert {"rosbank", "age-group", "gender"} <= set(builtin_names())
    assert load_builtin("age-group").schema == "age_group"


def test_same_seed_same_files(tmp_path):
    for write in (write_rosbank, write_age_group, write_gender):
        a, b = write(tmp_path / f"{write.__name__}-a"), write(tmp_path / f"{write.__name__}-b")
        for f in sorted(a.iterdir()):
            assert f.read_bytes() == (b / f.name).read_bytes()
            assert len(f.read_text(encoding="utf-8").splitlines()) >= 2
    rows = read_rows(write_rosbank(tmp_path / "r", n_users=7, seed=3) / "train.csv")
    per_user = {}
    for r in rows:
        per_user[r["cl_id"]] = per_user.get(r["cl_id"], 0) + 1
    assert len(per_user) == 7 and min(per_user.values()) >= 5


# --- Rosbank ---------------------------------------------------------------------------------

def test_rosbank(home, tmp_path):
    folder = write_rosbank(tmp_path / "rosbank", n_users=20)
    rows = read_rows(folder / "train.csv")
    assert list(rows[0]) == ["PERIOD", "cl_id", "MCC", "channel_type", "currency", "TRDATETIME", "amount",
                             "trx_category", "target_flag", "target_sum"]
    r = run(home, "rosbank", folder)
    assert (r.n_events, r.n_users, r.n_rejects) == (len(rows), 20, 0)
    con = home.connect()
    assert column_types(con, "rosbank", "events") == {
        "user_id": "BIGINT", "event_time": "TIMESTAMP", "mcc": "VARCHAR", "channel_type": "VARCHAR",
        "currency": "VARCHAR", "amount": "DOUBLE", "trx_category": "VARCHAR"}
    assert column_types(con, "rosbank", "users") == {"user_id": "BIGINT", "target_flag": "INTEGER",
                                                     "target_sum": "DOUBLE"}
    # 21OCT17:00:00:00 -> 2017-10-21 00:00:00
    got = con.execute("SELECT event_time, mcc, currency, trx_category FROM rosbank.events "
                      "WHERE user_id = ? AND amount = ?", [ROSBANK_KNOWN["cl_id"], ROSBANK_KNOWN["amount"]]).fetchall()
    assert got == [(datetime(2017, 10, 21), "5411", "810", "POS")]
    # Times with a clock part too: every row's time is what the file says.
    for row in rows[:40]:
        want = datetime.strptime(row["TRDATETIME"].title(), "%d%b%y:%H:%M:%S")
        assert con.execute("SELECT count(*) FROM rosbank.events WHERE user_id = ? AND event_time = ? AND amount = ?",
                           [int(row["cl_id"]), want, float(row["amount"])]).fetchone()[0] >= 1
    # One row per client, with the label the file repeats on every one of its rows.
    labels = {(int(x["cl_id"]), int(x["target_flag"]), float(x["target_sum"])) for x in rows}
    assert set(con.execute("SELECT user_id, target_flag, target_sum FROM rosbank.users").fetchall()) == labels
    assert con.execute("SELECT count(*) FROM rosbank.events WHERE channel_type IS NULL").fetchone()[0] == \
        sum(1 for x in rows if x["channel_type"] == "")
    assert code(con, "rosbank", "mcc", "5411") == "Grocery Stores, Supermarkets"
    assert code(con, "rosbank", "currency", "810") == "Russian ruble"
    assert code(con, "rosbank", "currency", "036") == "Australian dollar"
    assert code(con, "rosbank", "trx_category", "POS") == "Card purchase (POS)"
    # Every code in the events has a description.
    for field, table in [("mcc", "mcc"), ("currency", "currency"), ("trx_category", "trx_category")]:
        missing = con.execute(f"SELECT DISTINCT e.{field} FROM rosbank.events e LEFT JOIN rosbank.codes c "
                              f"ON c.code_table = '{table}' AND c.code = e.{field} "
                              f"WHERE e.{field} IS NOT NULL AND c.code IS NULL").fetchall()
        assert missing == [], field
    con.close()


def test_rosbank_garbled_rows_are_rejected(home, tmp_path):
    folder = write_rosbank(tmp_path / "rosbank", n_users=20, bad_rows=True)
    rows = read_rows(folder / "train.csv")
    r = run(home, "rosbank", folder, max_reject_share=0.5)
    assert (r.n_events, r.n_users, r.n_rejects) == (len(rows) - len(ROSBANK_BAD_LINES), 20, len(ROSBANK_BAD_LINES))
    con = home.connect()
    got = rejects(con, "rosbank")
    assert set(got) == set(ROSBANK_BAD_LINES)
    for line, (_column, value, field) in ROSBANK_BAD_LINES.items():
        assert got[line].startswith(f"field {field}:") and value in got[line]
    raw = con.execute("SELECT raw_record FROM rosbank.rejects WHERE row_number = 9").fetchone()[0]
    assert "99XXX17:00:00:00" in raw
    con.close()


def test_rosbank_gzipped_as_hugging_face_ships_it(home, tmp_path):
    folder = write_rosbank(tmp_path / "plain", n_users=6)
    gz = tmp_path / "gz"
    gz.mkdir()
    with open(folder / "train.csv", "rb") as src, gzip.open(gz / "train.csv.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    r = run(home, "rosbank", gz)
    assert (r.n_events, r.n_users, r.n_rejects) == (len(read_rows(folder / "train.csv")), 6, 0)


# --- Age group -------------------------------------------------------------------------------

def test_age_group(home, tmp_path):
    folder = write_age_group(tmp_path / "age", n_users=20, n_unlabelled=3)
    rows = read_rows(folder / "transactions_train.csv")
    targets = read_rows(folder / "train_target.csv")
    assert list(rows[0]) == ["client_id", "trans_date", "small_group", "amount_rur"]
    assert list(targets[0]) == ["client_id", "bins"]
    r = run(home, "age-group", folder)
    # users are the labelled clients; the events also hold the unlabelled ones.
    assert (r.n_events, r.n_users, r.n_rejects) == (len(rows), 20, 0)
    con = home.connect()
    assert con.execute("SELECT count(DISTINCT user_id) FROM age_group.events").fetchone()[0] == 23
    assert column_types(con, "age_group", "events") == {"user_id": "BIGINT", "event_time": "TIMESTAMP",
                                                        "small_group": "INTEGER", "amount": "DOUBLE"}
    assert column_types(con, "age_group", "users") == {"user_id": "BIGINT", "bins": "INTEGER"}
    # trans_date 0 is the origin; day n is origin + n days.
    got = con.execute("SELECT event_time, small_group, amount FROM age_group.events WHERE user_id = ? "
                      "ORDER BY event_time LIMIT 1", [AGE_KNOWN["client_id"]]).fetchone()
    assert got == (ORIGIN, AGE_KNOWN["small_group"], float(AGE_KNOWN["amount_rur"]))
    last = rows[-1]
    assert con.execute("SELECT count(*) FROM age_group.events WHERE user_id = ? AND event_time = ?",
                       [int(last["client_id"]), ORIGIN + timedelta(days=int(last["trans_date"]))]).fetchone()[0] >= 1
    assert set(con.execute("SELECT user_id, bins FROM age_group.users").fetchall()) == \
        {(int(t["client_id"]), int(t["bins"])) for t in targets}
    assert con.execute("SELECT count(*) FROM age_group.codes").fetchone()[0] == 0
    con.close()


def test_age_group_garbled_rows_are_rejected(home, tmp_path):
    folder = write_age_group(tmp_path / "age", bad_rows=True)
    rows = read_rows(folder / "transactions_train.csv")
    r = run(home, "age-group", folder, max_reject_share=0.5)
    assert (r.n_events, r.n_rejects) == (len(rows) - len(AGE_BAD_LINES), len(AGE_BAD_LINES))
    con = home.connect()
    got = rejects(con, "age_group")
    assert set(got) == set(AGE_BAD_LINES)
    for line, (_column, value, field) in AGE_BAD_LINES.items():
        assert got[line].startswith(f"field {field}:") and value in got[line]
    assert {s for s, in con.execute("SELECT DISTINCT source FROM age_group.rejects").fetchall()} == \
        {"transactions_train.csv"}
    con.close()


# --- Gender ----------------------------------------------------------------------------------

def test_gender(home, tmp_path):
    folder = write_gender(tmp_path / "gender", n_users=20, n_unlabelled=3)
    rows = read_rows(folder / "transactions.csv")
    assert list(rows[0]) == ["customer_id", "tr_datetime", "mcc_code", "tr_type", "amount", "term_id"]
    assert (folder / "tr_mcc_codes.csv").read_text(encoding="utf-8").startswith("mcc_code;mcc_description\n742;")
    r = run(home, "gender", folder)
    assert (r.n_events, r.n_users, r.n_rejects) == (len(rows), 20, 0)
    con = home.connect()
    assert con.execute("SELECT count(DISTINCT user_id) FROM gender.events").fetchone()[0] == 23
    assert column_types(con, "gender", "events") == {
        "user_id": "BIGINT", "event_time": "TIMESTAMP", "mcc": "VARCHAR", "tr_type": "VARCHAR",
        "amount": "DOUBLE", "term_id": "VARCHAR"}
    assert column_types(con, "gender", "users") == {"user_id": "BIGINT", "gender": "INTEGER"}
    # "3 10:23:26" -> origin + 3 days 10:23:26; "7 00:00:60" -> origin + 7 days + 60 s.
    for values, want in [(GENDER_KNOWN[2], ORIGIN + timedelta(days=3, hours=10, minutes=23, seconds=26)),
                         (GENDER_KNOWN[3], ORIGIN + timedelta(days=7, minutes=1))]:
        got = con.execute("SELECT event_time, mcc, tr_type, term_id FROM gender.events "
                          "WHERE user_id = ? AND amount = ?",
                          [values["customer_id"], float(values["amount"])]).fetchall()
        assert got == [(want, values["mcc_code"].zfill(4), values["tr_type"], values["term_id"] or None)]
    assert con.execute("SELECT min(amount) < 0 AND max(amount) > 0 FROM gender.events").fetchone()[0]
    # MCC values are zero-padded like the code table (742 -> 0742), never cut.
    assert sorted(m for m, in con.execute("SELECT mcc FROM gender.events").fetchall()) == \
        sorted(x["mcc_code"].zfill(4) for x in rows)
    assert con.execute("SELECT count(*) FROM gender.users WHERE gender IN (0, 1)").fetchone()[0] == 20
    # MCC: the card networks' English wording wins over the contest's Russian list ...
    assert code(con, "gender", "mcc", "5411") == "Grocery Stores, Supermarkets"
    assert code(con, "gender", "mcc", "0742") == "Veterinary Services"  # the file writes 742
    # ... and transaction types come from tr_types.csv, Russian text (commas, quotes) intact.
    for tr_type, text in GENDER_TR_TYPES.items():
        assert code(con, "gender", "tr_type", tr_type) == text
    con.close()


def test_gender_mcc_only_in_contest_list_gets_russian_text(home, tmp_path):
    folder = write_gender(tmp_path / "gender")
    run(home, "gender", folder)
    con = home.connect()
    try:
        assert code(con, "gender", "mcc", GENDER_ONLY_RUSSIAN_MCC) == GENDER_MCC_DESCRIPTIONS[GENDER_ONLY_RUSSIAN_MCC]
    finally:
        con.close()


def test_gender_garbled_rows_are_rejected(home, tmp_path):
    folder = write_gender(tmp_path / "gender", bad_rows=True)
    rows = read_rows(folder / "transactions.csv")
    r = run(home, "gender", folder, max_reject_share=0.5)
    assert (r.n_events, r.n_rejects) == (len(rows) - len(GENDER_BAD_LINES), len(GENDER_BAD_LINES))
    con = home.connect()
    got = rejects(con, "gender")
    assert set(got) == set(GENDER_BAD_LINES)
    for line, (_column, value, field) in GENDER_BAD_LINES.items():
        assert got[line].startswith(f"field {field}:") and value in got[line]
    con.close()
