"""`training.loss`: the chunked next-token loss equals transformers' own, value and gradients."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from training.loss import bypass_lm_head, chunked_cross_entropy, restore_lm_head  # noqa: E402


@pytest.fixture
def model():
    from tests.fixtures.tiny_model import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=300)
    config.tie_word_embeddings = True
    return LlamaForCausalLM(config).train()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (3, 20), generator=g)
    labels = ids.clone()
    labels[0, 15:] = -100  # right padding
    labels[1, :1] = -100
    labels[2, 7] = -100  # a packed text's first token
    return ids, labels


@pytest.mark.parametrize("chunk", [None, 7])
def test_chunked_loss_and_gradients_equal_the_models_own(model, chunk):
    ids, labels = batch()
    reference = model(input_ids=ids, labels=labels, use_cache=False).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    weight = bypass_lm_head(model)
    assert weight is model.model.embed_tokens.weight  # tied: the head's weight is the embedding
    hidden = model(input_ids=ids, use_cache=False).logits
    assert hidden.shape == (3, 20, model.config.hidden_size)  # no (batch, seq, vocab) logits
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)
    restore_lm_head(model)
    assert model(input_ids=ids).logits.shape[-1] == 300


def test_a_frozen_head_gets_no_gradient(model):
    ids, labels = batch()
    model.requires_grad_(False)
    model.model.layers[-1].requires_grad_(True)
    weight = bypass_lm_head(model)
    loss = chunked_cross_entropy(model(input_ids=ids, use_cache=False).logits, weight, labels)
    loss.backward()
    assert weight.grad is None and model.model.layers[-1].mlp.up_proj.weight.grad is not None
