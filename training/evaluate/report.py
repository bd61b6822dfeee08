"""Evaluation reports: a JSON file, Markdown tables in the shape of the paper's table 4, a bar chart.

Everything is rendered from the JSON-ready dict `evaluate` builds, so the three files always agree.

Each `evaluate` call writes its own report under `runs/<UTC time>/` and updates the latest report
(`evaluation.{json,md,png}` in the report folder): rows of feature sets this call evaluated replace
the earlier rows of the same names, the others are kept, so `evaluate --features agg,coles` followed
by `evaluate --features llm4es` ends with all three in one table. Rows are only comparable on the
same folds, so the merge happens only when the earlier report used the same protocol settings,
targets and labelled users; otherwise the latest report starts anew and says why.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from training.evaluate.protocol import LOWER_IS_BETTER

PROTOCOL_TITLES = {
    "paper": "Paper protocol: 10% test set, 5 models trained on 4 of 5 folds of the rest, test score mean ± std",
    "cv": "Repeated cross-validation over all labelled users, mean ± std over the held-out folds",
}


def columns(report: dict) -> list[tuple[str, str]]:
    """(target, metric) pairs in report order."""
    return [(t["name"], m) for t in report["targets"] for m in t["metrics"]]


def cell(entry: dict | None, protocol: str, metric: str) -> str:
    if entry is None or protocol not in entry["protocols"]:
        return "n/a"
    p = entry["protocols"][protocol][metric]
    return f"{p['mean']:.3f} ± {p['std']:.3f}"


def markdown(report: dict) -> str:
    cols = columns(report)
    lines = [f"# Downstream evaluation: {report['dataset']}", "",
             f"{report['n_users']} labelled users; LightGBM, and a linear probe (standardized logistic regression / "
             "ridge) in the rows marked (linear), on the same splits; an ensemble's rows marked (stacked) / (mean) "
             "read each member apart with both readers and combine the predictions, weights fitted on inner "
             "out-of-fold predictions of the training rows only; "
             f"seed {report['config']['seed']}; "
             f"features fetched from Feast as of {report['label_time']}.", ""]
    for protocol in report["config"]["protocols"]:
        lines += [f"## {PROTOCOL_TITLES[protocol]}", ""]
        header = ["features"] + [f"{t} {m}{' (lower is better)' if m in LOWER_IS_BETTER else ''}" for t, m in cols]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in report["feature_sets"]:
            row = [name]
            for target, metric in cols:
                row.append(cell(report["results"].get(target, {}).get(name), protocol, metric))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    chosen = [(t, n, e["chosen_view"]) for t, sets in report["results"].items() for n, e in sets.items()
              if e.get("candidates")]
    if chosen:
        lines += ["## Epoch selection (mean validation score on the training folds, never the test set)", ""]
        for target, name, view in chosen:
            cands = report["results"][target][name]["candidates"]
            lines.append(f"- {target}, {name}: {view} (" + ", ".join(f"{v}: {s:.3f}" for v, s in cands.items()) + ")")
        lines.append("")
    fused = [(t, n, e) for t, sets in report["results"].items() for n, e in sets.items() if e.get("fusion_weights")]
    if fused:
        lines += ["## Fusion weights (mean over the splits; each fitted on the training rows' out-of-fold predictions)",
                  ""]
        for target, name, e in fused:
            for protocol, weights in e["fusion_weights"].items():
                shares = ", ".join(f"{c} {w:.2f}" for c, w in weights.items())
                lines.append(f"- {target}, {name}, {protocol}: {shares}")
        lines.append("")
    if report.get("missing"):
        lines += ["## Not evaluated (not published)", ""]
        lines += [f"- {name}: {reason}" for name, reason in report["missing"].items()]
        lines.append("")
    if report.get("sources"):
        lines += ["## Where each row comes from", ""]
        lines += [f"- {name}: the call of {run} (runs/{run}/)" for name, run in report["sources"].items()]
        lines.append("")
    lines += ["## Feature views", ""]
    for view, info in report["views"].items():
        lines.append(f"- `{view}`: " + ", ".join(f"{k} {v}" for k, v in info.items() if v not in (None, "")))
    return "\n".join(lines) + "\n"


def bar_chart(report: dict, path: Path) -> None:
    """One panel per (target, metric): a bar per feature set and protocol, error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = columns(report)
    names = report["feature_sets"]
    protocols = report["config"]["protocols"]
    fig, axes = plt.subplots(1, len(cols), figsize=(max(4.5, 1.1 * len(names) + 1.5) * len(cols), 4.2), squeeze=False)
    width = 0.8 / len(protocols)
    for ax, (target, metric) in zip(axes[0], cols):
        for k, protocol in enumerate(protocols):
            means, stds = [], []
            for name in names:
                entry = report["results"].get(target, {}).get(name)
                p = entry["protocols"][protocol][metric] if entry and protocol in entry["protocols"] else None
                means.append(p["mean"] if p else float("nan"))
                stds.append(p["std"] if p else 0.0)
            xs = [i + (k - (len(protocols) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=protocol)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(f"{target}: {metric}{' (lower is better)' if metric in LOWER_IS_BETTER else ''}")
        if metric in ("roc_auc", "accuracy"):
            low, high = ax.get_ylim()
            ax.set_ylim(max(0.0, min(low, 0.4)), min(1.0, high))
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['dataset']}: downstream LightGBM, linear probe (linear), late fusion (stacked / mean)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write(report: dict, out_dir: Path) -> dict[str, Path]:
    """evaluation.json, evaluation.md and evaluation.png under `out_dir`, each replaced atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "evaluation.json", "markdown": out_dir / "evaluation.md",
             "png": out_dir / "evaluation.png"}
    for key, text in (("json", json.dumps(report, indent=2, default=str) + "\n"), ("markdown", markdown(report))):
        tmp = paths[key].with_name(f".{paths[key].name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, paths[key])
    bar_chart(report, paths["png"])
    return paths


# The settings that fix the folds and the models: two reports can share a table only if all agree.
_SAME_SPLITS = ("protocols", "test_share", "folds", "cv_repeats", "seed", "lgbm")


@dataclass
class Saved:
    paths: dict[str, Path]  # json/markdown/png: the latest (merged) report; run_json/run_markdown/run_png: this call's
    merged: dict
    note: str  # what the merge did, for the log ("" when there was no earlier report)


def save(report: dict, out_dir: Path) -> Saved:
    """This call's report under runs/<time>/, and the latest report merged with the earlier one."""
    run_dir = _run_dir(out_dir, report["produced_at"])
    report["run"] = run_dir.name
    run_paths = write(report, run_dir)
    latest = out_dir / "evaluation.json"
    previous, note = None, ""
    if latest.exists():
        try:
            previous = json.loads(latest.read_text())
        except (OSError, ValueError):
            note = f"the latest report {latest} is unreadable: it starts anew (the runs/ folder keeps every call)"
    merged = report
    if previous is not None:
        differences = incompatibilities(previous, report)
        if differences:
            note = (f"the latest report {latest} was made with other {', '.join(differences)}: it starts anew with "
                    "this call's feature sets (earlier reports stay under runs/)")
        else:
            merged = merge(previous, report)
            kept = [n for n in merged["feature_sets"] if merged["sources"][n] != report["run"]]
            if kept:
                note = f"latest report: kept {', '.join(kept)} from earlier calls with the same folds"
    paths = write(merged, out_dir)
    paths.update({f"run_{k}": v for k, v in run_paths.items()})
    return Saved(paths, merged, note)


def incompatibilities(previous: dict, report: dict) -> list[str]:
    """What differs between two reports that makes their rows incomparable (empty: they can be merged)."""
    out = []
    if previous.get("schema") != report["schema"]:
        out.append("dataset")
    if previous.get("label_time") != report["label_time"]:
        out.append("label time")
    old = previous.get("config", {})
    new = json.loads(json.dumps(report["config"], default=str))  # as it reads back from disk (tuples are lists)
    out += [key for key in _SAME_SPLITS if old.get(key) != new.get(key)]
    same_targets = [(t["name"], t["task"], t["n_users"], t["classes"]) for t in previous.get("targets", [])] == \
        [(t["name"], t["task"], t["n_users"], t["classes"]) for t in report["targets"]]
    if not same_targets:
        out.append("targets or labelled users")
    return out


def merge(previous: dict, report: dict) -> dict:
    """`report` over `previous`: this call's feature sets replace theirs, the others are kept (in their order)."""
    earlier = previous.get("run", previous.get("produced_at", "?"))
    sources = {name: previous.get("sources", {}).get(name, earlier) for name in previous["feature_sets"]}
    sources.update({name: report["run"] for name in report["feature_sets"]})
    names = list(previous["feature_sets"]) + [n for n in report["feature_sets"] if n not in previous["feature_sets"]]
    results = {target: {**previous["results"].get(target, {}), **sets} for target, sets in report["results"].items()}
    views = {**previous.get("views", {}), **report["views"]}
    coverage = {**previous.get("coverage", {}), **report["coverage"]}
    # a set evaluated now is no longer missing; one missing now but evaluated earlier keeps its earlier rows
    missing = {n: r for n, r in {**previous.get("missing", {}), **report.get("missing", {})}.items() if n not in names}
    return {**report, "feature_sets": names, "results": results, "views": views, "coverage": coverage,
            "missing": missing, "sources": sources}


def _run_dir(out_dir: Path, produced_at: str) -> Path:
    """runs/<UTC time> for this call, a new folder even when two calls share a second."""
    stamp = datetime.fromisoformat(produced_at).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    candidate, n = out_dir / "runs" / stamp, 1
    while candidate.exists():
        n += 1
        candidate = out_dir / "runs" / f"{stamp}-{n}"
    return candidate
