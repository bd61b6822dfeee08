"""CPU embedding speed: int8 dynamic quantization of a model's linear layers.

On a CPU without bf16 instructions (AVX2 only) the decoder's matrix products in float32 are the
embedding cost. Dynamic quantization (torch.ao) stores every `nn.Linear` weight as int8 (per
output channel) and quantizes activations on the fly per batch, so the products run in int8
through FBGEMM; the embeddings, RMSNorm and attention softmax stay in float32, and the hidden
states the pooling reads are float32 as before. Measured in benchmarks/embed_int8.py: speed
against the plain transformers loop, cosine to the float32 vectors, and the downstream metric.

Only for the CPU: CUDA has no dynamic-quantized kernels (and bf16 is faster there).
"""
from __future__ import annotations

from typing import Any

from training.embed import EmbedError

QUANTIZE = ("int8",)


class QuantizeError(EmbedError):
    """The model cannot be quantized as asked (an unknown scheme, not on the CPU, not float32)."""


def quantize_for_cpu(model: Any, scheme: str, device: Any) -> Any:
    """`model` with its linear layers in int8 (a new module; `model` itself is left as it was)."""
    import torch

    if scheme not in QUANTIZE:
        raise QuantizeError(f"quantization {scheme!r}: expected one of {', '.join(QUANTIZE)}")
    if getattr(device, "type", str(device)) != "cpu":
        raise QuantizeError(f"int8 dynamic quantization runs on the CPU only, not on {device}")
    if next(model.parameters()).dtype != torch.float32:
        raise QuantizeError("int8 dynamic quantization starts from float32 weights: use --dtype float32")
    engines = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm"):  # x86 picks FBGEMM or oneDNN per operator
        if engine in engines:
            torch.backends.quantized.engine = engine
            break
    # The embedding table (and a tied LM head, absent from the bare decoder) stays float32:
    # only nn.Linear is quantized.
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)
