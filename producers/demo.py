"""What `llm4es demo` runs, sized to the machine: the settings of every stage, chosen once.

The demo must finish in about 20 minutes on a 2-core CPU, so on a CPU it cuts the two LLM stages
(and says so in its output); on a GPU it runs them as the paper does. Three hardware classes:

- `gpu`: full fine-tuning in bf16 for one epoch of the template mixture, texts up to 2048
  tokens; embeddings in bf16 from 2048 tokens.
- `cpu-bf16` (a CPU with AMX or AVX512-BF16, where bf16 matmuls run ~3-4x faster than fp32):
  full fine-tuning with bf16 autocast for a fixed number of steps on texts cut to their last 512
  tokens; embeddings in bf16 from the same 512 tokens.
- `cpu` (no fast bf16, e.g. an AVX2-only 2-core CPU): the budget goes where the quality comes from,
  the history the model reads. The old plan spent ~130 s on 24 steps of the top 4 blocks and
  ~700 s embedding the last 256 tokens of the paper's lines (about 6 ratings a user): 0.610 gender
  ROC-AUC, where the base model reading a user's last 1,024 tokens reaches about 0.69-0.70
  (issue 16's reference). So this plan does not fine-tune, serializes in the compact format
  (about twice the events per token on ratings) and embeds each user's last 192 tokens in fp32
  (~9 ratings a user instead of 6), sized so the whole demo fits 20 minutes with margin on the
  slowest AVX2-only CPU measured (see the comment in `plan`). int8 linear layers
  (`embed --quantize int8`) were measured and left out: 1.25x faster on AVX2, but 0.035 lower
  linear-probe ROC-AUC, paired over the same folds (benchmarks/RESULTS.md). Not yet timed end to end on a quiet AVX2-only machine.

Every plan is evaluated by both readers (LightGBM and the linear probe), so the final table has
a `(linear)` row per feature set.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from producers.enrich.run import EnrichConfig
from training.embed import EmbedConfig
from training.evaluate import EvaluateConfig
from training.finetune import FinetuneConfig

DEMO_FEATURES = ("agg", "coles", "llm4es", "coles+llm4es", "coles+agg")


@dataclass(frozen=True)
class DemoPlan:
    hardware: str  # gpu | cpu-bf16 | cpu
    serialize_max_tokens: int
    enrich: EnrichConfig
    finetune: FinetuneConfig | None  # None: embed the base model (no fine-tuning on this hardware)
    embed: EmbedConfig
    evaluate: EvaluateConfig
    cuts: list[str] = field(default_factory=list)  # what this plan leaves out compared with the paper's run
    serialize_format: str = "paper"  # "compact" where the budget is tokens read, not the paper's layout


def detect_hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return "gpu"
    cpu = getattr(torch, "cpu", None)
    fast_bf16 = any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return "cpu-bf16" if fast_bf16 else "cpu"


def plan(hardware: str, model: str = "smollm2-135m", seed: int = 0) -> DemoPlan:
    run_name = "demo"
    enrich = EnrichConfig(enricher="template", variants=7, seed=seed)
    evaluate = EvaluateConfig(features=DEMO_FEATURES, cv_repeats=3, seed=seed)
    if hardware == "gpu":
        return DemoPlan(
            hardware, 2048, enrich,
            FinetuneConfig(model=model, mixture="template:7", epochs=1, batch_size=8, max_length=2048,
                           precision="bf16", seed=seed, run_name=run_name),
            EmbedConfig(model=model, max_length=2048, dtype="bfloat16"), evaluate)
    if hardware == "cpu-bf16":
        steps, batch, length = 40, 4, 512
        return DemoPlan(
            hardware, 2048, enrich,
            FinetuneConfig(model=model, mixture="template:7", max_steps=steps, batch_size=batch, max_length=length,
                           warmup_steps=4, lr=1e-4, precision="bf16", seed=seed, run_name=run_name),
            EmbedConfig(model=model, max_length=length, dtype="bfloat16"), evaluate,
            cuts=[f"fine-tuning: {steps} steps of {batch} texts ({steps * batch} of the mixture's 6,601 texts, "
                  f"under a tenth of an epoch), each cut to its last {length} tokens, bf16 autocast",
                  f"embedding: each text's last {length} tokens (the paper uses up to 2048), bf16"])
    # AVX2-only 2-core budget (benchmarks/RESULTS.md, "Issue 16, continued"): on the slowest such CPU
    # measured (345 tokens/s fp32) the other stages take ~500 s (ingest..aggregate ~80, CoLES ~165,
    # publish ~10, evaluate ~240 with both cores), which leaves ~520 s of embedding for 20 minutes with
    # a 15% margin: 943 users x 192 tokens. Reading 128 vs 320 compact tokens moved the linear probe
    # by +0.004 ROC-AUC (LightGBM +0.036), so the cut from 320 costs little of what it saves.
    length = 192
    return DemoPlan(
        hardware, 2048, enrich, None,
        EmbedConfig(model=model, max_length=length, dtype="float32"), evaluate,
        cuts=["fine-tuning: skipped (this CPU has no fast bf16; its minutes buy more history read instead): "
              "LLM4ES is the base model, as in the paper's no-fine-tuning ablation",
              f"embedding: each text's last {length} tokens (the paper uses up to 2048), in the compact format "
              "(a date per day, runs collapsed: about twice the events per token of the paper's lines), fp32"],
        serialize_format="compact")
