"""The next-token loss without a (batch, seq, vocab) float32 copy of the logits.

transformers' causal-LM loss upcasts the full logits to float32, and accelerate's mixed-precision
wrapper upcasts the returned logits once more: for 16k tokens that is about 3 GB extra with
SmolLM2's 49k vocabulary and 8 GB with Llama 3's 128k. Here the LM head is bypassed in the
model's forward (`bypass_lm_head`: the model then returns its final hidden states where the
logits were), and `chunked_cross_entropy` computes the loss and its gradient chunk by chunk of
target tokens, so only one chunk of logits exists at a time, and padding positions get no
logits at all. The result is the model's own loss (mean over the real target tokens) up to
float rounding.

torch is imported inside functions only.
"""
from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**27  # logits per chunk (512 MB in float32)


def bypass_lm_head(model: Any) -> Any | None:
    """Make the LM head of `model` (a transformers causal LM, or a peft wrapper of one) return its input,
    so the forward returns hidden states instead of logits; return the head's weight, or None (and
    change nothing) when the head is not a plain bias-free Linear. The module and its weight stay
    in place, so state dicts, saving and tying are untouched."""
    import torch

    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    head.forward = _identity  # instance attribute: nn.Module.__call__ finds it first
    return head.weight


def restore_lm_head(model: Any) -> None:
    head = model.get_output_embeddings()
    if head is not None and head.__dict__.get("forward") is _identity:
        del head.forward


def _identity(x):
    return x


def chunked_cross_entropy(hidden: Any, weight: Any, labels: Any, chunk_tokens: int | None = None,
                          matmul_dtype: Any = None) -> Any:
    """Mean cross-entropy of `labels[:, 1:]` given `hidden[:, :-1]` through the LM head `weight`,
    skipping IGNORE_INDEX targets; the same value as transformers' causal-LM loss.

    `matmul_dtype` (e.g. torch.bfloat16): the head's three matmuls (logits, both gradients) run in it, as
    autocast runs the model's other Linears; the log-sum-exp, the loss sum and the weight gradient's
    accumulation stay float32. None: in the inputs' dtype (float32 master weights: TF32 on CUDA)."""
    h = hidden[:, :-1]
    y = labels[:, 1:].to(h.device)
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]
    if y.numel() == 0:
        return hidden.sum() * 0.0
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _ChunkedCrossEntropy.apply(h, weight, y, chunk, matmul_dtype)


def _chunked_cross_entropy_autograd():
    import torch

    class ChunkedCrossEntropy(torch.autograd.Function):
        """Forward computes the loss and both gradients chunk by chunk (softmax - one-hot), so no
        chunk's logits are kept for the backward; backward only scales what forward stored."""

        @staticmethod
        def forward(ctx, h, w, y, chunk, matmul_dtype):
            n = h.shape[0]
            wm = w if matmul_dtype is None else w.to(matmul_dtype)  # cast once, not per chunk
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for a in range(0, n, chunk):
                hc, yc = h[a:a + chunk], y[a:a + chunk]
                if matmul_dtype is not None:
                    hc = hc.to(matmul_dtype)
                logits = (hc @ wm.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
                if need_h or need_w:
                    g = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place of the logits
                    g[torch.arange(len(yc), device=g.device), yc] -= 1.0
                    g = g.to(hc.dtype)
                    if need_h:
                        grad_h[a:a + chunk] = g @ wm.to(g.dtype)  # stored in h's dtype
                    if need_w:
                        grad_w += (g.t() @ hc).float()
                del logits
            ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
            ctx.need, ctx.n, ctx.w_dtype = (need_h, need_w), n, w.dtype
            return total / n

        @staticmethod
        def backward(ctx, grad_out):
            saved = list(ctx.saved_tensors)
            scale = grad_out / ctx.n
            grad_h = grad_w = None
            if ctx.need[0]:
                stored = saved.pop(0)
                grad_h = stored * scale.to(stored.dtype)
            if ctx.need[1]:
                grad_w = (saved.pop(0) * scale).to(ctx.w_dtype)
            return grad_h, grad_w, None, None, None

    return ChunkedCrossEntropy


class _Lazy:
    """The autograd Function, built on first use so importing this module does not import torch."""

    _fn = None

    @classmethod
    def apply(cls, *args):
        if cls._fn is None:
            cls._fn = _chunked_cross_entropy_autograd()
        return cls._fn.apply(*args)


_ChunkedCrossEntropy = _Lazy
