"""The GPU path against the CPU path (skipped without CUDA; `benchmarks/gpu_check` runs these on a GPU).

Every other test is pinned to the CPU (tests/conftest.py); these choose their devices themselves.
`LLM4ES_CUDA_TESTS_DEVICE=cpu` runs them with the CPU in the GPU's place (`gpu_check --dry-run`, and so the
GPU bundle's simulation, does): the comparisons become trivial, but every call the tests make runs once
before the single GPU run, so a test that cannot run (a bad argument, a missing --force) shows here.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.fixtures.tiny_model import save_tiny_model, tiny_tokenizer  # noqa: E402
from training.data import make_collate  # noqa: E402
from training.embed import EmbedConfig, Embedder  # noqa: E402
from training.finetune import training_loss  # noqa: E402
from producers.shared.models import load_causal_lm  # noqa: E402

GPU = os.environ.get("LLM4ES_CUDA_TESTS_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(GPU == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TEXTS = ["the cat sat on the mat with the hat " * k for k in (1, 7, 3, 12)] + ["a dog", "in the beginning " * 9]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-cuda"), tiny_tokenizer(), seed=0, max_positions=512)


def vectors(model_dir, device, dtype, side="right", texts=TEXTS):
    cfg = EmbedConfig(model=str(model_dir), layers="all", max_length=500, dtype=dtype, device=device,
                      padding_side=side)
    e = Embedder.load(str(model_dir), str(model_dir), cfg)
    try:
        return e.encode(texts).vectors, np.stack([e.encode([t]).vectors[0] for t in texts])
    finally:
        e.close()


def cosine_min(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def test_gpu_float32_embeddings_match_the_cpu(model_dir):
    cpu, _ = vectors(model_dir, "cpu", "float32")
    gpu, _ = vectors(model_dir, GPU, "float32")
    assert np.isfinite(gpu).all() and np.abs(gpu - cpu).max() <= 1e-4


def test_gpu_bfloat16_embeddings_point_where_the_cpu_ones_do(model_dir):
    cpu, _ = vectors(model_dir, "cpu", "float32")
    gpu, _ = vectors(model_dir, GPU, "bfloat16")
    assert np.isfinite(gpu).all() and cosine_min(gpu, cpu) >= 0.999


def test_batches_launched_ahead_on_the_gpu_give_each_batch_its_own_vectors(model_dir):
    """The embed loop launches the next batch before it waits for this one's copy to pinned host memory:
    every batch must still come back whole and in order (a reused buffer or a missed wait would not)."""
    cfg = EmbedConfig(model=str(model_dir), layers="all", max_length=500, dtype="float32", device=GPU)
    e = Embedder.load(str(model_dir), str(model_dir), cfg)
    try:
        batches = [e.tokenize(TEXTS[i:i + 2])[0] for i in range(0, len(TEXTS), 2)]
        one_by_one = [e.encode_ids(b).vectors for b in batches]
        for ahead in (1, 2):
            got = list(e.encode_batches(batches, ahead=ahead))
            for enc, want in zip(got, one_by_one, strict=True):
                np.testing.assert_allclose(enc.vectors, want, atol=1e-5, rtol=0)  # a mixed-up batch is far off
    finally:
        e.close()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_padding_on_either_side_gives_no_nan_and_the_vector_of_the_text_alone(model_dir, side, dtype):
    batched, alone = vectors(model_dir, GPU, dtype, side=side)
    assert np.isfinite(batched).all()
    if dtype == "float32":
        assert np.abs(batched - alone).max() <= 1e-4
    else:
        assert cosine_min(batched, alone) >= 0.999


@pytest.mark.parametrize("amp", [False, True])
def test_packed_texts_stay_apart_under_sdpa_on_cuda(model_dir, amp):
    model = load_causal_lm(str(model_dir), dtype=torch.float32).to(GPU).eval()
    rng = np.random.default_rng(0)
    texts = [rng.integers(3, 250, n).astype(np.int32) for n in (70, 120, 40)]
    batch = {k: v.to(GPU) for k, v in make_collate(pad_id=2, packed=True)([texts]).items() if k != "n_tokens"}
    with torch.no_grad(), torch.autocast(torch.device(GPU).type, dtype=torch.bfloat16, enabled=amp):
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        at = 0
        for t in texts:
            alone = model(input_ids=torch.from_numpy(t.astype(np.int64))[None].to(GPU)).logits[0]
            err = (packed[0, at:at + len(t)].float() - alone.float()).abs().max().item()
            assert err <= (5e-2 if amp else 1e-4), f"text at {at}: packed differs from alone by {err}"
            at += len(t)
        # the same through the training step's own forward: per-batch loss equals the CPU's
        loss_gpu = training_loss(model, {**batch, "labels": batch["labels"]}).float().item()
    cpu_model = load_causal_lm(str(model_dir), dtype=torch.float32).eval()
    cpu_batch = {k: v.cpu() for k, v in batch.items()}
    with torch.no_grad():
        loss_cpu = training_loss(cpu_model, cpu_batch).item()
    assert abs(loss_gpu - loss_cpu) <= (2e-2 if amp else 1e-4) * abs(loss_cpu)


def test_a_short_finetune_gives_the_cpu_losses(tmp_path, model_dir):
    """Ten steps in bf16 autocast on the GPU against float32 on the CPU, same data and seed."""
    from producers.datasets.definition import load_builtin
    from producers.ingest import IngestConfig, ingest
    from producers.serialize.run import SerializeConfig, serialize
    from producers.stores.warehouse import Home
    from tests.fixtures.movielens_files import write_grouplens
    from training.finetune import FinetuneConfig, finetune

    home = Home.resolve(tmp_path / "home")
    ingest(home, load_builtin("movielens-100k"), IngestConfig(source=write_grouplens(tmp_path / "ml")))
    serialize(home, "movielens-100k", SerializeConfig(model="tiny", max_tokens=200, force=True),
              tokenizer=tiny_tokenizer())  # force: not validated here (the gate refused it)
    losses = {}
    # bf16 named, not left to `auto`: the same on a GPU, and a CPU rehearsal switches precision as a GPU does
    for side, device, precision in [("cpu", "cpu", "no"), ("gpu", GPU, "bf16")]:
        cfg = FinetuneConfig(model=str(model_dir), mixture="serialized:1", max_length=200, batch_size=4, lr=3e-3,
                             warmup_steps=0, max_steps=10, device=device, precision=precision, run_name=f"r-{side}",
                             force=True)
        losses[side] = np.array(finetune(home, "movielens-100k", cfg).losses)
    assert len(losses["gpu"]) == 10 and np.isfinite(losses["gpu"]).all()
    assert np.abs(losses["gpu"] - losses["cpu"]).max() <= 0.02 * np.abs(losses["cpu"]).mean()


def test_batch_tokens_auto_predicts_the_peak_of_a_real_step(model_dir):
    """finetune's probe on this device (two points, one and two rows), then the same step at three
    rows peaks where the fitted line says: the CUDA allocator on a GPU, what backward keeps with the
    CPU in the GPU's place."""
    from accelerate import Accelerator

    from training.finetune import FinetuneConfig, measure_batch_tokens
    from training.finetune.accelerator import fresh_accelerator_state
    from training.finetune.model import build_model, chunked_head
    from training.memory_fit import GIB, CudaMeter, SavedTensorsMeter

    on_gpu = torch.device(GPU).type == "cuda"
    fresh_accelerator_state(not on_gpu, "bf16")
    acc = Accelerator(cpu=not on_gpu, mixed_precision="bf16")
    config = FinetuneConfig(model=str(model_dir), max_length=256)
    meter = CudaMeter(acc.device) if on_gpu else SavedTensorsMeter(GIB)
    fit = measure_batch_tokens(str(model_dir), config, acc, meter)
    assert fit.line.per_token_bytes > 0 and fit.tokens >= 256

    meter.start()
    model = build_model(str(model_dir), config, print).to(acc.device)
    head = chunked_head(model, acc, config)
    rng = np.random.default_rng(2)
    vocab = model.get_input_embeddings().num_embeddings
    rows = make_collate(0, packed=False)([[rng.integers(3, vocab, 256)] for _ in range(3)])
    batch = {k: v.to(acc.device) for k, v in rows.items() if k != "n_tokens"}

    def step():
        with acc.autocast():
            training_loss(model, batch, head).backward()

    step()  # gradients and workspaces, as in the probe's warm-up
    assert meter.measure(step) == pytest.approx(fit.line.bytes_at(3 * 256), rel=0.15)
