"""The model being trained (full, top layers only, or LoRA), its optimizer, and the loss of one batch."""
from __future__ import annotations

from training.finetune.config import FinetuneConfig, FinetuneError, Log


def build_model(model_path: str, config: FinetuneConfig, say: Log):
    import torch

    from producers.shared.models import load_causal_lm

    model = load_causal_lm(model_path, dtype=torch.float32)  # fp32 master weights; autocast does bf16
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora_r:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha or 2 * config.lora_r, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    elif config.trainable_layers is not None:
        decoder = model.get_decoder()
        layers, norm = decoder.layers, getattr(decoder, "norm", None)
        if config.trainable_layers > len(layers) or norm is None:
            raise FinetuneError(f"trainable_layers={config.trainable_layers}: the model has {len(layers)} decoder "
                                f"blocks{'' if norm is not None else ' and no final norm named `norm`'}")
        model.requires_grad_(False)
        for module in [*layers[-config.trainable_layers:], norm]:
            module.requires_grad_(True)
    return model.train()


def make_optimizer(model, config: FinetuneConfig, fused: bool = False):
    """AdamW, decay on matrices only; `fused` (one kernel for all parameters) on CUDA."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(config.beta1, config.beta2),
                             **({"fused": True} if fused else {}))


def count_trainable(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} of {total:,} parameters trained"


def training_loss(model, batch: dict, head_weight=None, head_dtype=None):
    """The loss of one collated batch: the forward every training step makes.

    `use_cache=False` is what keeps packed texts apart: without a cache, transformers reads the
    restarting position ids as separate documents and builds a block-diagonal mask; with one it
    assumes one sequence per row and packed texts attend to each other (tests fail if it goes).
    With `head_weight` (the model's LM head bypassed by `training.loss.bypass_lm_head`) the
    forward returns hidden states and the loss is computed chunk by chunk from them, its matmuls in
    `head_dtype` (None: the hidden states' dtype).
    """
    if head_weight is None:
        return model(**batch, use_cache=False).loss
    from training.loss import chunked_cross_entropy

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model(**inputs, use_cache=False).logits  # the bypassed head returns its input
    return chunked_cross_entropy(hidden, head_weight, batch["labels"], matmul_dtype=head_dtype)


def loss_matmul_dtype(loss_dtype: str, mixed_precision: str):
    """The torch dtype of the chunked loss's matmuls: None (float32, the master weights' dtype) unless
    `loss_dtype` is "autocast" and the run has a mixed precision (bf16 or fp16) to use."""
    import torch

    if loss_dtype not in ("float32", "autocast"):
        raise FinetuneError(f"loss_dtype {loss_dtype!r}: expected float32 or autocast")
    mp = str(mixed_precision)
    if loss_dtype == "float32" or mp not in ("bf16", "fp16"):
        return None
    return torch.bfloat16 if mp == "bf16" else torch.float16


def chunked_head(model, accelerator, config: FinetuneConfig):
    """The LM head's weight when the chunked loss applies (not under FSDP, whose sharded weights are
    only whole inside the wrapped forward), else None and the model's own loss."""
    from accelerate.utils import DistributedType

    from training.loss import bypass_lm_head

    if not config.chunked_loss or accelerator.distributed_type == DistributedType.FSDP:
        return None
    return bypass_lm_head(model)
