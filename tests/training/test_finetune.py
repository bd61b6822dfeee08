"""Tests for `training.finetune` and `training.data`: a tiny random Llama on the small MovieLens fixture."""
from __future__ import annotations

import json
from dataclasses import replace
import shutil
from pathlib import Path

import numpy as np
import pytest

from producers.datasets.definition import load_builtin
from producers.ingest import IngestConfig, ingest
from producers.serialize.run import SerializeConfig, serialize
from producers.stores.warehouse import Home
from tests.fixtures.movielens_files import write_grouplens
from tests.fixtures.tiny_model import cpu_accelerator, save_tiny_model, trained_tokenizer
from training.data import IGNORE_INDEX, epoch_batches, make_collate, pack_items
from training.finetune import CHECKPOINT_MARKER, FinetuneConfig, FinetuneError, config_hash, finetune
from producers.shared.models import load_causal_lm
from validation.gate import ValidationGateError
from validation.run import ValidateConfig, validate

CORPUS = ["1997-10-05 14:02, Toy Story, 1995, Animation, Children's, Comedy, 4",
          "Date | Title | Year | Genres | Rating"] * 50
DATASET = "movielens-100k"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A tiny model gains nothing from threads, and two OpenMP threads on a busy 2-core machine
    run up to 10x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return trained_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tok) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer=tok, max_positions=640)


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory, tok) -> Path:
    """Input and output embeddings shared, as in SmolLM2 (checkpoints then store the matrix once)."""
    import torch
    from transformers import LlamaForCausalLM

    from tests.fixtures.tiny_model import tiny_llama_config

    folder = tmp_path_factory.mktemp("tied-llama")
    config = tiny_llama_config(vocab_size=len(tok), max_positions=640)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def built_home(tmp_path_factory, tok) -> Home:
    """A home with the 12-user MovieLens fixture ingested, validated and serialized (12 texts)."""
    root = tmp_path_factory.mktemp("built")
    home = Home.resolve(root / "home")
    ingest(home, load_builtin(DATASET), IngestConfig(source=write_grouplens(root / "ml-100k")))
    assert validate(home, DATASET, ValidateConfig(data_docs=False)).success
    serialize(home, DATASET, SerializeConfig(model="tiny", max_tokens=300), tokenizer=tok)
    return home


@pytest.fixture
def home(built_home, tmp_path) -> Home:
    """A private copy of the built home, so runs never see each other."""
    shutil.copytree(built_home.root, tmp_path / "home")
    return Home.resolve(tmp_path / "home")


def cfg(model: Path, **overrides) -> FinetuneConfig:
    base = dict(model=str(model), mixture="serialized:1", max_length=48, batch_size=2, lr=3e-3, warmup_steps=0)
    return FinetuneConfig(**{**base, **overrides})


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_module_import_does_not_pull_in_torch():
    import subprocess
    import sys

    code = "import sys, training.finetune; sys.exit('torch' in sys.modules or 'accelerate' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_loss_falls(home, tiny_model):
    r = finetune(home, DATASET, cfg(tiny_model, max_steps=20, lr=1e-2))
    assert r.steps == 20 and len(r.losses) == 20 and r.n_texts == 12
    assert np.mean(r.losses[-3:]) < np.mean(r.losses[:3]) - 0.5
    assert r.tokens_seen == 20 * 2 * 48  # every text is cut to max_length, so no padding
    assert r.tokens_per_second > 0 and r.final_loss == r.losses[-1]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_killed_run_resumes_to_the_uninterrupted_result(home, tiny_model, tied_model, tied):
    # 12 texts, batch 1, 2 micro-batches per step: 6 steps an epoch, 10 steps end inside epoch 2.
    # Checkpoints at steps 4, 6 (epoch end), 8 and 10.
    config = cfg(tied_model if tied else tiny_model, max_steps=10, batch_size=1, grad_accum=2, save_every_steps=4)
    whole = finetune(home, DATASET, FinetuneConfig(**{**config.__dict__, "run_name": "whole"}))

    class Killed(RuntimeError):
        pass

    def kill_at(at: int):
        def on_step(step: int, loss: float) -> None:
            if step == at:
                raise Killed
        return on_step

    killed = FinetuneConfig(**{**config.__dict__, "run_name": "killed"})
    state_file = home.root / "runs" / "movielens_100k" / "killed" / "state.json"
    with pytest.raises(Killed):  # killed right after the checkpoint of step 4, inside epoch 1
        finetune(home, DATASET, killed, on_step=kill_at(4))
    assert json.loads(state_file.read_text())["checkpoint"] == "checkpoints/step-4"
    with pytest.raises(Killed):  # killed at step 9, one step past the checkpoint of step 8, in epoch 2
        finetune(home, DATASET, killed, on_step=kill_at(9))
    state = json.loads(state_file.read_text())
    assert (state["checkpoint"], state["epoch"], state["step_in_epoch"]) == ("checkpoints/step-8", 1, 2)
    resumed = finetune(home, DATASET, killed)

    assert resumed.resumed_from == 8 and resumed.steps == whole.steps == 10
    np.testing.assert_allclose(resumed.losses, whole.losses, rtol=0, atol=1e-6)
    assert resumed.tokens_seen == whole.tokens_seen
    assert [m.name for m in resumed.models] == [m.name for m in whole.models] == ["epoch-1", "step-10"]
    for name in ("epoch-1", "step-10"):
        a, b = weights(whole.run_dir / "models" / name), weights(resumed.run_dir / "models" / name)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=0, atol=1e-6, err_msg=key)


def test_losses_read_between_reports_are_every_steps_loss(home, tiny_model):
    """Step losses are read from the device only at reports (every 1/20 of the run) and saves: a run with
    no per-step callback records the same losses and tokens as one whose callback reads every step."""
    config = cfg(tiny_model, max_steps=45, batch_size=1, save_every_steps=7)  # reports every 2 steps
    quiet = finetune(home, DATASET, FinetuneConfig(**{**config.__dict__, "run_name": "quiet"}))
    seen: list[float] = []
    each = finetune(home, DATASET, FinetuneConfig(**{**config.__dict__, "run_name": "each"}),
                    on_step=lambda step, loss: seen.append(loss))
    assert quiet.steps == each.steps == len(quiet.losses) == len(seen) == 45
    assert quiet.losses == each.losses == seen
    assert quiet.tokens_seen == each.tokens_seen > 0


def test_run_folder_layout(home, tiny_model):
    config = cfg(tiny_model, epochs=2, save_every_steps=2, keep_checkpoints=2)  # 6 steps an epoch
    r = finetune(home, DATASET, config)
    run = home.root / "runs" / "movielens_100k" / "movielens-100k__tiny-llama0__serialized-1"
    assert r.run_dir == run and r.steps == r.total_steps == 12 and r.epochs_done == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-10", "step-12"]
    assert sorted(p.name for p in (run / "models").iterdir()) == ["epoch-1", "epoch-2"]
    saved_state = {p.name for p in (run / "checkpoints" / "step-12").iterdir()}
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= saved_state

    state = json.loads((run / "state.json").read_text())
    assert state["global_step"] == 12 and state["completed_epochs"] == 2 and state["finished"]
    assert (state["epoch"], state["step_in_epoch"]) == (2, 0)
    assert state["checkpoint"] == "checkpoints/step-12" and state["checkpoints"] == ["step-10", "step-12"]
    assert state["models"] == ["epoch-1", "epoch-2"] and len(state["losses"]) == 12

    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["lr"] == config.lr and saved["model_path"] == str(tiny_model)
    assert saved["data"]["n_texts"] == 12 and saved["data"]["texts_per_kind"] == {"serialized": 12}
    assert saved["data"]["source_hashes"] and len(saved["data"]["texts_sha256"]) == 64
    assert saved["schedule"] == {"steps_per_epoch": 6, "total_steps": 12, "epochs": 2, "warmup_steps": 0,
                                 "num_processes": 1, "effective_batch_size": 2, "tokens_per_step_budget": None,
                                 "batching": {"chosen_by": "--batch-size"}}
    assert saved["code_version"]

    for epoch in (1, 2):
        folder = run / "models" / f"epoch-{epoch}"
        assert {"config.json", "model.safetensors", "tokenizer.json", CHECKPOINT_MARKER} <= {
            p.name for p in folder.iterdir()}
        marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
        assert marker["epoch"] == epoch and marker["global_step"] == 6 * epoch and marker["dataset"] == DATASET
        resolved = replace(config, batch_tokens=None)  # what the run recorded: auto, resolved on the CPU
        assert marker["mixture"] == "serialized:1" and marker["config_hash"] == config_hash(resolved)
        assert marker["model_source"] == str(tiny_model) and marker["produced_at"]
    assert not weights(run / "models" / "epoch-1")["model.norm.weight"].equal(
        weights(run / "models" / "epoch-2")["model.norm.weight"])
    assert load_causal_lm(str(run / "models" / "epoch-2")).config.num_hidden_layers == 3
    assert not any(p.name.startswith(".") for d in (run, run / "models", run / "checkpoints") for p in d.iterdir())

    again = finetune(home, DATASET, config)  # finished: nothing to do, same answer
    assert again.steps == 12 and again.losses == r.losses and again.seconds == 0.0


def test_changed_config_is_refused_on_resume(home, tiny_model):
    finetune(home, DATASET, cfg(tiny_model, max_steps=2, run_name="r"))
    with pytest.raises(FinetuneError, match=r"lr: 0.003 -> 0.001.*new run_name"):
        finetune(home, DATASET, cfg(tiny_model, max_steps=2, run_name="r", lr=1e-3))
    with pytest.raises(FinetuneError, match="max_length: 48 -> 32"):
        finetune(home, DATASET, cfg(tiny_model, max_steps=2, run_name="r", max_length=32))
    # Where and how often it saves may change.
    assert finetune(home, DATASET, cfg(tiny_model, max_steps=2, run_name="r", keep_checkpoints=3)).steps == 2


def test_trainable_layers_freezes_all_but_the_top_blocks(home, tiny_model):
    r = finetune(home, DATASET, cfg(tiny_model, max_steps=4, trainable_layers=1))
    before, after = weights(tiny_model), weights(r.models[-1])
    assert before.keys() == after.keys()
    trained = {k for k in before if not before[k].equal(after[k])}
    assert trained and all(k.startswith("model.layers.2.") or k == "model.norm.weight" for k in trained)
    assert {k for k in before if k.startswith("model.layers.2.") and k.endswith("proj.weight")} <= trained


def test_lora_saves_an_adapter_and_a_merged_model(home, tiny_model):
    import torch
    from peft import PeftModel

    r = finetune(home, DATASET, cfg(tiny_model, max_steps=3, lora_r=4))
    folder = r.models[-1]
    assert (folder / "adapter" / "adapter_config.json").is_file()
    assert json.loads((folder / CHECKPOINT_MARKER).read_text())["lora_merged"] is True
    merged = load_causal_lm(str(folder), dtype=torch.float32)
    assert not any("lora" in k for k in merged.state_dict())
    adapted = PeftModel.from_pretrained(load_causal_lm(str(tiny_model), dtype=torch.float32), str(folder / "adapter"))
    base = load_causal_lm(str(tiny_model), dtype=torch.float32)
    ids = torch.tensor([[5, 80, 120, 7, 33, 250]])
    with torch.no_grad():
        want, got, plain = adapted(input_ids=ids).logits, merged(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)  # the adapter did learn something


def test_packing_trains_on_fewer_rows(home, tiny_model):
    r = finetune(home, DATASET, cfg(tiny_model, max_steps=2, batch_size=1, max_length=640, packing=True))
    saved = json.loads((r.run_dir / "config.json").read_text())["data"]
    assert saved["n_rows"] < saved["n_texts"] == 12 and saved["n_truncated"] == 0
    assert r.steps == 2 and all(np.isfinite(r.losses))


def test_gate_refuses_unvalidated_data(tmp_path, tiny_model):
    home = Home.resolve(tmp_path / "home")
    ingest(home, load_builtin(DATASET), IngestConfig(source=write_grouplens(tmp_path / "ml-100k")))
    with pytest.raises(ValidationGateError, match="validate"):
        finetune(home, DATASET, cfg(tiny_model, max_steps=1))
    assert not (home.root / "runs").exists()


# --- training.data -----------------------------------------------------------------------------

def test_packed_rows_give_each_text_its_own_logits(tiny_model):
    """Position ids restarting per text make transformers keep attention inside each text."""
    import torch

    model = load_causal_lm(str(tiny_model), dtype=torch.float32)
    rng = np.random.default_rng(0)
    texts = [rng.integers(3, 300, n).astype(np.int32) for n in (7, 12, 4)]
    packed = make_collate(pad_id=2, packed=True)([texts, texts[:1]])  # second row: one text + 16 pad
    assert "attention_mask" not in packed and packed["n_tokens"].item() == 23 + 7
    assert packed["position_ids"][0].tolist() == [*range(7), *range(12), *range(4)]
    labels = packed["labels"][0].tolist()
    assert labels[0] == labels[7] == labels[19] == IGNORE_INDEX and labels[1] == int(texts[0][1])
    assert packed["labels"][1, 7:].eq(IGNORE_INDEX).all()
    with torch.no_grad():
        # use_cache=False as in training: with a cache transformers does not look for packed sequences
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        at = 0
        for t in texts:
            alone = model(input_ids=torch.from_numpy(t.astype(np.int64))[None]).logits[0]
            torch.testing.assert_close(logits[0, at:at + len(t)], alone, atol=1e-5, rtol=1e-5)
            at += len(t)
        torch.testing.assert_close(logits[1, :7], logits[0, :7], atol=1e-5, rtol=1e-5)


def test_padded_batches_mask_padding_by_position_not_by_id():
    texts = [np.array([5, 6, 2], dtype=np.int32), np.array([7, 2], dtype=np.int32)]
    batch = make_collate(pad_id=2, packed=False, padding_mask=True)([[texts[0]], [texts[1]]])  # pad id == EOS id
    assert batch["input_ids"].tolist() == [[5, 6, 2], [7, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 2], [IGNORE_INDEX, 2, IGNORE_INDEX]]
    assert "attention_mask" not in make_collate(pad_id=2, packed=False)([[texts[0]], [texts[1]]])


def test_right_padding_needs_no_mask_the_loss_is_the_same(tiny_model):
    """Without the 2-D mask SDPA runs its causal kernel; the loss must not change."""
    import torch

    from training.finetune import training_loss

    model = load_causal_lm(str(tiny_model), dtype=torch.float32).eval()
    rng = np.random.default_rng(4)
    rows = [[rng.integers(3, 300, n).astype(np.int32)] for n in (30, 11, 22, 5)]
    with torch.no_grad():
        losses = []
        for padding_mask in (True, False):
            batch = make_collate(pad_id=2, packed=False, padding_mask=padding_mask)(rows)
            batch.pop("n_tokens")
            losses.append(training_loss(model, batch).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_epoch_batches_are_a_pure_function_of_seed_and_epoch():
    lengths = np.random.default_rng(1).integers(5, 100, 23)
    first = epoch_batches(lengths, 4, seed=0, epoch=0, group_by_length=True)
    assert first == epoch_batches(lengths, 4, seed=0, epoch=0, group_by_length=True)
    assert first != epoch_batches(lengths, 4, seed=0, epoch=1, group_by_length=True)
    assert first != epoch_batches(lengths, 4, seed=1, epoch=0, group_by_length=True)
    assert sorted(i for b in first for i in b) == list(range(23))
    assert [len(b) for b in first] == [4] * 5 + [3]  # the short batch stays last
    spans = sorted((min(lengths[b]), max(lengths[b])) for b in first)
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:]))  # batches do not overlap


def test_pack_items_fits_every_text_once():
    lengths = np.random.default_rng(2).integers(1, 60, 200)
    packs = pack_items(lengths, 64)
    assert sorted(i for p in packs for i in p) == list(range(200))
    assert all(sum(lengths[list(p)]) <= 64 for p in packs)
    assert len(packs) <= int(np.ceil(lengths.sum() / 64 * 1.25))  # close to the bound


def test_saving_tied_embeddings_warns_of_no_shared_tensor(home, tied_model, caplog):
    """SmolLM2 ties its input and output embeddings: every save used to warn "Removed shared tensor"."""
    import logging

    caplog.set_level(logging.WARNING)
    r = finetune(home, DATASET, cfg(tied_model, max_steps=1))
    assert r.checkpoints and not [m for m in caplog.messages if "shared tensor" in m]
    # and what was saved comes back tied: the embedding step reads the saved model
    w = weights(r.models[-1])
    model = load_causal_lm(str(r.models[-1]), dtype=None)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "model.embed_tokens.weight" in w


def test_finetune_reports_steps_epochs_and_precision(home, tiny_model):
    lines = []
    r = finetune(home, DATASET, cfg(tiny_model, max_steps=3), log=lines.append)
    assert r.steps_per_epoch == 6 and r.steps == 3 and r.mfu is None  # 12 texts / batch 2; no MFU on a CPU
    start = next(line for line in lines if line.startswith("training "))
    assert "3 steps (0.50 epochs of 6 steps)" in start and "float32 on cpu" in start and "precision no" not in start


def test_a_second_run_in_one_process_gets_its_own_precision(home, tiny_model):
    """accelerate keeps one state per process; the CUDA test fine-tunes on the CPU, then on the GPU
    (bf16) in one process, which raised "AcceleratorState has already been initialized"."""
    finetune(home, DATASET, cfg(tiny_model, max_steps=1, run_name="first"))
    lines = []
    r = finetune(home, DATASET, cfg(tiny_model, max_steps=1, precision="bf16", run_name="second"), log=lines.append)
    assert r.steps == 1 and np.isfinite(r.losses).all()
    assert "bf16 autocast" in next(line for line in lines if line.startswith("training "))
    lines.clear()
    finetune(home, DATASET, cfg(tiny_model, max_steps=1, run_name="third"), log=lines.append)
    assert "float32 on cpu" in next(line for line in lines if line.startswith("training "))


def test_a_compiled_run_saves_the_model_it_trained(home, tiny_model, monkeypatch):
    """`compile` (the GPU option) saved every weight as `_orig_mod.<name>`: the folder loaded as a random
    model. torch.compile's eager backend gives the same wrapper without a C++ compile."""
    import functools

    import torch

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    plain = weights(finetune(home, DATASET, cfg(tiny_model, max_steps=2, run_name="plain")).models[-1])
    compiled = weights(finetune(home, DATASET, cfg(tiny_model, max_steps=2, compile=True,
                                                   run_name="compiled")).models[-1])
    assert sorted(compiled) == sorted(plain)
    start = weights(tiny_model)
    # the same training up to float noise (Adam's first steps move a weight by about lr = 3e-3 either way)
    assert max(float((compiled[k] - plain[k]).abs().max()) for k in plain) < 1e-4
    assert max(float((plain[k] - start[k]).abs().max()) for k in plain) > 1e-3


def test_fsdp_with_lora_or_partial_training_is_refused():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from training.finetune.accelerator import refuse_fsdp_partial

    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    for bad in (dict(lora_r=4), dict(trainable_layers=1)):
        with pytest.raises(FinetuneError, match="not supported under FSDP: run it with DDP"):
            refuse_fsdp_partial(fsdp, FinetuneConfig(**bad))
    refuse_fsdp_partial(fsdp, FinetuneConfig())  # full fine-tuning under FSDP is fine
    refuse_fsdp_partial(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU), FinetuneConfig(lora_r=4))


@pytest.mark.parametrize("chunked", [False, True])
def test_the_training_forward_keeps_packed_texts_apart(tiny_model, chunked):
    """`training_loss`, the loop's own forward: a packed row's loss equals the token-weighted mean of its
    texts' losses alone. A loop that drops use_cache=False (or sends a 2-D mask) lets texts attend
    to each other and fails here."""
    import torch

    from training.finetune import training_loss
    from training.loss import bypass_lm_head

    model = load_causal_lm(str(tiny_model), dtype=torch.float32).eval()
    head = bypass_lm_head(model) if chunked else None
    rng = np.random.default_rng(3)
    texts = [rng.integers(3, 300, n).astype(np.int32) for n in (9, 15, 6)]
    collate = make_collate(pad_id=2, packed=True)
    packed = collate([texts])
    packed.pop("n_tokens")
    with torch.no_grad():
        loss_packed = training_loss(model, packed, head).item()
        per_text = []
        for t in texts:
            alone = make_collate(pad_id=2, packed=False)([[t]])
            alone.pop("n_tokens")
            per_text.append((training_loss(model, alone, head).item(), len(t) - 1))
    expected = sum(loss * n for loss, n in per_text) / sum(n for _, n in per_text)
    assert loss_packed == pytest.approx(expected, rel=1e-5)
    if chunked:
        from training.loss import restore_lm_head

        restore_lm_head(model)
    with torch.no_grad():  # the leak this guards against is real: with a cache the texts mix
        leaky = model(**packed).loss.item()
    assert abs(leaky - expected) > 1e-4


def test_token_budget_batches_hold_the_budget_and_the_same_count_every_epoch():
    from training.data import EpochBatchSampler

    lengths = np.random.default_rng(5).integers(5, 100, 57)
    per_epoch = [epoch_batches(lengths, 1, seed=0, epoch=e, group_by_length=True, batch_tokens=256) for e in range(3)]
    for batches in per_epoch:
        assert sorted(i for b in batches for i in b) == list(range(57))
        assert all(len(b) == 1 or len(b) * max(lengths[b]) <= 256 for b in batches)
    assert len({len(b) for b in per_epoch}) == 1 and per_epoch[0] != per_epoch[1]
    assert max(len(b) for b in per_epoch[0]) > 2  # short texts come many to a batch
    sampler = EpochBatchSampler(lengths, 1, 0, True, batch_tokens=256)
    assert len(sampler) == len(per_epoch[0]) and sampler.batch_size is None  # accelerate: batches vary in size


def test_finetune_with_a_token_budget(home, tiny_model):
    r = finetune(home, DATASET, cfg(tiny_model, batch_tokens=96, epochs=1))
    assert r.steps == r.steps_per_epoch == 6  # 12 texts cut to 48 tokens, two per 96-token batch
    with pytest.raises(FinetuneError, match="must hold one row"):
        cfg(tiny_model, batch_tokens=40)


def test_batch_tokens_auto_on_the_cpu_is_one_text_a_step_as_before(home, tiny_model):
    """The default `batch_tokens="auto"` sizes batches on a GPU only (tests/training/test_batch_fit.py)."""
    r = finetune(home, DATASET, FinetuneConfig(model=str(tiny_model), mixture="serialized:1", max_length=48,
                                               max_steps=2))
    saved = json.loads((r.run_dir / "config.json").read_text())
    assert saved["config"]["batch_size"] == 1 and saved["config"]["batch_tokens"] is None
    assert saved["schedule"]["batching"] == {"chosen_by": "auto: one text a step off the GPU"}
    assert r.steps_per_epoch == 12  # the fixture's 12 texts, one a step


def test_a_probed_budget_trains_records_and_is_kept_on_resume(home, tiny_model, monkeypatch):
    """The GPU path of `batch_tokens="auto"` through a whole run, on the CPU: the probe measures what
    backward keeps (SavedTensorsMeter) with a free memory that holds three rows of 48 tokens; the run
    trains on those batches and records them, and running it again never probes."""
    from training.finetune import batching as ft
    from training.finetune import run as ft_run
    from training.memory_fit import GIB, SavedTensorsMeter

    probe, choose = ft.measure_batch_tokens, ft.choose_batching
    config = FinetuneConfig(model=str(tiny_model), mixture="serialized:1", max_length=48, epochs=2, run_name="auto")
    fit = ft.measure_batch_tokens(str(tiny_model), config, cpu_accelerator(), SavedTensorsMeter(GIB))
    free = (fit.line.bytes_at(3.5 * 48) + fit.extra_bytes) / 0.8  # room for 3.5 rows: three whole ones
    probes = []

    def measured(model_path, config, accelerator, meter=None):
        probes.append(model_path)
        return probe(model_path, config, accelerator, SavedTensorsMeter(free))

    monkeypatch.setattr(ft, "measure_batch_tokens", measured)
    monkeypatch.setattr(ft_run, "choose_batching", lambda *a, **kw: choose(*a, **{**kw, "on_gpu": True}))
    lines = []
    r = finetune(home, DATASET, config, log=lines.append)
    saved = json.loads((r.run_dir / "config.json").read_text())
    assert saved["config"]["batch_tokens"] == 144 and saved["schedule"]["tokens_per_step_budget"] == 144
    batching = saved["schedule"]["batching"]
    assert batching["chosen_by"] == "auto" and batching["limited_by"] == "memory" and batching["batch_tokens"] == 144
    assert r.steps_per_epoch == 4 and r.steps == 8  # 12 texts cut to 48 tokens, three a step
    assert any(x.startswith("--batch-tokens auto: 144 tokens (3 rows of 48") for x in lines)
    again = finetune(home, DATASET, config)  # finished: the recorded batches, no second probe
    assert again.steps == 8 and probes == [str(tiny_model)]


def test_cli_finetune_then_embed_the_run_folder_of_a_max_steps_run(home, tiny_model, monkeypatch):
    """issue 17: `finetune --max-steps` leaves models/step-N; `embed --checkpoint <run folder>` embeds it.
    The finetune line names steps, the share of an epoch and the precision plainly."""
    from click.testing import CliRunner
    from rich.console import Console

    import producers.cli.printers
    from producers.cli import cli

    monkeypatch.setattr(producers.cli.printers, "console", Console(highlight=False, width=250))
    monkeypatch.setattr(producers.cli.printers, "err_console", Console(stderr=True, highlight=False, width=250))
    base = ["--home", str(home.root), "--cache", str(home.root / "cache")]
    run = CliRunner().invoke(cli, [*base, "finetune", DATASET, "--model", str(tiny_model), "--mixture",
                                   "serialized:1", "--max-steps", "3", "--batch-size", "2", "--max-length", "48",
                                   "--run-name", "short"])
    assert run.exit_code == 0, run.output
    assert "3 steps (0.50 epochs, 0 complete)" in run.output and "precision no" not in run.output
    assert "models/step-3" in run.output
    emb = CliRunner().invoke(cli, [*base, "embed", DATASET, "--model", str(tiny_model), "--checkpoint",
                                   "runs/movielens_100k/short", "--max-length", "48", "--layers", "1:"])
    assert emb.exit_code == 0, emb.output
    assert "runs/movielens_100k/short/models/step-3" in emb.output and "12 vectors" in emb.output
    bad = CliRunner().invoke(cli, [*base, "embed", DATASET, "--model", str(tiny_model), "--checkpoint",
                                   "runs/movielens_100k"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert "models/epoch-E/ or models/step-N/" in bad.output


def test_finetune_selects_a_named_gpu_before_the_accelerator_places_the_model(home, tiny_model, monkeypatch):
    """The device choice must reach CUDA before accelerate does: here the call is intercepted (no GPU)."""
    import training.hardware as hardware

    class Chosen(Exception):
        pass

    def intercept(device, error):
        raise Chosen(device)

    monkeypatch.setattr(hardware, "select_named_gpu", intercept)
    with pytest.raises(Chosen, match="cpu"):
        finetune(home, DATASET, cfg(tiny_model, device="cpu", max_steps=1))


def test_a_second_job_on_a_run_being_trained_is_refused(home, tiny_model):
    """Two jobs on one run folder (the same --run-name twice, or the workers a SIGKILLed torchrun leaves
    behind) would write their checkpoints over each other's: the second is refused, naming the folder."""
    from producers.stores.locks import file_lock
    from training.finetune.run_folder import run_lock_path

    run_dir = home.root / "runs" / "movielens_100k" / "busy"
    with file_lock(run_lock_path(run_dir, 0)):  # another process holds it (a second open is refused alike)
        with pytest.raises(FinetuneError, match=r"busy is being trained by another process.*pgrep"):
            finetune(home, DATASET, cfg(tiny_model, max_steps=1, run_name="busy"))
    assert not run_dir.exists()  # nothing written
    assert finetune(home, DATASET, cfg(tiny_model, max_steps=1, run_name="busy")).steps == 1  # free again
    assert finetune(home, DATASET, cfg(tiny_model, max_steps=1, run_name="busy")).steps == 1  # and released


@pytest.mark.slow
def test_two_processes_train_one_run_and_report_once(home, tiny_model):
    """`torchrun --nproc-per-node 2 -m producers.cli finetune` (gloo on the CPU), as the README tells a
    user with several GPUs: the ranks share one run (global batch = per-process batch x processes) and
    process 0 alone reports; every rank printed the summary before."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    # process 1 looks into temporary folders late (tests/fixtures/lagging_rank): a save that does not
    # wait for it fails every time, not once in ~40 runs on a busy machine
    lagging = root / "tests" / "fixtures" / "lagging_rank"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(lagging), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "LLM4ES_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "producers.cli", "--home", str(home.root), "finetune", DATASET, "--model", str(tiny_model),
           "--mixture", "serialized:1", "--max-length", "48", "--batch-size", "1", "--max-steps", "4",
           "--run-name", "two"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    # the ranks' tracebacks come before torchrun's summary: enough of stderr to show them
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-8000:]
    assert done.stdout.count("4 steps (") == 1  # one summary for the job
    run = home.root / "runs" / "movielens_100k" / "two"
    schedule = json.loads((run / "config.json").read_text())["schedule"]
    assert schedule["num_processes"] == 2 and schedule["effective_batch_size"] == 2
    assert schedule["steps_per_epoch"] == 6  # 12 texts, 2 per step: the ranks saw different texts
    state = json.loads((run / "state.json").read_text())
    assert state["global_step"] == 4 and state["tokens_seen"] == 4 * 2 * 48
    assert sorted(p.name for p in (run / "checkpoints" / "step-4").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]


def test_processes_that_accelerate_did_not_join_are_refused(monkeypatch):
    """`accelerate launch --use_fsdp` without GPUs starts the processes but sets each up alone: every one
    would have trained the whole run into the same folder."""
    from types import SimpleNamespace

    from training.finetune.accelerator import require_process_group

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FinetuneError, match=r"started as 2 processes.*torchrun --nproc-per-node"):
        require_process_group(SimpleNamespace(num_processes=1, distributed_type="NO"))
    require_process_group(SimpleNamespace(num_processes=2, distributed_type="MULTI_CPU"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    require_process_group(SimpleNamespace(num_processes=1, distributed_type="NO"))
