"""`enrich --enricher llm` against an endpoint that fails every request (issue 11, points 3 and 8):
the run says so, fails past --max-fallback-share writing nothing, marks the fallback rows when
they are accepted, prints its timeouts, and never prints or stores the key in the endpoint URL."""
from __future__ import annotations

import duckdb
import pytest

from tests.cli.conftest import assert_clean_exit_1
from tests.fixtures.tiny_model import save_tiny_model, trained_tokenizer
from tests.producers.test_llm_enricher import FakeServer

SECRET = "sk-live-SECRET4242"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = trained_tokenizer(["1997-10-05 14:02, Toy Story, 1995, Animation, Children's, Comedy, 4"] * 30, 350)
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), tok)


def keyed(endpoint: str) -> str:
    """The fake server's endpoint with a key in the path, in the user-info and in the query."""
    scheme, rest = endpoint.split("://")
    host, path = rest.split("/", 1)
    return f"{scheme}://bob:{SECRET}@{host}/key-{SECRET}/{path}?api_key={SECRET}"


def llm_texts(tmp_path):
    con = duckdb.connect(str(tmp_path / "home" / "data" / "warehouse.duckdb"), read_only=True)
    try:
        return con.execute("SELECT format, fallback, config FROM movielens_100k.texts WHERE kind = 'llm'").fetchall()
    finally:
        con.close()


def test_all_failing_endpoint(llm4es, grouplens, model_dir, tmp_path):
    assert llm4es("ingest", "movielens-100k", "--source", grouplens).exit_code == 0
    assert llm4es("validate", "movielens-100k", "--no-data-docs").exit_code == 0
    assert llm4es("serialize", "movielens-100k", "--model", model_dir, "--max-tokens", "300").exit_code == 0

    with FakeServer(fail_first=10**6, max_requests=10**6) as server:
        args = ["enrich", "movielens-100k", "--enricher", "llm", "--llm-backend", "openai", "--variants", "1",
                "--endpoint", keyed(server.endpoint), "--tokenizer", model_dir, "--llm-model", "fake",
                "--retries", "0", "--concurrency", "2"]
        refused = llm4es(*args)
        assert_clean_exit_1(refused)
        # 12 users x 1 variant, every request answered 500.
        assert "12 of 12 llm texts (100%) would be template fallbacks" in refused.output
        assert "backend_error 12" in refused.output and "HTTP 500" in refused.output
        assert "--max-fallback-share" in refused.output and "Nothing was written" in refused.output
        assert "timeout 30 s x 1 attempt(s)" in refused.output  # the timeouts, printed at start
        assert llm_texts(tmp_path) == []

        accepted = llm4es(*args, "--max-fallback-share", "1")
        n_requests = len(server.requests)
    assert accepted.exit_code == 0, accepted.output
    assert n_requests == 24  # failed requests are not cached: the second run asked again
    assert "12 of 12 llm texts (100%) are template fallbacks" in accepted.output
    rows = llm_texts(tmp_path)
    assert len(rows) == 12 and all(fallback and fmt.startswith("fallback:") for fmt, fallback, _ in rows)

    for output in (refused.output, accepted.output):
        assert SECRET not in output
        assert "http://***@127.0.0.1" in output and "/***/v1/chat/completions?api_key=***" in output
    assert all(SECRET not in config and "***" in config for _, _, config in rows)
    parquet = tmp_path / "home" / "data" / "movielens_100k" / "texts.parquet"
    assert SECRET.encode() not in parquet.read_bytes()
    configs = duckdb.sql(f"SELECT DISTINCT config FROM '{parquet}' WHERE kind = 'llm'").fetchall()
    assert len(configs) == 1 and SECRET not in configs[0][0]


def test_template_and_serialized_rows_are_not_fallbacks(llm4es, grouplens, model_dir, tmp_path):
    assert llm4es("ingest", "movielens-100k", "--source", grouplens).exit_code == 0
    assert llm4es("validate", "movielens-100k", "--no-data-docs").exit_code == 0
    assert llm4es("serialize", "movielens-100k", "--model", model_dir, "--max-tokens", "300").exit_code == 0
    result = llm4es("enrich", "movielens-100k", "--variants", "2", "--tokenizer", model_dir)
    assert result.exit_code == 0, result.output
    con = duckdb.connect(str(tmp_path / "home" / "data" / "warehouse.duckdb"), read_only=True)
    rows = con.execute("SELECT kind, fallback, count(*) FROM movielens_100k.texts GROUP BY ALL ORDER BY 1").fetchall()
    con.close()
    assert rows == [("serialized", False, 12), ("template", False, 24)]
