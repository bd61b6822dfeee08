"""Data that passed the gate and broke later stages (issue 11, point 6): a header-only file,
non-finite amounts, future-dated events. Each is now stopped where it enters, with a message
naming what is wrong."""
from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from producers.aggregate import AggregateConfig, AggregateError, aggregate
from producers.shared.as_of import pick_as_of
from producers.cli import cli
from producers.datasets.definition import DefinitionError, parse_definition
from producers.ingest import IngestConfig, IngestError, ingest
from validation.run import ValidateConfig, validate

NO_DOCS = ValidateConfig(data_docs=False)

MAPPING = """
name: wallet
tables:
  tx: {file: tx.csv}
events:
  table: tx
  user: customer
  user_dtype: BIGINT
  time: {column: ts, format: "%Y-%m-%d %H:%M"__WINDOW__}
  min_events_per_user: 1
  fields:
    - {name: category, kind: categorical, column: cat}
    - {name: amount, kind: numeric, column: amount, dtype: DOUBLE, min: 0}
"""
HEADER = "customer,ts,cat,amount\n"


def definition(window: str = ""):
    return parse_definition(MAPPING.replace("__WINDOW__", f", window: {window}" if window else ""), "wallet.yaml")


def write_tx(folder: Path, rows: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tx.csv").write_text(HEADER + "".join(r + "\n" for r in rows))
    return folder


def good_rows(n_users: int = 10, per_user: int = 50) -> list[str]:
    return [f"{u},2024-03-{d % 28 + 1:02d} {d % 24:02d}:00,{'food' if d % 2 else 'rent'},{u + d / 10:.1f}"
            for u in range(1, n_users + 1) for d in range(per_user)]


def events_in(home, schema: str = "wallet") -> int:
    con = duckdb.connect(str(home.warehouse_path), read_only=True)
    try:
        return con.execute(f'SELECT count(*) FROM "{schema}".events').fetchone()[0]
    finally:
        con.close()


# ---------------------------------------------------------------- (a) shrinking and empty data


def test_header_only_file_does_not_replace_good_events(home, tmp_path):
    d = definition()
    ingest(home, d, IngestConfig(write_tx(tmp_path / "v1", good_rows())))
    assert events_in(home) == 500
    with pytest.raises(IngestError) as err:
        ingest(home, d, IngestConfig(write_tx(tmp_path / "v2", [])))
    message = str(err.value)
    assert "events 500 -> 0" in message and "users 10 -> 0" in message and "--allow-shrink" in message
    assert "left unchanged" in message
    assert events_in(home) == 500  # nothing replaced


def test_a_drop_of_more_than_half_needs_allow_shrink(home, tmp_path):
    d = definition()
    ingest(home, d, IngestConfig(write_tx(tmp_path / "v1", good_rows())))
    # 4 of 10 users: 60% fewer events and users.
    small = write_tx(tmp_path / "v2", good_rows(n_users=4))
    with pytest.raises(IngestError, match=r"events 500 -> 200 \(60% fewer\)"):
        ingest(home, d, IngestConfig(small))
    assert events_in(home) == 500
    # Half is allowed without the flag (exactly 50% is not "more than half").
    ingest(home, d, IngestConfig(write_tx(tmp_path / "v3", good_rows(n_users=5))))
    assert events_in(home) == 250
    ingest(home, d, IngestConfig(small, allow_shrink=True))
    assert events_in(home) == 200


def test_allow_shrink_through_the_cli(tmp_path):
    folder = write_tx(tmp_path / "v1", good_rows())
    (folder / "wallet.yaml").write_text(MAPPING.replace("__WINDOW__", ""))
    home = str(tmp_path / "home")
    runner = CliRunner()
    assert runner.invoke(cli, ["--home", home, "ingest", "wallet", "--mapping", str(folder / "wallet.yaml")]
                         ).exit_code == 0
    write_tx(folder, [])
    refused = runner.invoke(cli, ["--home", home, "ingest", "wallet", "--mapping", str(folder / "wallet.yaml")])
    assert refused.exit_code == 1
    assert "--allow-shrink" in refused.output and "Traceback" not in refused.output
    accepted = runner.invoke(cli, ["--home", home, "ingest", "wallet", "--mapping", str(folder / "wallet.yaml"),
                                   "--allow-shrink"])
    assert accepted.exit_code == 0, accepted.output
    # ... and then the empty events table fails validation.
    result = runner.invoke(cli, ["--home", home, "validate", "wallet", "--no-data-docs"])
    assert result.exit_code == 1
    assert "the dataset has events" in result.output


def test_empty_events_table_fails_validation(home, tmp_path):
    ingest(home, definition(), IngestConfig(write_tx(tmp_path / "v1", [])))
    report = validate(home, "wallet", NO_DOCS)
    assert not report.success
    assert [r.check for r in report.failed] == ["the dataset has events (at least one user with an event)"]


# ---------------------------------------------------------------- (b) non-finite numbers


@pytest.mark.parametrize("value, shown", [("NaN", "nan"), ("inf", "inf"), ("1e400", "inf"), ("-Infinity", "-inf")])
def test_non_finite_amount_fails_and_names_field_and_row(home, tmp_path, value, shown):
    rows = good_rows()
    rows[7] = f"1,2024-03-20 05:00,food,{value}"
    ingest(home, definition(), IngestConfig(write_tx(tmp_path / "v1", rows)))
    report = validate(home, "wallet", NO_DOCS)
    assert not report.success
    bad = {r.check: r for r in report.failed}
    check = "amount is a finite number (no NaN, inf or -inf)"
    # -inf also fails `min: 0`; NaN and +inf passed it, which is why the finite check exists.
    assert set(bad) == {check} | ({"amount between 0 and inf"} if value.startswith("-") else set())
    assert bad[check].failed == 1 and bad[check].examples == [shown]
    [where] = bad[check].where
    assert where["user_id"] == 1 and str(where["event_time"]) == "2024-03-20 05:00:00"


def test_nulls_are_not_non_finite(home, tmp_path):
    rows = good_rows()
    rows[3] = "1,2024-03-20 05:00,food,"
    ingest(home, definition(), IngestConfig(write_tx(tmp_path / "v1", rows)))
    assert validate(home, "wallet", NO_DOCS).success


# ---------------------------------------------------------------- (c) future-dated events


def test_default_window_ends_near_today(home, tmp_path):
    future = (datetime.now() + timedelta(days=30)).strftime("%Y-%m-%d %H:00")
    rows = good_rows()
    rows[0] = f"1,{future},food,1.0"
    ingest(home, definition(), IngestConfig(write_tx(tmp_path / "v1", rows)))
    report = validate(home, "wallet", NO_DOCS)
    [bad] = report.failed
    assert bad.check.startswith("event times within the plausible window 1970-01-01 .. now (")
    assert bad.failed == 1 and [w["user_id"] for w in bad.where] == [1]


def test_window_is_configurable_and_checked(home, tmp_path):
    rows = good_rows()
    rows[0] = "1,2099-01-01 00:00,food,1.0"
    ingest(home, definition('["2000-01-01", "2100-01-01"]'), IngestConfig(write_tx(tmp_path / "v1", rows)))
    assert validate(home, "wallet", NO_DOCS).success  # the owner said 2099 is plausible...
    # ... but aggregate still refuses a future as-of, with --force past the gate too.
    with pytest.raises(AggregateError, match="the last event is dated 2099-01-01 00:00:00, in the future"):
        aggregate(home, "wallet", AggregateConfig(force=True))
    with pytest.raises(DefinitionError, match="window bound 'soon'"):
        definition('["2000-01-01", "soon"]')


def test_future_as_of_is_refused(home, tmp_path):
    ingest(home, definition(), IngestConfig(write_tx(tmp_path / "v1", good_rows())))
    assert validate(home, "wallet", NO_DOCS).success
    with pytest.raises(AggregateError, match="--as-of 2099-01-01 00:00:00 is in the future"):
        aggregate(home, "wallet", AggregateConfig(as_of=datetime(2099, 1, 1)))
    assert aggregate(home, "wallet").as_of == datetime(2024, 3, 28, 3, 0)  # the last event


def test_coles_refuses_a_future_as_of(home, tmp_path):
    from producers.coles.config import ColesConfig, ColesError
    from producers.coles.records import read_records

    rows = good_rows()
    rows[0] = "1,2099-01-01 00:00,food,1.0"
    ingest(home, definition('["2000-01-01", "2100-01-01"]'), IngestConfig(write_tx(tmp_path / "v1", rows)))
    con = home.connect()
    try:
        with pytest.raises(ColesError, match="the last event is dated 2099-01-01 00:00:00, in the future"):
            read_records(con, definition(), ColesConfig())
    finally:
        con.close()


def test_pick_as_of_rules():
    first, last, now = datetime(2024, 1, 1), datetime(2024, 2, 1), datetime(2024, 3, 1)
    assert pick_as_of("d", None, first, last, ValueError, now=now) == last
    assert pick_as_of("d", now + timedelta(hours=23), first, last, ValueError, now=now)  # within the day's slack
    with pytest.raises(ValueError, match="in the future"):
        pick_as_of("d", now + timedelta(days=2), first, last, ValueError, now=now)
    with pytest.raises(ValueError, match="no events at or before"):
        pick_as_of("d", datetime(2023, 1, 1), first, last, ValueError, now=now)
    with pytest.raises(ValueError, match="has no events"):
        pick_as_of("d", None, None, None, ValueError, now=now)
