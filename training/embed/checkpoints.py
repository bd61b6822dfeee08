"""Which model folders to embed: the base model, one fine-tuned folder, or every saved model of a run."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from producers.stores.warehouse import Home
from training.embed.config import EmbedError

CHECKPOINT_FILE = "llm4es_checkpoint.json"
BASE_CHECKPOINT = "base"


@dataclass(frozen=True)
class Checkpoint:
    """What to load: the base model (`path=None`) or a fine-tuned folder."""

    path: Path | None
    label: str  # the `checkpoint` column
    epoch: int | None
    info: dict  # llm4es_checkpoint.json


def find_checkpoints(home: Home, checkpoint: str | None) -> list[Checkpoint]:
    """The checkpoints `checkpoint` names: the base model, one epoch folder, or every epoch of a run folder."""
    if checkpoint is None:
        return [Checkpoint(None, BASE_CHECKPOINT, None, {})]
    path = Path(checkpoint).expanduser()
    if not path.is_absolute() and not path.exists() and (home.root / path).exists():
        path = home.root / path
    path = path.resolve()
    if not path.is_dir():
        raise EmbedError(f"checkpoint {checkpoint}: no such folder")
    # A run folder has a config.json too (the run's own), so the run's layout is looked for first.
    is_run = (path / "state.json").is_file() or (path / "models").is_dir()
    if not is_run and (path / "config.json").is_file():
        if not _is_model_config(path / "config.json"):
            raise EmbedError(f"checkpoint {checkpoint}: {path / 'config.json'} is not a model's config (no "
                             "model_type); expected a model folder or a fine-tuning run folder")
        return [_checkpoint(home, path)]
    models = _run_models(path)
    if not models:
        raise EmbedError(
            f"checkpoint {checkpoint}: neither a model folder (a config.json in it) nor a fine-tuning run folder "
            f"with saved models (models/epoch-E/ or models/step-N/ holding a config.json, as `llm4es finetune` "
            f"writes); found {_listing(path)}")
    return sorted((_checkpoint(home, p) for p in models),
                  key=lambda c: (c.info.get("global_step") is None, c.info.get("global_step") or 0,
                                 c.epoch is None, c.epoch or 0, c.label))


def _is_model_config(path: Path) -> bool:
    try:
        return "model_type" in json.loads(path.read_text())
    except (ValueError, OSError):
        return False


def _run_models(run: Path) -> list[Path]:
    """Every saved model of a run folder (or of its `models/` folder): epoch-E and step-N folders
    with a config.json; when state.json lists the run's models, exactly those (a killed save's
    leftovers are not models)."""
    folder = run / "models" if (run / "models").is_dir() else run
    names: list[str] | None = None
    state = run / "state.json"
    if state.is_file():
        try:
            listed = json.loads(state.read_text()).get("models")
            names = [str(n) for n in listed] if isinstance(listed, list) else None
        except ValueError:
            names = None
    if names is None:
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"(epoch|step)-\d+", p.name))
    return [folder / n for n in names if (folder / n / "config.json").is_file()
            and _is_model_config(folder / n / "config.json")]


def _listing(path: Path) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not entries:
        return "an empty folder"
    return ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")


def _checkpoint(home: Home, path: Path) -> Checkpoint:
    info: dict = {}
    if (path / CHECKPOINT_FILE).is_file():
        try:
            info = json.loads((path / CHECKPOINT_FILE).read_text())
        except ValueError as e:
            raise EmbedError(f"{path / CHECKPOINT_FILE}: not valid JSON ({e})") from e
    epoch = info.get("epoch") if isinstance(info, dict) else None
    if not isinstance(epoch, int):  # a step-N model's fractional epoch is no epoch of the table
        m = re.fullmatch(r"epoch-(\d+)", path.name)
        epoch = int(m.group(1)) if m else None
    try:
        label = str(path.relative_to(home.root))
    except ValueError:
        label = str(path)
    return Checkpoint(path, label, epoch, info if isinstance(info, dict) else {"value": info})
