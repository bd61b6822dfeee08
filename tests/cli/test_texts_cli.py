"""`llm4es serialize` and `enrich` through the CLI, with a tiny local model folder as --model."""
from __future__ import annotations

import pytest

from tests.cli.conftest import assert_clean_exit_1
from tests.fixtures.tiny_model import save_tiny_model, trained_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = trained_tokenizer(["1997-10-05 14:02, Toy Story, 1995, Animation, Children's, Comedy, 4"] * 30, 350)
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), tok)


def test_serialize_refuses_unvalidated_data_then_writes_texts(llm4es, grouplens, model_dir):
    assert llm4es("ingest", "movielens-100k", "--source", grouplens).exit_code == 0
    refused = llm4es("serialize", "movielens-100k", "--model", model_dir)
    assert_clean_exit_1(refused)
    assert "has not been validated" in refused.output and "--force" in refused.output
    enrich_refused = llm4es("enrich", "movielens-100k", "--tokenizer", model_dir)
    assert_clean_exit_1(enrich_refused)

    assert llm4es("validate", "movielens-100k", "--no-data-docs").exit_code == 0
    result = llm4es("serialize", "movielens-100k", "--model", model_dir, "--max-tokens", "300")
    assert result.exit_code == 0, result.output
    assert "12 texts" in result.output and "header: Date | Title | Year | Genres | Rating" in result.output


def test_enrich_needs_serialized_texts_first(llm4es, grouplens, model_dir):
    assert llm4es("ingest", "movielens-100k", "--source", grouplens).exit_code == 0
    assert llm4es("validate", "movielens-100k", "--no-data-docs").exit_code == 0
    result = llm4es("enrich", "movielens-100k", "--tokenizer", model_dir)
    assert_clean_exit_1(result)
    assert "run `llm4es serialize movielens-100k` first" in result.output


def test_enrich_openai_backend_needs_an_endpoint(llm4es):
    result = llm4es("enrich", "movielens-100k", "--enricher", "llm", "--llm-backend", "openai")
    assert result.exit_code == 2 and "--endpoint" in result.output
