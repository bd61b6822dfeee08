"""`data/feast/manifest.json`: every published dataset's sets (what each history holds, where it came from)
and views (names, features, tags, descriptions), as `feature_repo/definitions.py` declares them to Feast."""
from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from producers.stores.outputs import OUTPUTS, atomic_write_text, feature_slug
from producers.stores.serving import PublishError
from producers.stores.warehouse import Home

Log = Callable[[str], None]


def view_kinds() -> list[str]:
    """Every view kind, in the order views are listed: the registered outputs', then the session-derived ones."""
    return [*OUTPUTS, "session_embedding", "session_intent"]


def _every_set(kind: str) -> bool:
    """Whether every set of this kind gets a view (LLM4ES: epochs, layers, text kinds to compare)."""
    return kind in OUTPUTS and OUTPUTS[kind].view_every_set


_INT_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "HUGEINT"}


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _timestamp(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _run_of(checkpoint: str | None) -> str | None:
    """`runs/ml/r1/models/epoch-2` -> `runs/ml/r1`; `base` -> None."""
    if not checkpoint or checkpoint == "base":
        return None
    p = PurePosixPath(checkpoint.replace("\\", "/"))
    if re.fullmatch(r"(epoch|step)-\d+", p.name):
        parent = p.parent
        return str(parent.parent if parent.name == "models" else parent)
    return None


_slug = feature_slug


def _labels(info: dict) -> list[str]:
    """Readable candidate labels for an LLM4ES set, shortest first."""
    checkpoint, run = info["checkpoint"], info.get("run")
    if checkpoint == "base":
        ck = f"base_{_slug(str(info['model']).rstrip('/').split('/')[-1])}"
    elif run is not None:
        # `epoch-2` -> <run>_epoch_2; `step-40` (max_steps ended inside an epoch) -> <run>_step_40
        folder = PurePosixPath(checkpoint.replace("\\", "/")).name
        ck = f"{_slug(PurePosixPath(run).name)}_{_slug(folder)}"
    else:
        ck = _slug("_".join(PurePosixPath(checkpoint.replace("\\", "/")).parts[-2:]))
    short = f"{ck}__{_slug(info.get('text_kind') or 'texts')}"
    layers = f"{short}__l{_slug(info.get('layers') or 'all')}"
    return [short, layers, f"{layers}__{info['set_id'].split('-')[-1][:8]}"]


def _name_sets(schema: str, sets: dict[str, dict]) -> None:
    """Give every set a stable view name: kept once given, new ones avoid the names taken."""
    taken = {info["name"] for info in sets.values() if info.get("name")}
    for set_id in sorted(sets, key=lambda s: (sets[s].get("produced_at") or "", s)):
        info = sets[set_id]
        if info.get("name"):
            continue
        kind = info["kind"]
        if _every_set(kind):
            info["name"] = next(n for n in (f"{schema}__{kind}__{label}" for label in _labels(info)) if n not in taken)
        else:
            info["name"] = f"{schema}__{_view_suffix(info)}"
        taken.add(info["name"])


def _home_relative(home: Home, wanted: str | None) -> str | None:
    """A checkpoint folder given as a path (absolute, or relative to the cwd) as the embeddings record it."""
    if not wanted or not Path(wanted).exists():
        return wanted
    try:
        return Path(wanted).resolve().relative_to(home.root.resolve()).as_posix()
    except ValueError:
        return str(Path(wanted).resolve())


def _view_suffix(info: dict) -> str:
    """The name of a set's default view after `<schema>__`."""
    if "view" in info:  # a view its output's producer defined (sessions and their rollups)
        return info["view"]
    if info["kind"] in OUTPUTS and OUTPUTS[info["kind"]].publish_as != "sessions":
        return OUTPUTS[info["kind"]].view_name
    raise PublishError(f"the published {info['kind']} view was recorded by an older llm4es: publish the "
                       "dataset again with its session files in place (or delete data/feast and publish again)")


def _choose_set(current: list[str], sets: dict[str, dict], wanted: str | None, log: Log) -> str:
    if wanted is None:
        chosen = max(current, key=lambda s: (sets[s]["produced_at"] or "", s))
        log(f"default LLM4ES set: {sets[chosen]['checkpoint']} ({sets[chosen]['text_kind']}, layers "
            f"{sets[chosen]['layers']}), the most recently produced")
        return chosen
    w = wanted.strip()
    matches = []
    for s in current:
        info = sets[s]
        names = {s, Path(info["file"]).name, Path(info["file"]).stem, info["checkpoint"]}
        names |= {label for label in _labels(info)}
        if info.get("name"):
            names |= {info["name"], info["name"].split(f"__{info['kind']}__")[-1]}
        if w in names or w.rstrip("/") in names:
            matches.append(s)
    if len(matches) != 1:
        choices = "; ".join(f"{_labels(sets[s])[0]} ({sets[s]['checkpoint']})" for s in sorted(current))
        raise PublishError(f"LLM4ES set {wanted!r} {'matches several' if matches else 'matches none'} of the "
                           f"sets; name one by label, checkpoint or file: {choices}")
    return matches[0]


def _view_entry(dataset: str, schema: str, info: dict, is_default: bool) -> dict:
    kind = info["kind"]
    output = OUTPUTS.get(kind)
    if output is None or output.publish_as == "sessions":
        return _session_view_entry(dataset, schema, info)
    name = f"{schema}__{output.view_name}" if is_default else info["name"]
    what = output.label.format(dataset=dataset) if output.label else f"{output.kind} features of {dataset} users"
    if output.publish_as == "snapshots":
        lengths = info.get("vector_lengths", {})
        features = [{"name": n, "dtype": t, **({"vector_length": lengths[n]} if n in lengths else {})}
                    for n, t in info["dtypes"].items()]
    else:
        features = [{"name": v, "dtype": "Array(Float32)", "vector_length": info["dim"]} for v in output.vectors]
        what += (f"{' (the default set)' if is_default and output.view_every_set else ''}: model {info['model']}, "
                 f"checkpoint {info['checkpoint']}"
                 + (f" (epoch {info['epoch']})" if info.get("epoch") is not None else "")
                 + (f", layers {info['layers']}, {info['text_kind']} texts" if "layers" in output.sets else "")
                 + f", {info['dim']} dimensions")
    tags = {"kind": kind, "dataset": dataset, "set_id": info["set_id"], "is_default": str(is_default).lower()}
    for k in ("model", "checkpoint", "epoch", "layers", "text_kind", "run", "dim", "source_hash", "code_version",
              "produced_at", "texts_digest", "ingest_id", "definition_fingerprint", "data_version"):
        if info.get(k) is not None:
            tags[k] = str(info[k])
    tags["feature_timestamp"] = info["feature_timestamps"][-1]
    tags["snapshots"] = str(len(info["feature_timestamps"]))
    description = (f"{what}. One row per user and snapshot (feature_timestamp = as-of time of the events used); "
                   f"{len(info['feature_timestamps'])} snapshot(s), the latest as of {tags['feature_timestamp']}; "
                   f"produced {info.get('produced_at')} by {info.get('code_version')} "
                   f"from data {info.get('source_hash')}.")
    return {"name": name, "kind": kind, "is_default": is_default, "set_id": info["set_id"], "source": info["source"],
            "features": features, "tags": tags, "description": description}


def _session_view_entry(dataset: str, schema: str, info: dict) -> dict:
    """A view its output's producer defined (`DerivedView`): the sessions, or a user rollup of them."""
    kind, recent = info["kind"], info["recent_sessions"]
    suffix = _view_suffix(info)
    features, what = info["features"], info["what"].format(dataset=dataset)
    tags = {"kind": kind, "dataset": dataset, "set_id": info["set_id"], "is_default": "true",
            "recent_sessions": str(recent), "feature_timestamp": info["feature_timestamps"][-1]}
    for k in ("model", "checkpoint", "epoch", "run", "dim", "taxonomy_version", "classifier", "source_hash",
              "code_version", "produced_at", "data_version"):
        if info.get(k) is not None:
            tags[k] = info[k] if isinstance(info[k], str) else json.dumps(info[k], default=str)
    if info.get("labels"):
        tags["labels"] = json.dumps(info["labels"])
    description = (f"{what}; feature_timestamp = the session's end, so a point-in-time join only sees sessions "
                   f"that ended by then ({info['first_timestamp']} .. {info['feature_timestamps'][-1]}); produced "
                   f"{info.get('produced_at')} by {info.get('code_version')}.")
    entry = {"name": f"{schema}__{suffix}", "kind": kind, "is_default": True, "set_id": info["set_id"],
             "source": info["source"], "features": features, "tags": tags, "description": description}
    if info["session_keyed"]:
        entry["entity"] = "session"
    return entry


def _pending(manifest: dict) -> dict[str, datetime]:
    """View name -> the earliest feature_timestamp of its rows that may not be in the online stores yet."""
    pending = {}
    for entry in manifest.get("datasets", {}).values():
        for view in entry["views"]:
            when = _timestamp(entry["sets"][view["set_id"]].get("pending_from"))
            if when is not None:
                pending[view["name"]] = when
    return pending


def _clear_pending(manifest: dict) -> bool:
    """Forget every `pending_from` (the registries now hold the rewinds); whether any was there."""
    cleared = [info.pop("pending_from") for entry in manifest.get("datasets", {}).values()
               for info in entry["sets"].values() if "pending_from" in info]
    return bool(cleared)


def _set_id(kind: str, key: dict) -> str:
    return kind + "-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
