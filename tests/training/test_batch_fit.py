"""`--batch-tokens auto` (training/memory_fit.py and its use by finetune and embed), on the CPU.

The CUDA allocator cannot be read here, so the real-model tests measure with SavedTensorsMeter (the
bytes autograd keeps for backward: the part of a step's memory that grows with its tokens), and the
choice's wiring is checked with a probe result put in place of the GPU's.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.fixtures.tiny_model import cpu_accelerator, save_tiny_model, tiny_tokenizer
from training.finetune import batching as ft
from training.finetune import AUTO_MAX_TOKENS, FinetuneConfig, FinetuneError
from training.finetune.model import build_model, chunked_head, training_loss
from training.memory_fit import (GIB, MemoryLine, NotEnoughMemory, SavedTensorsMeter, fit_line, probe_line,
                                 tokens_that_fit)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-probe"), tokenizer=tiny_tokenizer(), max_positions=640)


# --- the arithmetic -------------------------------------------------------------------------------

def test_the_line_through_two_peaks_and_the_rows_that_fit():
    line = fit_line((1000, 3e9), (2000, 5e9))  # 2 MB a token on 1 GB fixed
    assert line.fixed_bytes == pytest.approx(1e9) and line.per_token_bytes == pytest.approx(2e6)
    fit = tokens_that_fit(line, free_bytes=40e9, extra_bytes=3e9, row_tokens=1000, cap=100_000, headroom=0.8)
    # 0.8 x 40 GB = 32 GB; 32 - 3 - 1 = 28 GB of tokens at 2 MB = 14,000 tokens = 14 rows
    assert fit.tokens == 14_000 and fit.record()["limited_by"] == "memory"
    assert fit.predicted_peak_bytes == pytest.approx(1e9 + 14_000 * 2e6 + 3e9)
    assert tokens_that_fit(line, 400e9, 3e9, 1000, cap=16_500).tokens == 16_000  # whole rows under the cap
    assert "the cap of 16,500" in tokens_that_fit(line, 400e9, 3e9, 1000, cap=16_500).summary()


def test_a_peak_that_does_not_grow_overestimates_rather_than_promising_unlimited_room():
    line = fit_line((1000, 5e9), (2000, 4.9e9))
    assert line.fixed_bytes == 0 and line.per_token_bytes == pytest.approx(4.9e9 / 2000)
    flat = MemoryLine(fixed_bytes=2 * GIB, per_token_bytes=0.0)  # a meter that saw no activations (inference)
    assert tokens_that_fit(flat, 10 * GIB, 0, 512, cap=4096).tokens == 4096
    with pytest.raises(NotEnoughMemory):  # the fixed part alone is over the budget: still refused
        tokens_that_fit(flat, 2 * GIB, 0, 512, cap=4096)


def test_not_even_one_row_says_what_was_needed_and_what_was_free():
    line = MemoryLine(fixed_bytes=30 * GIB, per_token_bytes=2**20)
    with pytest.raises(NotEnoughMemory, match=r"one row of 2,048 tokens needs about 34\.0 GiB \(32\.0 GiB before any "
                                              r"token\), and 80% of the 40\.0 GiB free is 32\.0"):
        tokens_that_fit(line, 40 * GIB, 2 * GIB, 2048, cap=32_768)


class LineMeter:
    """A meter whose step allocates fixed + per_token x tokens, and runs out past `limit` tokens."""

    def __init__(self, fixed: float, per_token: float, limit: int = 10**9):
        self.fixed, self.per_token, self.limit, self.tokens = fixed, per_token, limit, 0

    def step(self, rows: int, row_tokens: int) -> None:
        if rows * row_tokens > self.limit:
            raise MemoryError("out of memory")
        self.tokens = rows * row_tokens

    def start(self) -> float:
        return 0.0

    def measure(self, fn) -> float:
        fn()
        return self.fixed + self.per_token * self.tokens


def test_the_probe_recovers_a_linear_step_and_handles_running_out():
    meter = LineMeter(fixed=5e8, per_token=3e5)
    line = probe_line(lambda rows: meter.step(rows, 512), 512, meter, (MemoryError,))
    assert line.fixed_bytes == pytest.approx(5e8) and line.per_token_bytes == pytest.approx(3e5)
    tight = LineMeter(fixed=5e8, per_token=3e5, limit=600)  # one row of 512 fits, two do not
    line = probe_line(lambda rows: tight.step(rows, 512), 512, tight, (MemoryError,))
    assert line.max_rows == 1
    assert tokens_that_fit(line, 1e12, 0, 512, cap=32_768).summary().endswith("limited by the probe: two rows ran "
                                                                               "out of memory)")
    none = LineMeter(fixed=5e8, per_token=3e5, limit=100)
    with pytest.raises(NotEnoughMemory, match="one row of 512 tokens ran out of memory"):
        probe_line(lambda rows: none.step(rows, 512), 512, none, (MemoryError,))


# --- the real training step, measured by what backward keeps ---------------------------------------

def test_the_training_probe_measures_the_real_step_and_its_options(tiny_model):
    """Per token the probe sees the tiny model's activations; three rows then need what the line says,
    and checkpointing or training only the top block keep less for backward: the probe runs the
    step the run will run, with its options."""
    import numpy as np

    from training.data import make_collate

    acc = cpu_accelerator()
    config = FinetuneConfig(model=str(tiny_model), max_length=64)
    meter = SavedTensorsMeter(free_bytes=GIB)
    fit = ft.measure_batch_tokens(str(tiny_model), config, acc, meter=meter)
    assert fit.line.per_token_bytes > 0 and fit.tokens % 64 == 0
    model = build_model(str(tiny_model), config, print)
    trained = sum(p.numel() for p in model.parameters())
    assert fit.extra_bytes == 8 * trained  # AdamW's two float32 states per weight, one process
    head = chunked_head(model, acc, config)
    collate = make_collate(0, packed=False)
    rng = np.random.default_rng(1)
    vocab = model.get_input_embeddings().num_embeddings
    batch = {k: v for k, v in collate([[rng.integers(3, vocab, 64)] for _ in range(3)]).items() if k != "n_tokens"}
    three_rows = meter.measure(lambda: training_loss(model, batch, head).backward())
    assert three_rows == pytest.approx(fit.line.bytes_at(3 * 64), rel=0.02)
    assert fit.tokens == AUTO_MAX_TOKENS  # a gigabyte holds far more than the cap of a tiny model's rows
    small = SavedTensorsMeter(free_bytes=fit.line.bytes_at(5 * 64) / 0.8 + fit.extra_bytes / 0.8)
    assert ft.measure_batch_tokens(str(tiny_model), config, acc, meter=small).tokens == 5 * 64

    checkpointed = ft.measure_batch_tokens(str(tiny_model), FinetuneConfig(model=str(tiny_model), max_length=64,
                                                                            gradient_checkpointing=True), acc, meter)
    top_only = ft.measure_batch_tokens(str(tiny_model), FinetuneConfig(model=str(tiny_model), max_length=64,
                                                                        trainable_layers=1), acc, meter)
    assert checkpointed.line.per_token_bytes < 0.8 * fit.line.per_token_bytes
    assert top_only.line.per_token_bytes < fit.line.per_token_bytes and top_only.extra_bytes < fit.extra_bytes
    lora = ft.measure_batch_tokens(str(tiny_model), FinetuneConfig(model=str(tiny_model), max_length=64, lora_r=2),
                                   acc, meter)  # peft's wrapped model: AdamW keeps states for the adapters only
    assert 0 < lora.extra_bytes < fit.extra_bytes / 4 and lora.line.per_token_bytes > 0


# --- how finetune chooses ------------------------------------------------------------------------

def fake_gpu(monkeypatch, tokens_per_process: list[int]):
    """finetune's choice as on a GPU, with these probe results on each process."""
    import torch
    from accelerate.utils import DistributedType

    from training.memory_fit import BatchFit

    calls = []

    def measured(model_path, config, accelerator, meter=None):
        calls.append(config)
        if tokens_per_process[0] == 0:
            raise NotEnoughMemory("one row of 48 tokens needs about 90.0 GiB")
        line = MemoryLine(GIB, 2**20)
        return BatchFit(tokens_per_process[0], config.max_length, line, 80 * GIB, GIB, AUTO_MAX_TOKENS)

    monkeypatch.setattr(ft, "measure_batch_tokens", measured)
    accelerator = SimpleNamespace(device=torch.device("cpu"), distributed_type=DistributedType.MULTI_GPU,
                                  num_processes=len(tokens_per_process),
                                  gather=lambda t: torch.tensor(tokens_per_process))
    return accelerator, calls


def test_on_a_gpu_auto_takes_the_smallest_budget_of_all_processes(tmp_path, monkeypatch):
    accelerator, calls = fake_gpu(monkeypatch, [480, 432])
    lines = []
    config, batching = ft.choose_batching(FinetuneConfig(max_length=48), tmp_path / "run", accelerator, "m",
                                           lines.append, on_gpu=True)
    assert (config.batch_size, config.batch_tokens) == (1, 432) and len(calls) == 1
    assert batching["chosen_by"] == "auto" and batching["batch_tokens"] == 432 and batching["per_token_mib"] == 1.0
    assert "432 tokens (the smallest of 2 processes)" in lines[0]


def test_a_model_too_large_for_the_gpu_is_refused_with_what_to_try(tmp_path, monkeypatch):
    accelerator, _ = fake_gpu(monkeypatch, [0, 480])
    with pytest.raises(FinetuneError, match=r"does not fit for training at --max-length 48 on this GPU: one row .* "
                                            r"90\.0 GiB\. Try --gradient-checkpointing, --lora-r 16"):
        ft.choose_batching(FinetuneConfig(max_length=48), tmp_path / "run", accelerator, "m", print, on_gpu=True)


def test_given_sizes_and_resumed_runs_never_probe(tmp_path, monkeypatch):
    accelerator, calls = fake_gpu(monkeypatch, [480])
    choose = lambda config: ft.choose_batching(config, tmp_path / "run", accelerator, "m", print, on_gpu=True)  # noqa: E731
    assert choose(FinetuneConfig(max_length=48, batch_size=4))[0].batch_tokens is None
    given = choose(FinetuneConfig(max_length=48, batch_tokens=96))
    assert (given[0].batch_size, given[0].batch_tokens, given[1]["chosen_by"]) == (1, 96, "--batch-tokens")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(
        {"config": {"batch_size": 1, "batch_tokens": 384},
         "schedule": {"batching": {"chosen_by": "auto", "batch_tokens": 384}}}))
    resumed = choose(FinetuneConfig(max_length=48))  # today's free memory would give 480
    assert resumed[0].batch_tokens == 384 and resumed[1]["batch_tokens"] == 384
    assert calls == []


def test_fsdp_keeps_one_text_a_step_and_says_how_to_choose(tmp_path, monkeypatch):
    from accelerate.utils import DistributedType

    accelerator, calls = fake_gpu(monkeypatch, [480])
    accelerator.distributed_type = DistributedType.FSDP
    lines = []
    config, batching = ft.choose_batching(FinetuneConfig(max_length=48), tmp_path / "run", accelerator, "m",
                                           lines.append, on_gpu=True)
    assert (config.batch_size, config.batch_tokens) == (1, None) and calls == []
    assert "under FSDP" in batching["chosen_by"] and "give --batch-tokens N" in lines[0]


def test_config_and_cli_accept_a_number_or_auto():
    import click

    from producers.cli.options import TokensOrAuto

    with pytest.raises(FinetuneError, match="expected a number of tokens or 'auto'"):
        FinetuneConfig(batch_tokens="lots")
    kind = TokensOrAuto(16)
    assert kind.convert("auto", None, None) == "auto" and kind.convert("65_536", None, None) == 65536
    with pytest.raises(click.BadParameter, match="below the smallest budget, 16"):
        kind.convert("8", None, None)
    with pytest.raises(click.BadParameter, match="neither a number of tokens nor 'auto'"):
        kind.convert("big", None, None)


# --- embed ---------------------------------------------------------------------------------------

def test_embed_auto_probes_rows_of_max_length_and_keeps_the_cpu_default(tmp_path):
    from training.embed import AUTO_MAX_TOKENS as EMBED_MAX, CPU_BATCH_TOKENS, EmbedConfig, Embedder
    from training.embed import choose_batch_tokens, measure_batch_tokens

    model_dir = save_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer())
    embedder = Embedder.load(str(model_dir), str(model_dir), EmbedConfig(model=str(model_dir), layers="1:",
                                                                          max_length=100, device="cpu"))
    assert choose_batch_tokens("auto", embedder) == CPU_BATCH_TOKENS and choose_batch_tokens(512, embedder) == 512
    seen = []
    encode = embedder.encode_ids
    embedder.encode_ids = lambda ids: (seen.append([len(x) for x in ids]), encode(ids))[1]
    meter = LineMeter(fixed=3e6, per_token=1e5)
    meter.measure = lambda fn: (fn(), meter.fixed + meter.per_token * sum(seen[-1]))[1]
    meter.start = lambda: 2e9  # 0.8 x 2 GB - 3 MB fixed = 1,597 MB at 0.1 MB a token: 15,970 tokens, 159 rows
    fit = measure_batch_tokens(embedder, meter)
    assert seen == [[100], [100], [100, 100]]  # warm-up, one row, two rows of max_length
    assert fit.tokens == 15_900 and fit.extra_bytes == 0
    meter.start = lambda: 1e12
    assert measure_batch_tokens(embedder, meter).tokens == EMBED_MAX // 100 * 100


def test_embed_auto_on_a_gpu_takes_the_probes_budget_or_refuses_with_advice(monkeypatch):
    from training.embed import batches as em
    from training.memory_fit import BatchFit

    gpu = SimpleNamespace(device=SimpleNamespace(type="cuda"), max_length=2048)
    fit = BatchFit(40_960, 2048, MemoryLine(GIB, 2**20), 80 * GIB, 0.0, em.AUTO_MAX_TOKENS)
    monkeypatch.setattr(em, "measure_batch_tokens", lambda embedder, meter=None: fit)
    lines = []
    assert em.choose_batch_tokens("auto", gpu, lines.append) == 40_960 and "40,960 tokens (20 rows of 2048" in lines[0]
    assert em.choose_batch_tokens(8192, gpu) == 8192  # a given budget is never probed

    def out_of_memory(embedder, meter=None):
        raise NotEnoughMemory("one row of 2,048 tokens ran out of memory")

    monkeypatch.setattr(em, "measure_batch_tokens", out_of_memory)
    with pytest.raises(em.EmbedError, match="does not fit for embedding at --max-length 2048 on this GPU: one row"):
        em.choose_batch_tokens("auto", gpu)
