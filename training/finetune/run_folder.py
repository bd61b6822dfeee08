"""The run folder: its lock, config.json and state.json, accelerate checkpoints and the saved models. Every
folder is written under a temporary name and renamed into place; state.json names only whole ones."""
from __future__ import annotations

import copy
import json
import re
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from producers.stores.outputs import atomic_write_text
from training.finetune.config import (CHECKPOINT_MARKER, RESUMABLE_CHANGES, FinetuneConfig, FinetuneError,
                                      FinetuneResult, Log, config_hash)


def run_lock_path(run_dir: Path, rank: int) -> Path:
    """This rank's lock on the run folder. Beside the folder, so the run folder holds only what training writes."""
    return run_dir.parent / f".{run_dir.name}.rank{rank}.lock"


def open_run(run_dir: Path, record: dict, accelerator) -> dict:
    """Create the run folder, or check that resuming it keeps what decides the weights; return its state."""
    saved = read_json(run_dir / "config.json")
    if saved is not None:
        _check_resumable(run_dir, saved, record)
    state = read_json(run_dir / "state.json") or {
        "global_step": 0, "epoch": 0, "step_in_epoch": 0, "completed_epochs": 0, "checkpoint": None,
        "checkpoints": [], "models": [], "losses": [], "tokens_seen": 0, "finished": False}
    if accelerator.is_main_process:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "models").mkdir(parents=True, exist_ok=True)
        _remove_leftovers(run_dir, state)
        if saved is None:
            write_json(run_dir / "config.json", {**record, "created_at": utc_now()})
    return state


def _check_resumable(run_dir: Path, saved: dict, record: dict) -> None:
    changed = [f"{k}: {saved['config'].get(k)!r} -> {v!r}" for k, v in record["config"].items()
               if k not in RESUMABLE_CHANGES and saved["config"].get(k) != v]
    for section, key in [("schedule", "num_processes"), ("data", "texts_sha256")]:
        if saved.get(section, {}).get(key) != record[section][key]:
            changed.append(f"{key}: {saved.get(section, {}).get(key)!r} -> {record[section][key]!r}")
    if saved.get("model_path") != record["model_path"]:
        changed.append(f"model_path: {saved.get('model_path')!r} -> {record['model_path']!r}")
    if changed:
        raise FinetuneError(f"run {run_dir.name!r} exists with another config ({'; '.join(changed)}); resuming it "
                            f"would not give the run it started. Give a new run_name, or delete {run_dir}")


def _remove_leftovers(run_dir: Path, state: dict) -> None:
    """Temporary folders of a killed save, and checkpoints state.json no longer names."""
    for parent, keep in [(run_dir / "checkpoints", state["checkpoints"]), (run_dir / "models", state["models"])]:
        for path in parent.iterdir():
            if path.name.startswith(".") or (parent.name == "checkpoints" and path.name not in keep):
                shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(accelerator, run_dir: Path, state: dict, keep: int, say: Log) -> None:
    """`save_state` into a temporary folder, rename it, then point state.json at it and prune old ones."""
    name = f"step-{state['global_step']}"
    final, tmp = run_dir / "checkpoints" / name, run_dir / "checkpoints" / f".{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with _tied_weights_saved_once(accelerator):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _replace_folder(tmp, final)
        kept = [c for c in state["checkpoints"] if c != name] + [name]
        dropped, kept = kept[:-keep], kept[-keep:]
        state.update(checkpoint=f"checkpoints/{name}", checkpoints=kept)
        write_json(run_dir / "state.json", {**state, "updated_at": utc_now()})
        for old in dropped:
            shutil.rmtree(run_dir / "checkpoints" / old, ignore_errors=True)
        say(f"checkpoint {final}")
    else:
        state.update(checkpoint=f"checkpoints/{name}")
    accelerator.wait_for_everyone()


@contextmanager
def _tied_weights_saved_once(accelerator):
    """accelerate's safetensors save drops the second name of a shared tensor and warns "Removed
    shared tensor {'lm_head.weight'}" on every save. For weights the model declares tied (SmolLM2's
    embeddings) that is the right thing, and loading re-ties them: only that warning is muted.
    Any other shared tensor still warns."""
    import logging

    tied: set[str] = set()
    for model in accelerator._models:
        inner = accelerator.unwrap_model(model)
        keys = getattr(inner, "_tied_weights_keys", None) or {}
        names = keys.keys() if isinstance(keys, dict) else keys
        params = dict(inner.named_parameters(remove_duplicate=False))
        for name in names:  # tied in fact, not only by declaration
            source = keys.get(name) if isinstance(keys, dict) else None
            if name in params and (source is None or (source in params and params[source] is params[name])):
                tied.add(name)

    def keep(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "Removed shared tensor" not in text or not tied:
            return True
        removed = set(re.findall(r"'([^']+)'", text.split(" while saving")[0]))
        return not removed or not removed <= {n.split("module.")[-1] for n in tied} | tied

    target = logging.getLogger("accelerate.utils.other")
    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


def finish_epoch(accelerator, model, tokenizer, run_dir: Path, record: dict, state: dict, steps_per_epoch: int,
                  say: Log) -> None:
    """At an epoch end (or where max_steps stops): a model folder for the embedding step, then a checkpoint."""
    whole = state["step_in_epoch"] == steps_per_epoch
    if whole:
        state.update(completed_epochs=state["completed_epochs"] + 1, epoch=state["epoch"] + 1, step_in_epoch=0)
    name = f"epoch-{state['completed_epochs']}" if whole else f"step-{state['global_step']}"
    config = record["config"]
    marker = {
        "dataset": record["data"]["dataset"], "schema": record["data"]["schema"], "run_name": record["run_name"],
        "epoch": state["completed_epochs"] if whole else round(state["global_step"] / steps_per_epoch, 4),
        "global_step": state["global_step"], "model_source": config["model"], "model_path": record["model_path"],
        "mixture": record["data"]["mixture"], "config_hash": config_hash(FinetuneConfig(**config)),
        "lora_merged": bool(config["lora_r"]), "code_version": record["code_version"], "produced_at": utc_now(),
    }
    _save_model(accelerator, model, tokenizer, run_dir / "models" / name, marker, lora=bool(config["lora_r"]))
    state["models"] = [m for m in state["models"] if m != name] + [name]
    say(f"model {run_dir / 'models' / name}")
    state["finished"] = state["global_step"] >= record["schedule"]["total_steps"]
    save_checkpoint(accelerator, run_dir, state, config["keep_checkpoints"], say)


def _save_model(accelerator, model, tokenizer, folder: Path, marker: dict, lora: bool) -> None:
    """The weights as a plain Hugging Face folder that `producers.shared.models.load_causal_lm` loads.

    A LoRA model is saved merged (base + adapter, so the embedding step needs no peft), with the
    adapter alone in `adapter/`; the merge happens on a copy, so training goes on unmerged.
    """
    from accelerate.utils import is_compiled_module

    if is_compiled_module(model):  # `compile`: accelerate's unwrap keeps torch.compile's wrapper, whose
        model = model._orig_mod  # state dict names every weight `_orig_mod.<name>` and would load as random
    tmp = folder.with_name(f".{folder.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    if lora:
        if accelerator.is_main_process:
            adapted = accelerator.unwrap_model(model)
            adapted.save_pretrained(tmp / "adapter")
            copy.deepcopy(adapted).merge_and_unload().save_pretrained(tmp)
    else:
        state_dict = accelerator.get_state_dict(model)  # every process (sharded models gather here)
        # Process 0 alone touches the folder: save_pretrained with is_main_process=False still creates
        # and lists it, and a process that lagged there failed once process 0 had renamed it below.
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(tmp)
        write_json(tmp / CHECKPOINT_MARKER, marker)
        _replace_folder(tmp, folder)
    accelerator.wait_for_everyone()


def run_result(run_dir: Path, record: dict, state: dict, seconds: float, tokens_run: int,
            resumed_from: int | None, save_seconds: float, cuda_device=None) -> FinetuneResult:
    import resource

    import torch

    if cuda_device is not None:  # a CPU run on a GPU machine reports its RSS, not the GPU's memory
        peak = torch.cuda.max_memory_allocated(cuda_device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    losses = state["losses"]
    return FinetuneResult(
        run_dir=run_dir, dataset=record["data"]["dataset"], model=record["model_path"],
        mixture=record["data"]["mixture"], n_texts=record["data"]["n_texts"], steps=state["global_step"],
        total_steps=record["schedule"]["total_steps"], epochs_done=state["completed_epochs"],
        final_loss=losses[-1] if losses else None, losses=list(losses), tokens_seen=state["tokens_seen"],
        tokens_per_second=tokens_run / (seconds - save_seconds) if seconds > save_seconds else 0.0,
        seconds=seconds, save_seconds=save_seconds, peak_memory_mb=peak,
        steps_per_epoch=record["schedule"]["steps_per_epoch"],
        models=[run_dir / "models" / m for m in state["models"]],
        checkpoints=[run_dir / "checkpoints" / c for c in state["checkpoints"]], resumed_from=resumed_from)


def _replace_folder(new: Path, dest: Path) -> None:
    from producers.shared.models import _swap_into_place

    _swap_into_place(new, dest)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
