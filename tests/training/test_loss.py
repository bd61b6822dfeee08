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


@pytest.mark.parametrize("chunk", [None, 7])
def test_bf16_head_matmuls_keep_the_loss_and_gradients_of_float32(model, chunk):
    """`matmul_dtype=bfloat16` (finetune's --loss-dtype autocast): only the three head matmuls round to
    bf16 (8 bits of mantissa, relative error ~4e-3 per product), the log-sum-exp and sums stay float32,
    so the loss moves by well under 1% and every gradient keeps its direction (cosine > 0.999)."""
    ids, labels = batch()
    weight = bypass_lm_head(model)
    results = []
    for dtype in (None, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        loss = chunked_cross_entropy(model(input_ids=ids, use_cache=False).logits, weight, labels,
                                     chunk_tokens=chunk, matmul_dtype=dtype)
        loss.backward()
        assert loss.dtype == torch.float32
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    restore_lm_head(model)
    (exact, exact_grads), (bf16, bf16_grads) = results
    assert bf16 != exact  # the matmuls did run in bf16
    assert bf16 == pytest.approx(exact, rel=5e-3)
    for name, g in exact_grads.items():
        assert bf16_grads[name].dtype == g.dtype, name  # the weights' gradients stay float32
        cos = torch.nn.functional.cosine_similarity(bf16_grads[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.999, (name, cos.item())


def test_the_loss_dtype_needs_a_mixed_precision_run():
    from training.finetune import FinetuneError, loss_matmul_dtype

    assert loss_matmul_dtype("float32", "bf16") is None
    assert loss_matmul_dtype("autocast", "no") is None  # a float32 run (the CPU) has no other dtype to use
    assert loss_matmul_dtype("autocast", "bf16") is torch.bfloat16
    assert loss_matmul_dtype("autocast", "fp16") is torch.float16
    with pytest.raises(FinetuneError, match="float32 or autocast"):
        loss_matmul_dtype("bf16", "bf16")
