"""Evaluation reports: a JSON file, Markdown tables in the shape of the paper's table 4, a bar chart.

Everything is rendered from the JSON-ready dict `evaluate` builds, so the three files always agree.
"""
from __future__ import annotations

import json
import os
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
             "ridge) in the rows marked (linear), on the same splits; "
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
    fig.suptitle(f"{report['dataset']}: downstream LightGBM and linear probe (linear)")
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
