"""Credentials in endpoint URLs never reach a record or a message (issue 11, point 3)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from producers.enrich.options import LLMOptions
from producers.redact import redact_text, redact_url, redacted
from producers.stores.texts import config_json


@pytest.mark.parametrize("url, shown", [
    ("https://api.example.com/key-sk-abc123/v1", "https://api.example.com/***/v1"),
    ("https://api.example.com/v1/sk-proj-Abc", "https://api.example.com/v1/***"),
    ("https://user:pass@host:8080/v1", "https://***@host:8080/v1"),
    ("https://token@host/v1", "https://***@host/v1"),
    ("http://h/v1?api_key=SEC&x=1&key=K", "http://h/v1?api_key=***&x=1&key=***"),
    ("http://h/v1?access_token=SEC", "http://h/v1?access_token=***"),
    ("https://h/AbCdEfGh1234567890abcdefXYZ/v1", "https://h/***/v1"),  # a long key-like segment
    # Nothing secret: unchanged.
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
    ("https://h/openai/deployments/gpt-4o-mini/v1?api-version=2024-02-01",
     "https://h/openai/deployments/gpt-4o-mini/v1?api-version=2024-02-01"),
    ("https://monkey.example.com/keys/v1", "https://monkey.example.com/keys/v1"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_redact_text_keeps_the_message_and_its_punctuation():
    text = "error: https://u:p@h/v1/chat/completions: all failed (see http://x/key-1/v1)."
    assert redact_text(text) == "error: https://***@h/v1/chat/completions: all failed (see http://x/***/v1)."
    assert redact_text("no url here: key-123") == "no url here: key-123"


def test_recorded_configs_are_redacted():
    @dataclass(frozen=True)
    class Config:
        llm: LLMOptions

    config = Config(LLMOptions(backend="openai", endpoint="https://bob:hunter2@h/key-sk-XYZ/v1?api_key=SEC"))
    recorded = config_json(config)
    assert "hunter2" not in recorded and "sk-XYZ" not in recorded and "SEC" not in recorded
    assert json.loads(recorded)["llm"]["endpoint"] == "https://***@h/***/v1?api_key=***"
    assert redacted({"a": ["http://h?token=1", 2], "b": ("x",)}) == {"a": ["http://h?token=***", 2], "b": ("x",)}


def test_intent_configs_are_redacted():
    from producers.intents.config import DistillConfig, LabelConfig, TaxonomyConfig

    llm = LLMOptions(backend="openai", endpoint="https://h/key-sk-XYZ/v1")
    for cls in (TaxonomyConfig, LabelConfig, DistillConfig):
        assert cls(llm=llm).as_dict()["llm"]["endpoint"] == "https://h/***/v1"
