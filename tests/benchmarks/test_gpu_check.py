"""`benchmarks.gpu_check`'s own plumbing, with its heavy steps replaced: under a second, no model."""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks import gpu_check as gc

EMBED = {"kind": "embed", "tokens_per_s": 1, "dtype": "float32", "padding": 0.0, "nan": 0, "mfu": None,
         "before": {"with_padding_mask": {"tokens_per_s": 1, "speedup_now": 1.0, "min_cosine": 1.0}}}


FIT = {"batch_tokens": 512, "limited_by": "cap", "per_token_mib": 0.1, "fixed_gib": 0.0, "extra_gib": 0.0}


def no_probe(monkeypatch) -> None:
    """The `--batch-tokens auto` step on these tests' stand-in models: its figures, without loading them."""
    monkeypatch.setattr(gc, "auto_batch", lambda *a: {"train": dict(FIT), "embed": dict(FIT)})


def test_a_step_that_raises_is_recorded_and_the_next_steps_still_run(tmp_path, monkeypatch) -> None:
    """The GPU run is one shot: a bug in one step must not cost the figures of the others."""
    ran = []

    def build(name, folder: Path, device):
        ran.append("build")
        folder.mkdir(parents=True)
        return folder

    def train(*args, **kwargs):
        ran.append("train")
        raise RuntimeError("a CUDA-only failure")

    def embed(*args, **kwargs):
        ran.append("embed")
        return EMBED

    def quality(model_dir, source, out, max_length, epochs, limit, figures, batch_size):
        ran.append("quality")
        assert batch_size == 8  # the dry run's; on a GPU None, the default batches a user gets
        figures.update(finetune_steps=3)  # fine-tuning done ...
        raise ValueError("embed failed")  # ... then the embedding step fails

    monkeypatch.setattr(gc, "build_model", build)
    monkeypatch.setattr(gc, "train_throughput", train)
    monkeypatch.setattr(gc, "embed_throughput", embed)
    monkeypatch.setattr(gc, "quality_run", quality)
    no_probe(monkeypatch)
    out = tmp_path / "gc"
    rc = gc.main(["--dry-run", "--skip-tests", "--out", str(out), "--quality-model", str(tmp_path),
                  "--source", str(tmp_path)])
    report = json.loads((out / "gpu_check.json").read_text())
    # then the A/B variants, each its own failed step
    assert rc == 1 and ran == ["build", "train", "embed", "quality", "train", "train", "train", "train"]
    assert set(report["errors"]) == {"tiny train", "quality run", "tiny train loss-bf16", "tiny train rows-x2",
                                     "tiny train compile", "tiny train compile+loss-bf16"}
    assert "a CUDA-only failure" in report["errors"]["tiny train"]
    assert report["throughput"]["tiny"]["embed"]["tokens_per_s"] == 1
    assert report["quality"] == {"finetune_steps": 3} and report["finished"] is True


def test_a_batch_that_does_not_fit_is_halved(tmp_path, monkeypatch) -> None:
    import torch

    rows = []

    def train(folder, seq, batch, steps, warmup, device, **variant):
        rows.append(batch)
        if batch > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"kind": "train", "batch": batch, "tokens_per_s": 1, "finite": True, "mfu": None}

    monkeypatch.setattr(gc, "build_model", lambda name, folder, device: folder)
    monkeypatch.setattr(gc, "train_throughput", train)
    monkeypatch.setattr(gc, "embed_throughput", lambda *a, **k: EMBED)
    no_probe(monkeypatch)
    assert gc.main(["--dry-run", "--skip-tests", "--out", str(tmp_path / "gc")]) == 0
    report = json.loads((tmp_path / "gc" / "gpu_check.json").read_text())
    assert rows[:2] == [2, 1] and report["throughput"]["tiny"]["train"]["batch"] == 1 and "errors" not in report


def test_ab_variants_run_after_the_quality_run_while_they_fit_the_budget(tmp_path, monkeypatch) -> None:
    """The one-shot run must not lose its quality figures to the optional A/B measurements: those come
    last, and a variant whose estimated time no longer fits the budget is skipped and says so."""
    ran, clock = [], [0.0]

    def train(folder, seq, batch, steps, warmup, device, **variant):
        ran.append(("train", tuple(sorted(variant.items()))))
        clock[0] += 40  # every measurement takes 40 s of the budget
        return {"kind": "train", "batch": batch, "tokens_per_s": 100 * len(ran), "finite": True, "mfu": None,
                "warmup_seconds": 0.0}

    def quality(model_dir, source, out, max_length, epochs, limit, figures, batch_size):
        ran.append("quality")
        clock[0] += 300

    monkeypatch.setattr(gc.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(gc, "build_model", lambda name, folder, device: folder)
    monkeypatch.setattr(gc, "train_throughput", train)
    monkeypatch.setattr(gc, "embed_throughput", lambda *a, **k: EMBED)
    monkeypatch.setattr(gc, "quality_run", quality)
    no_probe(monkeypatch)
    out = tmp_path / "gc"
    # 40 (default) + 300 (quality) = 340 s used of 420: loss-bf16 (~30 s) fits, then 380 s are used and
    # rows-x2 (~40 s) just fits: 420 s; the compile (~150 s) does not, nor compile+loss-bf16 (~60 s)
    assert gc.main(["--dry-run", "--skip-tests", "--out", str(out), "--quality-model", str(tmp_path),
                    "--source", str(tmp_path), "--budget-s", "420"]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert ran == [("train", ()), "quality", ("train", (("loss_dtype", "autocast"),)), ("train", ())]
    ab = report["ab"]["tiny"]
    assert ab["loss-bf16"]["tokens_per_s"] == 300 and ab["rows-x2"]["batch"] == 4
    assert "needs ~150 s" in ab["compile"]["skipped"] and "needs ~60 s" in ab["compile+loss-bf16"]["skipped"]


def test_hung_cuda_tests_leave_their_log_and_the_run_goes_on(tmp_path, monkeypatch) -> None:
    import subprocess

    def hang(cmd, **kwargs):
        assert kwargs["env"]["LLM4ES_CUDA_TESTS_DEVICE"] == "cpu"  # the dry run: the CPU in the GPU's place
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"], output=b"collected 9 items\n", stderr=None)

    monkeypatch.setattr(gc.subprocess, "run", hang)
    monkeypatch.setattr(gc, "build_model", lambda name, folder, device: None)  # no throughput step
    out = tmp_path / "gc"
    assert gc.main(["--dry-run", "--out", str(out)]) == 1
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["checks"]["cuda_tests"]["returncode"] is None and report["finished"] is True
    assert "collected 9 items" in (out / "cuda_tests.log").read_text()


def test_the_dry_run_runs_every_step_for_real_on_the_cpu(tmp_path) -> None:
    """Nothing mocked (but the CUDA tests, which have their own run): every call the GPU run will make
    is made once here, tiny, so a broken step shows before the one shot."""
    out = tmp_path / "gc"
    assert gc.main(["--dry-run", "--skip-tests", "--out", str(out)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    tiny = report["throughput"]["tiny"]
    assert tiny["train"]["finite"] and tiny["embed"]["nan"] == 0 and "errors" not in report
    before = tiny["embed"]["before"]  # the mask changes nothing on the right, nor launching ahead
    assert before["with_padding_mask"]["min_cosine"] > 0.99999 and before["one_batch_at_a_time"]["min_cosine"] > 0.99999
    assert tiny["auto_batch"]["train"]["per_token_mib"] > 0 and tiny["auto_batch"]["train"]["batch_tokens"] >= 128
    assert set(report["ab"]["tiny"]) == {"loss-bf16", "rows-x2", "compile", "compile+loss-bf16"}
