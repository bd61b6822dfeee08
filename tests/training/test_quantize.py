"""int8 dynamic quantization for CPU embedding: linear layers become int8, vectors stay close."""
from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.tiny_model import save_tiny_model, tiny_tokenizer
from training.embed import EmbedConfig, EmbedError, Embedder
from training.quantize import QuantizeError, quantize_for_cpu

TEXTS = ["the cat sat on the mat with the hat", "a dog", "in the beginning there was the word, and more words"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-int8"), tiny_tokenizer(), seed=0)


def test_int8_replaces_every_linear_layer_and_keeps_vectors_close(model_dir):
    import torch

    fp32 = Embedder.load(str(model_dir), str(model_dir), EmbedConfig(layers="1:", dtype="float32", device="cpu"))
    int8 = Embedder.load(str(model_dir), str(model_dir),
                         EmbedConfig(layers="1:", dtype="float32", device="cpu", quantize="int8"))
    assert not any(type(m) is torch.nn.Linear for m in int8.base.modules())
    assert any(type(m) is torch.nn.Linear for m in fp32.base.modules())  # the original is untouched
    a, b = fp32.encode(TEXTS).vectors, int8.encode(TEXTS).vectors
    assert int8._sum is not None  # the layer-sum hooks still attach to the quantized decoder
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.98 and not np.allclose(a, b, atol=1e-7)  # close, and really quantized
    fp32.close()
    int8.close()


def test_int8_is_refused_off_the_cpu_or_from_half_precision(model_dir):
    import torch

    emb = Embedder.load(str(model_dir), str(model_dir), EmbedConfig(layers="1:", dtype="bfloat16", device="cpu"))
    with pytest.raises(QuantizeError, match="starts from float32"):
        quantize_for_cpu(emb.base, "int8", torch.device("cpu"))
    with pytest.raises(QuantizeError, match="CPU only"):
        quantize_for_cpu(emb.base, "int8", torch.device("cuda"))
    with pytest.raises(EmbedError, match="expected one of int8"):  # an EmbedError: the CLI says it in one line
        quantize_for_cpu(emb.base, "int4", torch.device("cpu"))
