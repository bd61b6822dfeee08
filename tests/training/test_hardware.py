"""`training.hardware`: the GPU peak table and the FLOPs-per-token convention behind every MFU figure."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from producers.shared.devices import native_bf16  # noqa: E402
from training.hardware import model_flops_per_token, peak_flops  # noqa: E402


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
    ("Some Other GPU", None),
])
def test_peak_is_read_from_the_name_cuda_reports(monkeypatch, name, peak):
    """The names as torch.cuda.get_device_name() gives them; the more specific name wins (H200 NVL is
    not an H200 SXM, an L40 not an L4)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == (peak, name)
    assert peak_flops(torch.device("cpu")) == (None, "cpu")


def test_flops_per_token_count_every_matmul_weight_once():
    """6N + attention for training, 2N + attention for a forward, N = the decoder's and the LM head's
    Linear weights (grouped-query k/v included), counted here from a real model rather than by formula."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=12)  # head_dim != hidden/heads
    model = LlamaForCausalLM(config)
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    n_head = model.lm_head.weight.numel()
    context = 100.0
    attention = 2 * 2 * 3 * 6 * 12 * context  # QK^T and AV: layers x heads x head_dim x mean context, x2 FLOPs
    assert model_flops_per_token(config, context, training=True) == 6 * n + 3 * attention
    assert model_flops_per_token(config, context, training=False) == 2 * n + attention
    assert model_flops_per_token(config, context, training=False, lm_head=False) == 2 * (n - n_head) + attention


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine that says it has two GPUs; `set_device` records instead of touching CUDA."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LLM4ES_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    return chosen


def test_a_named_gpu_becomes_the_current_one_in_a_single_process(two_gpus):
    """accelerate places a single process's model on a bare `cuda`, the current GPU: without this,
    `finetune --device cuda:1` trained on GPU 0."""
    from training.hardware import select_named_gpu

    for device in ("auto", "cpu", "cuda"):
        select_named_gpu(device)
    assert two_gpus == []
    select_named_gpu("cuda:1")
    assert two_gpus == [torch.device("cuda", 1)]


def test_a_named_gpu_is_refused_in_a_launched_job(two_gpus, monkeypatch):
    from training.hardware import select_named_gpu

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        select_named_gpu("cuda:1")
    assert two_gpus == []


@pytest.mark.parametrize("capability, dtype, precision", [((7, 0), "float16", "no"), ((7, 5), "float16", "no"),
                                                         ((8, 0), "bfloat16", "bf16"), ((9, 0), "bfloat16", "bf16")])
def test_auto_takes_bf16_only_where_the_gpu_has_bf16_tensor_cores(monkeypatch, capability, dtype, precision):
    """A V100 (7.0) or T4 (7.5) only emulates bf16, and torch.cuda.is_bf16_supported() still says yes:
    there embedding takes float16 and fine-tuning float32; an A100 (8.0) or H100 (9.0) takes bf16."""
    from training.embed import pick_dtype
    from training.finetune import FinetuneConfig
    from training.finetune.accelerator import auto_precision

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert native_bf16(gpu) == (capability >= (8, 0)) and not native_bf16(cpu)
    assert pick_dtype("auto", gpu) == getattr(torch, dtype) and pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("float32", gpu) == torch.float32  # a given dtype is kept
    assert auto_precision(FinetuneConfig(), gpu) == precision and auto_precision(FinetuneConfig(), cpu) == "no"
    assert auto_precision(FinetuneConfig(precision="fp16"), gpu) == "fp16"
