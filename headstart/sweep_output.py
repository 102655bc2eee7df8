"""What ``headstart sweep`` writes and prints: the ranked leaderboard, ``sweep.csv``, ``sweep.png`` and its table.

:mod:`headstart.sweep` runs the sweep; the functions here only rank, format and draw its rows.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write_bytes
from .selection import Candidate

SWEEP_FILE, CSV_FILE, PLOT_FILE, BEST_DIR = "sweep.json", "sweep.csv", "sweep.png", "best"
PLOT_TOP = 20
SCORES = ("cv_accuracy", "cv_std", "cv_log_loss", "cv_log_loss_raw", "temperature", "fold_accuracy", "folds_done",
          "complete", "seconds")


def views_label(k: int, augment: str) -> str:
    """How a leaderboard names a view count: ``clean`` or e.g. ``standard x4``."""
    return "clean" if k == 0 else f"{augment} x{k}"


def csv_columns() -> list[str]:
    """The columns of ``sweep.csv``: rank, backbone, views, the head setting's fields, the scores, the full name."""
    return ["rank", "backbone", "aug_views", "augment", "head_setting", *Candidate.__dataclass_fields__,
            *SCORES, "pair_winner", "setting"]


def rank_rows(rows: Sequence[dict[str, Any]], winners: Collection[int] = ()) -> list[dict[str, Any]]:
    """Rows best first, with ``rank`` and ``pair_winner``, ranked as the selection ranks its own.

    ``winners`` holds the index of each (backbone, views) pair's first row, the setting ``train``
    would choose there. Rows go by log-loss (to 4 places; complete first, accuracy breaks ties, then
    the order given: backbones as listed, fewer views first).
    """
    def key(i: int) -> tuple[Any, ...]:
        return (not rows[i]["complete"], round(rows[i]["cv_log_loss"], 4), -rows[i]["cv_accuracy"], i)

    order = sorted(range(len(rows)), key=key)
    return [{"rank": r, **rows[i], "pair_winner": i in winners} for r, i in enumerate(order, 1)]


def write_csv(leaderboard: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per setting, best first; ``fold_accuracy`` joined by ``;``, absent values empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = csv_columns()
    writer.writerow(columns)
    for row in leaderboard:
        cells = {**row, "fold_accuracy": ";".join(repr(a) for a in row["fold_accuracy"])}
        writer.writerow(["" if cells.get(col) is None else cells[col] for col in columns])
    atomic_write_bytes(path, buffer.getvalue().encode())


def format_sweep(leaderboard: Sequence[dict[str, Any]], top: int = 20) -> str:
    """The leaderboard as a text table: rank, backbone, views, head setting, CV accuracy +- std, log-loss, seconds."""
    wb = max([len("backbone")] + [len(r["backbone"]) for r in leaderboard[:top]])
    wv = max([len("views")] + [len(views_label(r["aug_views"], r["augment"])) for r in leaderboard[:top]])
    wh = max([len("head setting")] + [len(r["head_setting"]) for r in leaderboard[:top]])
    lines = [f"{'rank':>4}  {'backbone':<{wb}}  {'views':<{wv}}  {'head setting':<{wh}}  {'CV accuracy':>17}  "
             f"{'log-loss':>8}  {'seconds':>7}"]
    for row in leaderboard[:top]:
        acc = f"{row['cv_accuracy']:.4f} +- {row['cv_std']:.4f}"
        note = "" if row["complete"] else f"  (dropped after {row['folds_done']} fold(s): trailing)"
        views = views_label(row["aug_views"], row["augment"])
        lines.append(f"{row['rank']:>4}  {row['backbone']:<{wb}}  {views:<{wv}}  {row['head_setting']:<{wh}}"
                     f"  {acc:>17}  {row['cv_log_loss']:>8.4f}  {row['seconds']:>7.2f}{note}")
    if len(leaderboard) > top:
        lines.append(f"      ... {len(leaderboard) - top} more (see {CSV_FILE})")
    return "\n".join(lines)


def plot_rows(leaderboard: Sequence[dict[str, Any]], top: int = PLOT_TOP) -> tuple[list[dict[str, Any]], set[int]]:
    """The rows to plot, in rank order: the winner of each (backbone, views) pair, then the best others up to ``top``.

    Returns the rows and the ranks of the pairs' winners (``pair_winner``; else each pair's first row).
    """
    pair_best: dict[tuple[str, int], int] = {}
    for row in sorted(leaderboard, key=lambda r: (not r.get("pair_winner"), r["rank"])):
        pair_best.setdefault((row["backbone"], row["aug_views"]), row["rank"])
    keep = set(pair_best.values())
    for row in leaderboard:
        if len(keep) >= top:
            break
        keep.add(row["rank"])
    return [r for r in leaderboard if r["rank"] in keep], set(pair_best.values())


def plot_leaderboard(leaderboard: Sequence[dict[str, Any]], path: Path, *, top: int = PLOT_TOP,
                     folds: int | None = None) -> None:
    """A PNG of the top settings' CV accuracy with +- one standard deviation over folds, best at the top.

    The winner of every (backbone, views) pair, the setting ``train`` would choose there, is always
    shown (in bold), so the plot compares them even when one pair holds all the top ranks.
    """
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend, no GUI
    from matplotlib.lines import Line2D

    rows, pair_best = plot_rows(leaderboard, top)
    acc = np.asarray([r["cv_accuracy"] for r in rows])
    std = np.asarray([r["cv_std"] for r in rows])
    backbones = list(dict.fromkeys(r["backbone"] for r in leaderboard))
    view_counts = sorted({r["aug_views"] for r in leaderboard})
    colors = {b: f"C{i % 10}" for i, b in enumerate(backbones)}
    markers = {k: "osD^v<>ph*"[i % 10] for i, k in enumerate(view_counts)}
    fig = Figure(figsize=(12, 2.2 + 0.3 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    for i, r in enumerate(rows):
        ax.errorbar(acc[i], i, xerr=std[i], fmt=markers[r["aug_views"]], color=colors[r["backbone"]], capsize=3,
                    markersize=6, alpha=1.0 if r["complete"] else 0.4)
        ax.annotate(f"{acc[i]:.3f} +- {std[i]:.3f}   log-loss {r['cv_log_loss']:.3f}", (1.0, i),
                    xycoords=ax.get_yaxis_transform(), xytext=(8, 0), textcoords="offset points", va="center",
                    fontsize=8, family="monospace")  # a column right of the axes, never over a point
    labels = [f"{r['rank']}. {r['backbone']} | {views_label(r['aug_views'], r['augment'])} | {r['head_setting']}"
              + ("" if r["complete"] else " (dropped)") for r in rows]
    ax.set_yticks(range(len(rows)), [label.replace("$", r"\$") for label in labels], fontsize=8)
    for tick, r in zip(ax.get_yticklabels(), rows):
        tick.set_fontweight("bold" if r["rank"] in pair_best else "normal")
    ax.set_ylim(len(rows) - 0.5, -0.5)  # best at the top
    low = float((acc - std).min()) if len(rows) else 0.0
    high = min(1.0, float((acc + std).max())) if len(rows) else 1.0  # no accuracy above 1, whatever the std
    pad = 0.05 * max(high - low, 0.02)
    ax.set_xlim(low - pad, high + pad)
    ax.grid(axis="x", alpha=0.3)
    cv = f"{folds}-fold " if folds else ""
    ax.set_xlabel(f"{cv}CV accuracy (mean +- std over folds)")
    ax.set_title(f"headstart sweep: {len(rows)} of {len(leaderboard)} settings, best first; bold: the winner of its "
                 "backbone and views\n(ranked as the head selection ranks: CV log-loss, accuracy among near-ties)",
                 fontsize=10)
    handles = [Line2D([], [], color=colors[b], marker="o", linestyle="", label=b) for b in backbones]
    handles += [Line2D([], [], color="0.4", marker=markers[k], linestyle="",
                       label="clean view only" if k == 0 else f"clean + {k} augmented views") for k in view_counts]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=min(len(handles), 6), frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
