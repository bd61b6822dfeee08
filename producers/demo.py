"""What `llm4es demo` runs, sized to the machine: the settings of every stage, chosen once (`plan`),
and the loop that runs them (`run_demo`).

The demo must finish in about 20 minutes on a 2-core CPU, so on a CPU it cuts the two LLM stages
(and says so in its output); on a GPU it runs them as the paper does. Three hardware classes:

- `gpu`: full fine-tuning in bf16 for one epoch of the template mixture, texts up to 2048
  tokens; embeddings in bf16 from 2048 tokens. (On a GPU without bf16 tensor cores, a V100 or T4,
  the `auto` choices train in float32 and embed in float16.)
- `cpu-bf16` (a CPU with AMX or AVX512-BF16, where bf16 matmuls run ~3-4x faster than fp32): the
  `cpu` plan's rule below with its faster matmuls spent on history: no fine-tuning (40 steps of
  4 texts, all that fitted, scored below the base model: 0.628 / 0.631 gender ROC-AUC against
  0.665 / 0.691), compact texts, hidden states 1:10, bf16, each user's whole text of up to 2048
  tokens (the paper's length). On 500 development users (base model, bf16, 1:10) 1024 tokens gave
  0.744 / 0.725 (probe / LightGBM) and 2048 tokens 0.778 / 0.732, against 0.699 / 0.687 at 512
  tokens in fp32 (benchmarks/RESULTS.md, h-cpubf16).
- `cpu` (no fast bf16, e.g. an AVX2-only 2-core CPU): the budget goes where the quality comes from,
  the history the model reads. The old plan spent ~130 s on 24 steps of the top 4 blocks and
  ~700 s embedding the last 256 tokens of the paper's lines (about 6 ratings a user): 0.610 gender
  ROC-AUC, where the base model reading a user's last 1,024 tokens reaches about 0.69-0.70
  (issue 16's reference). So this plan does not fine-tune, serializes in the compact format
  (about twice the events per token on ratings) and embeds each user's last 1024 tokens in fp32
  with hidden states 1:6 averaged (the first sixth of the base model's 30 layers: the embedder
  exits after layer 5, so 1024 tokens cost about what 512 through 9 layers or 192 through all 30
  did), sized so the whole demo fits 20 minutes with margin on the slowest AVX2-only CPU measured
  (see the comment in `plan`). int8 linear layers (`embed --quantize int8`) were measured and left
  out: 1.25x faster on AVX2, but 0.035 lower linear-probe ROC-AUC, paired over the same folds
  (benchmarks/RESULTS.md).

Every plan is evaluated by both readers (LightGBM and the linear probe), so the final table has
a `(linear)` row per feature set, and each ensemble also gets a `(stacked)` row: its members read
apart by both readers and late-fused (training/evaluate/fusion.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from producers.enrich.run import EnrichConfig
from producers.shared.models import DEFAULT_MODEL
from training.embed import EmbedConfig, resolve_layers
from training.evaluate import EvaluateConfig
from training.finetune import FinetuneConfig

if TYPE_CHECKING:
    from producers.pipeline import Pipeline

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
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    fast_bf16 = any(getattr(cpu, name, lambda: False)() for name in probes)
    return "cpu-bf16" if fast_bf16 else "cpu"


def plan(hardware: str, model: str = DEFAULT_MODEL, seed: int = 0) -> DemoPlan:
    run_name = "demo"
    enrich = EnrichConfig(enricher="template", variants=7, seed=seed)
    evaluate = EvaluateConfig(features=DEMO_FEATURES, cv_repeats=3, seed=seed)
    if hardware == "gpu":
        return DemoPlan(
            hardware, 2048, enrich,
            # batches sized to the GPU's memory (--batch-tokens auto), as gpu_check's quality run measures them
            # precision and dtype follow the GPU: bf16 where it has bf16 tensor cores (A100, L4, H100 ...)
            FinetuneConfig(model=model, mixture="template:7", epochs=1, max_length=2048, seed=seed,
                           run_name=run_name),
            EmbedConfig(model=model, max_length=2048), evaluate)
    if hardware == "cpu-bf16":
        # A CPU with fast bf16 (AMX or AVX512-BF16): the AVX2 plan's rule below, its ~3x faster matmuls spent
        # on more history. The old plan fine-tuned 40 steps x 4 texts (under a tenth of an epoch, ~250 s) and
        # embedded the paper's lines through 9:, 512 tokens: 0.628 / 0.631 gender ROC-AUC (LightGBM / linear)
        # in the demo, below the base model's 0.665 / 0.691 (benchmarks/RESULTS.md, "Plain `make demo` on this
        # host"); an epoch takes hours at ~320-490 training tokens/s, and every fine-tuning second is one less
        # of history read, so fine-tuning is dropped. Development users, base model, bf16, hidden states 1:10
        # (RESULTS.md, h-cpubf16): probe / LightGBM 0.744 / 0.725 at 1024 tokens, 0.778 / 0.732 at 2048 (every
        # compact text, serialize's budget), against 0.699 / 0.687 at 512 tokens in fp32. Budget on a 2-core
        # AMD EPYC with AVX512-BF16: embedding 943 users x up to 2048 tokens took 422 s (2,833 tokens/s) and the
        # other stages ~410 s (evaluate 304, CoLES 78), ~835 s in all: ~14 minutes of the demo's 20. 1024 tokens
        # would save ~190 s for 0.034 / 0.007 less. The same host on a slower day (2026-11-28: 1,811 tokens/s,
        # identical vectors) took 650 s to embed and 1,105 s in all, still inside the 20 minutes.
        return _base_model_plan(
            hardware, enrich, evaluate, model, length=2048, layers="1:10", dtype="bfloat16",
            why="this CPU's minutes buy more history read instead; a brief fine-tune scored below the base model")
    # AVX2-only 2-core budget (benchmarks/RESULTS.md, "Issue 16, continued"): on the slowest such CPU
    # measured (345 tokens/s fp32) the other stages take ~500 s (ingest..aggregate ~80, CoLES ~165,
    # publish ~10, evaluate ~240 with both cores), which leaves ~520 s of embedding for 20 minutes with
    # a 15% margin: 943 users x 192 tokens. Reading 128 vs 320 compact tokens moved the linear probe
    # by +0.004 ROC-AUC (LightGBM +0.036), so the cut from 320 costs little of what it saves.
    # Rule for a base (not fine-tuned) model: average the hidden states of the first third of the depth
    # (1:10 of 31), where a base LM's embeddings are at least as good as its last layers' (measured on
    # development users, MovieLens and the bank clickstream; Skean et al. 2025), and spend the layers
    # saved on history: 512 tokens x 9 layers <= 192 x 30. Development users (RESULTS.md, h-layers):
    # gender ROC-AUC 0.613 probe / 0.603 LightGBM at 192 tokens 9:, 0.699 / 0.687 at 512 tokens 1:10.
    # Then, with the same rule pushed one step (RESULTS.md, "Lead, 2026-11-28 (fifth session)"): on development
    # users 1024 tokens through 1:6 gave 0.754 / 0.736 against 0.698 / 0.688 for 512 through 1:10 (bf16, which
    # moved neither), and under AVX2 it embeds the 943 users in the same time (249 s against 245 s: 5 layers
    # instead of 9 pay for twice the tokens and their longer attention). The demo's repeated CV: 0.728 / 0.731
    # against 0.665 / 0.691. The fine-tuned (gpu) plan keeps the paper's 9:.
    return _base_model_plan(hardware, enrich, evaluate, model, length=1024, layers="1:6", dtype="float32",
                            why="this CPU has no fast bf16; its minutes buy more history read instead")


def _base_model_plan(hardware: str, enrich: EnrichConfig, evaluate: EvaluateConfig, model: str, length: int,
                     layers: str, dtype: str, why: str) -> DemoPlan:
    """The CPU plans: no fine-tuning, compact texts, each user's last `length` tokens through the base
    model's early layers (hidden states `layers`: the embedder exits after the last one chosen)."""
    last_run = max(resolve_layers(layers, 31))  # the default model's 30 layers + the embedding output
    precision = "bf16" if dtype == "bfloat16" else "fp32"
    budget = 2048  # serialize's token budget per user, the paper's
    read = (f"each text's last {length:,} tokens (the paper uses up to {budget:,})" if length < budget
            else f"each text whole (up to {budget:,} tokens, as the paper)")
    return DemoPlan(
        hardware, budget, enrich, None,
        EmbedConfig(model=model, max_length=length, dtype=dtype, layers=layers), evaluate,
        cuts=[f"fine-tuning: skipped ({why}): LLM4ES is the base model, as in the paper's no-fine-tuning ablation",
              f"embedding: {read}, in the compact format "
              f"(a date per day, runs collapsed: about twice the events per token of the paper's lines), {precision}, "
              f"hidden states {layers} (the base model's first {last_run} layers: "
              f"layers {last_run + 1}-30 are not run)"],
        serialize_format="compact")


class DemoDisplay(Protocol):
    """What shows the demo's progress (the CLI's printers.DemoPrinter prints it with rich)."""

    def start(self, dataset: str, hardware: str, cuts: list[str]) -> None: ...
    def step(self, i: int, steps: int, title: str, elapsed_s: float) -> None: ...
    def line(self, text: str, soft_wrap: bool = False) -> None: ...
    def validation(self, report: Any) -> None: ...
    def evaluation(self, result: Any) -> None: ...


@dataclass(frozen=True)
class DemoResult:
    validated: bool  # False: the dataset failed validation and the demo stopped after step 2
    evaluation: Any = None
    seconds: float = 0.0


def run_demo(p: Pipeline, dataset: str, demo_plan: DemoPlan, show: DemoDisplay) -> DemoResult:
    """The whole pipeline end to end with `demo_plan`'s settings, then one online read; `show` reports each step."""
    from dataclasses import replace

    from producers.coles import ColesConfig
    from producers.publish import PublishConfig

    t0 = time.perf_counter()
    steps = 12
    show.start(dataset, demo_plan.hardware, demo_plan.cuts)

    def step(i: int, title: str) -> None:
        show.step(i, steps, title, time.perf_counter() - t0)

    step(1, f"ingest {dataset}")
    r = p.ingest(dataset)
    show.line(f"{r.n_events:,} events, {r.n_users:,} users, {r.n_rejects:,} rejected rows"
              f"{' (unchanged source, reused)' if r.skipped else ''}")
    step(2, f"validate {dataset}")
    report = p.validate(dataset)
    show.validation(report)
    if not report.success:
        return DemoResult(validated=False, seconds=time.perf_counter() - t0)
    step(3, "serialize histories to text")
    s = p.serialize(dataset, demo_plan.embed.model, demo_plan.serialize_max_tokens, "readable",
                    fmt=demo_plan.serialize_format)
    show.line(f"{s.n_texts:,} texts from {s.n_events:,} of {s.n_events_total:,} events; {s.n_cut:,} users cut to "
              f"the {demo_plan.serialize_max_tokens}-token budget (largest text {s.max_tokens_seen:,} tokens)")
    step(4, "enrich: 7 template rewrites per user")
    e = p.enrich(dataset, demo_plan.enrich)
    show.line(f"{e.written:,} texts in {e.seconds:.1f}s; formats: "
              + ", ".join(f"{k} {v:,}" for k, v in sorted(e.by_format.items())))
    step(5, "aggregate features")
    a = p.aggregate(dataset)
    show.line(f"{a.n_users:,} users x {a.n_features} features as of {a.as_of}")
    if demo_plan.finetune is None:
        step(6, "fine-tune: skipped on this hardware (see the CPU budget above)")
        checkpoint = None
    else:
        step(6, f"fine-tune {demo_plan.finetune.model} on the {demo_plan.finetune.mixture} mixture")
        f = p.finetune(dataset, demo_plan.finetune)
        losses = f.losses
        show.line(f"{f.steps} steps, loss {losses[0]:.3f} -> {f.final_loss:.3f}, {f.tokens_per_second:,.0f} "
                  "tokens/s" if losses else f"{f.steps} steps")
        checkpoint = str(f.models[-1])
    step(7, f"embed every user with the {'base' if checkpoint is None else 'fine-tuned'} model")
    em = p.embed(dataset, replace(demo_plan.embed, checkpoint=checkpoint))
    for es in em.sets:
        show.line(f"{es.n_users:,} vectors of size {es.dim} from {es.checkpoint} at {es.tokens_per_s:,.0f} tokens/s")
    step(8, "CoLES embeddings (pytorch-lifestream)")
    c = p.coles(dataset, ColesConfig(seed=demo_plan.evaluate.seed + 42))
    show.line(f"{c.n_users:,} vectors of size {c.dim} ({c.model}, {c.epoch} epochs"
              f"{', reused' if not c.epochs_trained else f', final loss {c.final_loss:.3f}'})")
    step(9, "publish to Feast (feast apply)")
    pub = p.publish(dataset, PublishConfig())
    show.line(f"{len(pub.views)} feature views: " + ", ".join(v.name for v in pub.views), soft_wrap=True)
    step(10, "materialize into the online store (SQLite)")
    p.materialize("sqlite")
    step(11, "evaluate: LightGBM and a linear probe on features fetched from Feast")
    ev = p.evaluate(dataset, demo_plan.evaluate)
    show.evaluation(ev)
    step(12, "an online read, as a serving model would do it")
    user = p.first_user(dataset)
    online = p.online_features(dataset, ["llm4es_embedding", "coles_embedding", "agg_features"], [user])
    features = online.iloc[0].drop("user_id")
    is_vector = [hasattr(v, "__len__") and not isinstance(v, str) for v in features.values]
    show.line(f"get_online_features(user_id={user}):")
    for (column, value), vector in zip(features.items(), is_vector):
        if vector:
            show.line(f"  {column}: [{', '.join(f'{x:.3f}' for x in value[:4])}, ...] ({len(value)} floats)",
                      soft_wrap=True)
    show.line(f"  ... and {is_vector.count(False)} aggregate features", soft_wrap=True)
    show.line(f"done in {time.perf_counter() - t0:.0f}s; warehouse {p.home.warehouse_path}; "
              f"report {ev.paths['markdown']}", soft_wrap=True)
    return DemoResult(validated=True, evaluation=ev, seconds=time.perf_counter() - t0)
