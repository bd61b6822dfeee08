"""The Accelerator a run gets: its precision, a fresh process-wide state when that changes, and the
multi-process setups refused before they train something else than asked."""
from __future__ import annotations

from typing import Any

from training.finetune.config import FinetuneConfig, FinetuneError


def auto_precision(config: FinetuneConfig, device: Any) -> str:
    """`auto`: bf16 autocast on a GPU with bf16 tensor cores, float32 elsewhere. On an older GPU (V100,
    T4) bf16 is only emulated; fp16 would be fast there but needs loss scaling, which this loop has
    never been run with on such a GPU, so `auto` does not pick it (`FinetuneConfig(precision="fp16")` does)."""
    from producers.shared.devices import native_bf16

    if config.precision != "auto":
        return config.precision
    return "bf16" if native_bf16(device) else "no"


def fresh_accelerator_state(on_cpu: bool, mixed_precision: str) -> None:
    """Forget accelerate's process-wide state when this run needs another device or precision.

    accelerate keeps one state per process: once an Accelerator exists, a later one asking for
    another mixed precision raises ValueError ("AcceleratorState has already been initialized"), and
    one asking for the GPU after a CPU run silently stays on the CPU. So a second `finetune` in the
    same process (the CUDA test trains on the CPU, then on the GPU; a notebook) would fail or train
    on the wrong device. Single process only: a launched job keeps its state (one config per job).
    """
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if not state or PartialState._shared_state.get("num_processes", 1) != 1:
        return
    was_cpu = getattr(state.get("device"), "type", "cpu") == "cpu"
    if was_cpu != on_cpu or state.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=True)


def precision_text(accelerator) -> str:
    mp = str(accelerator.mixed_precision)
    return "float32" if mp == "no" else f"{mp} autocast (float32 master weights)"


def require_process_group(accelerator) -> None:
    """A launcher started N processes, so accelerate must have joined them into one job of N.

    `accelerate launch --use_fsdp` (or `--multi_gpu`) on a machine without GPUs starts the processes but
    can set each up alone (distributed type NO, process 0 of 1; seen with a bare `Accelerator()`): every
    one would train the whole run by itself, into the same folder. Refused, with what works on CPUs."""
    from training.hardware import Ranks

    launched = Ranks.from_env().world_size
    if launched > 1 and accelerator.num_processes != launched:
        raise FinetuneError(
            f"started as {launched} processes (WORLD_SIZE), but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}): each would train the whole run alone. An FSDP or multi-GPU "
            "accelerate config needs GPUs; on CPUs launch with `torchrun --nproc-per-node N`")


def refuse_fsdp_partial(accelerator, config: FinetuneConfig) -> None:
    """FSDP shards parameters: clipping would use a shard-local norm for the frozen/LoRA mix and the
    LoRA merge would run on a sharded model. Refuse rather than train something else than asked."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and (config.lora_r or config.trainable_layers):
        what = "LoRA (--lora-r)" if config.lora_r else "partial fine-tuning (--trainable-layers)"
        raise FinetuneError(f"{what} is not supported under FSDP: run it with DDP (`accelerate launch` without an "
                            "FSDP config, or torchrun), or drop the option for full fine-tuning under FSDP")
