"""One error root (producers.errors.Llm4esError) and one place that maps it to a message and an exit code."""
from __future__ import annotations

import importlib

import pytest

import producers.pipeline
from producers.errors import Llm4esError
from tests.cli.conftest import assert_clean_exit_1

ROOTS = [
    ("producers.stores.cache", "FetchError", RuntimeError),
    ("producers.datasets.definition", "DefinitionError", ValueError),
    ("producers.ingest.run", "IngestError", RuntimeError),
    ("producers.ingest.source_files", "SourceError", FileNotFoundError),
    ("producers.shared.mixture", "MixtureError", ValueError),
    ("training.embed.config", "EmbedError", ValueError),
    ("producers.coles.config", "ColesError", ValueError),
    ("producers.sessions.config", "SessionsError", RuntimeError),
    ("producers.intents.config", "IntentsError", RuntimeError),
    ("producers.publish", "PublishError", ValueError),
    ("training.evaluate.run", "EvaluateError", ValueError),
    ("training.finetune.config", "FinetuneError", ValueError),
    ("producers.serialize.run", "SerializeError", ValueError),
    ("producers.stores.warehouse", "WarehouseError", RuntimeError),
    ("producers.enrich.base", "EnrichError", RuntimeError),
    ("validation.gate", "ValidationGateError", RuntimeError),
    ("producers.synthetic.clickstream", "ClickstreamError", ValueError),
]


@pytest.mark.parametrize("module, name, builtin", ROOTS, ids=[name for _, name, _ in ROOTS])
def test_every_error_root_is_an_llm4es_error_and_keeps_its_builtin_base(module, name, builtin):
    error = getattr(importlib.import_module(module), name)
    assert issubclass(error, Llm4esError) and issubclass(error, builtin)
    assert error("x").exit_code == 1 and str(error("x")) == "x"


def test_an_llm4es_error_prints_its_redacted_message_and_exits_with_its_code(llm4es, monkeypatch):
    class Refused(Llm4esError):
        exit_code = 3

    def refuse(self, model=None):
        raise Refused("cannot reach http://alice:s3cret@models.example/v1 for the model")

    monkeypatch.setattr(producers.pipeline.Pipeline, "fetch", refuse)
    result = llm4es("fetch")
    assert result.exit_code == 3 and isinstance(result.exception, SystemExit), result.output
    assert "error: cannot reach" in result.output and "for the model" in result.output
    assert "s3cret" not in result.output and "Traceback" not in result.output


def test_a_synth_clicks_error_is_a_clean_exit_1(llm4es, tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    result = llm4es("synth-clicks", tmp_path / "taken" / "clicks")
    assert_clean_exit_1(result)
    assert "error:" in result.output
