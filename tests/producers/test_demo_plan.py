"""The demo plan: on a CPU without fast bf16 the budget goes to the history read, not to fine-tuning."""
from __future__ import annotations

from producers.demo import plan


def test_the_cpu_plan_reads_more_history_instead_of_fine_tuning():
    cpu = plan("cpu")
    assert cpu.finetune is None and cpu.serialize_format == "compact"
    # int8 was measured and left out: it costs the linear probe 0.035 ROC-AUC (benchmarks/RESULTS.md)
    assert cpu.embed.quantize is None and cpu.embed.dtype == "float32"
    # a base model: the first third of its hidden states, the layers saved spent on history (early exit);
    # the compute, tokens x decoder layers run, stays within the old budget of 192 tokens x 30 layers
    from training.embed import resolve_layers

    chosen = resolve_layers(cpu.embed.layers, 31)
    assert max(chosen) <= 31 // 3 and cpu.embed.max_length * max(chosen) <= 192 * 30
    # 1024 tokens through 1:6 beat 512 through 1:10 on development users (+0.05) at the same AVX2 time
    assert cpu.embed.max_length >= 1024
    assert plan("gpu").embed.layers == "9:"  # fine-tuned: the paper's layers
    assert cpu.evaluate.workers == 0  # evaluate fits splits on every usable core
    assert cpu.evaluate.linear_probe  # both readers in the final table
    assert any("fine-tuning: skipped" in c for c in cpu.cuts) and any("compact" in c for c in cpu.cuts)


def test_the_gpu_plan_is_the_papers_run():
    gpu = plan("gpu")
    assert gpu.finetune is not None and gpu.finetune.epochs == 1 and gpu.serialize_format == "paper"
    assert gpu.embed.quantize is None and gpu.embed.max_length == 2048 and not gpu.cuts


def test_the_cpu_bf16_plan_spends_its_faster_matmuls_on_history_not_on_a_brief_fine_tune():
    """The old plan's 40-step fine-tune scored below the base model (benchmarks/RESULTS.md): the bf16 CPU
    embeds the base model like the AVX2 plan, in bf16, and reads more of each history than it."""
    from training.embed import resolve_layers

    bf16, cpu = plan("cpu-bf16"), plan("cpu")
    assert bf16.finetune is None and bf16.serialize_format == "compact"
    assert bf16.embed.checkpoint is None and bf16.embed.quantize is None and bf16.embed.dtype == "bfloat16"
    assert max(resolve_layers(bf16.embed.layers, 31)) <= 31 // 3
    assert bf16.embed.max_length > cpu.embed.max_length
    assert bf16.embed.max_length <= bf16.serialize_max_tokens  # texts are not cut shorter than it reads
    assert bf16.evaluate == cpu.evaluate
    assert any("fine-tuning: skipped" in c for c in bf16.cuts)
    assert any(f"{bf16.embed.max_length:,} tokens" in c and "bf16" in c and "compact" in c for c in bf16.cuts)
