import duckdb
import pytest

from producers.shared.mixture import Mixture, MixtureError, check_available


def test_parse_and_print():
    m = Mixture.parse("serialized:1, template:7")
    assert (m.serialized, m.template, m.llm) == (1, 7, 0) and str(m) == "serialized:1,template:7"
    for bad in ("raw:1", "template", "template:x", "template:0"):
        with pytest.raises(MixtureError):
            Mixture.parse(bad)


def test_selects_the_asked_variants_and_names_what_is_missing():
    con = duckdb.connect()
    con.execute("CREATE SCHEMA d; CREATE TABLE d.texts AS SELECT * FROM (VALUES "
                "(1, 'serialized', 0), (1, 'template', 0), (1, 'template', 1), (1, 'template', 2), (1, 'llm', 0)) "
                "t(user_id, kind, variant)")
    assert check_available(con, "d", Mixture.parse("template:2,llm:1")) == {"template": 2, "llm": 1}
    with pytest.raises(MixtureError, match="needs 7 template .* has 3: run `llm4es enrich --enricher template"):
        check_available(con, "d", Mixture.parse("template:7"))
