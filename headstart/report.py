"""A self-contained HTML report of an evaluation: metrics, plots, calibration and the worst mistakes.

The page needs no network and no other file: plots are PNGs and thumbnails JPEGs, embedded as base64
``data:`` URIs. Every file and class name is HTML-escaped (a class folder may be called anything), and
plot labels are drawn as plain text, never as matplotlib mathtext.

Example:
    >>> metrics = headstart.evaluate("runs/photos", "photos_test/")                      # doctest: +SKIP
    >>> write_report("report.html", evaluation=metrics, proba=proba, y_true=y,            # doctest: +SKIP
    ...              class_names=metrics["class_names"], image_paths=paths)
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write_bytes
from ._validation import check_positive_int
from .errors import UsageError
from .metrics import classification_metrics

THUMBNAIL_PX = 128

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; background: #f5f6f8;
       color: #1f2328; }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
h1 { margin: 0 0 4px; font-size: 28px; }
h2 { margin: 0 0 12px; font-size: 20px; border-bottom: 1px solid #d8dee4; padding-bottom: 6px; }
section { background: #fff; border: 1px solid #d8dee4; border-radius: 8px; padding: 16px 20px; margin: 16px 0; }
.meta { color: #59636e; font-size: 14px; margin: 0; overflow-wrap: anywhere; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #d8dee4; border-radius: 6px; padding: 10px 16px; min-width: 120px; }
.card .value { font-size: 26px; font-weight: 600; }
.card .label { color: #59636e; font-size: 13px; }
table { border-collapse: collapse; font-size: 14px; }
th, td { padding: 4px 12px; border-bottom: 1px solid #eaeef2; text-align: right; }
th:first-child, td:first-child { text-align: left; overflow-wrap: anywhere; max-width: 420px; }
th { background: #f6f8fa; }
tr.low td { background: #fff1f0; }
img.plot { max-width: 100%; height: auto; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px; }
figure { margin: 0; border: 1px solid #d8dee4; border-radius: 6px; padding: 8px; font-size: 13px; }
figure img { display: block; margin: 0 auto 6px; max-width: 128px; max-height: 128px; }
figure .missing { height: 96px; display: flex; align-items: center; justify-content: center; color: #59636e; }
figcaption { overflow-wrap: anywhere; }
.wrong { color: #cf222e; } .right { color: #1a7f37; } .name { color: #59636e; font-size: 12px; }
.warn { color: #9a6700; background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 8px 12px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _check_proba(proba: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y)
    if proba.ndim != 2 or proba.shape[1] < 1:
        raise UsageError(f"proba must have shape (n_images, n_classes); got {proba.shape}")
    if y.shape != (len(proba),):
        raise UsageError(f"y_true must have shape ({len(proba)},) to match proba; got {y.shape}")
    if len(y) and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= proba.shape[1]):
        raise UsageError(f"y_true must hold integer class indices in 0..{proba.shape[1] - 1}")
    return proba, y.astype(np.int64)


def reliability_curve(proba: np.ndarray, y: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Accuracy against confidence (the top probability), in equal-width confidence bins.

    Args:
        proba: ``(n, k)`` probabilities.
        y: ``(n,)`` integer labels.
        n_bins: bins over ``[0, 1]``; bin ``b`` holds confidences in ``(edges[b], edges[b + 1]]``.

    Returns:
        ``{"edges": (n_bins + 1,), "confidence": (n_bins,), "accuracy": (n_bins,), "count": (n_bins,)}``;
        mean confidence and accuracy are NaN in empty bins.
    """
    proba, y = _check_proba(proba, y)
    check_positive_int(n_bins, "n_bins")
    confidence = proba.max(axis=1) if len(proba) else np.zeros(0)
    correct = (proba.argmax(axis=1) == y) if len(proba) else np.zeros(0, dtype=bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(bins, weights=correct.astype(np.float64), minlength=n_bins) / count
    return {"edges": edges, "confidence": mean_conf, "accuracy": accuracy, "count": count}


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error: the count-weighted mean gap between accuracy and confidence per bin.

    0 for a perfectly calibrated classifier; an overconfident one (confidence above its accuracy) scores
    the size of the gap. NaN for no images.

    Example:
        >>> expected_calibration_error(np.array([[0.9, 0.1], [0.9, 0.1]]), np.array([0, 1]))
        0.4
    """
    curve = reliability_curve(proba, y, n_bins)
    total = curve["count"].sum()
    if total == 0:
        return float("nan")
    used = curve["count"] > 0
    gaps = np.abs(curve["accuracy"][used] - curve["confidence"][used])
    return round(float((gaps * curve["count"][used]).sum() / total), 12)


# --------------------------------------------------------------------------------------------- plots


def _label(name: Any, limit: int = 24) -> str:
    """A class name as plain plot text: one line, shortened, ``$`` escaped so mathtext never parses it."""
    text = " ".join(str(name).split())
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return text.replace("$", r"\$")


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*[Gg]lyph.*missing.*")  # emoji etc. in a class name
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend, no GUI

    return Figure(figsize=(width, height), layout="constrained")


def _confusion_plot(matrix: np.ndarray, names: Sequence[str]) -> str:
    k = len(names)
    side = min(14.0, max(4.5, 0.45 * k + 2.5))
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    if k <= 40:
        labels = [_label(n) for n in names]
        ax.set_xticks(range(k), labels, rotation=60, ha="right", fontsize=9)
        ax.set_yticks(range(k), labels, fontsize=9)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=9,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return _png(fig)


def _reliability_plot(curve: dict[str, np.ndarray], ece: float) -> str:
    fig = _figure(5.5, 5.5)
    ax, hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    edges = curve["edges"]
    width = np.diff(edges)
    used = curve["count"] > 0
    left, accuracy, confidence = edges[:-1][used], curve["accuracy"][used], curve["confidence"][used]
    ax.bar(left, accuracy, width=width[used], align="edge", color="#4c8bd6", edgecolor="white", label="accuracy")
    ax.bar(left, confidence - accuracy, bottom=accuracy, width=width[used], align="edge", fill=False,
           hatch="///", edgecolor="#e5534b", linewidth=0.8, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="#59636e", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE {ece:.4f}")
    ax.legend(loc="upper left", fontsize=9)
    hist.bar(edges[:-1], curve["count"], width=width, align="edge", color="#8c959f", edgecolor="white")
    hist.set_xlabel("confidence (top probability)")
    hist.set_ylabel("images")
    return _png(fig)


def _curves_plot(curves: Sequence[dict[str, Any]]) -> str:
    from matplotlib.ticker import MaxNLocator

    keys: list[str] = []
    for row in curves:
        keys += [k for k, v in row.items() if k != "epoch" and k not in keys and isinstance(v, (int, float))
                 and not isinstance(v, bool)]
    groups = [[k for k in keys if "loss" in k], [k for k in keys if "loss" not in k]]
    groups = [g for g in groups if g]
    fig = _figure(5.0 * max(1, len(groups)), 3.8)
    for g, group in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), g + 1)
        for key in group:
            points = [(row.get("epoch", i + 1), row[key]) for i, row in enumerate(curves) if key in row]
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, label=_label(key, 40))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("loss" if "loss" in group[0] else "metrics")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    return _png(fig)


def _thumbnail(path: str) -> str | None:
    """A small JPEG of the image as base64, or None when it cannot be read."""
    from .data import decode_image
    from .errors import HeadstartError

    try:
        image = decode_image(path)
    except (HeadstartError, OSError):
        return None
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=82)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------- HTML


def html_page(title: str, parts: Sequence[str]) -> str:
    """A self-contained page in the report's style: ``parts`` are HTML already escaped (see :func:`section`)."""
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body><main>\n<h1>{_e(title)}</h1>\n"
            + "\n".join(p for p in parts if p) + "\n</main></body></html>\n")


def section(anchor: str, heading: str, body: str) -> str:
    """A titled section; ``heading`` is escaped, ``body`` is HTML."""
    return _section(anchor, heading, body)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table of escaped cells."""
    return _table(header, rows)


def gallery(items: Sequence[tuple[str, Sequence[str]]]) -> str:
    """Thumbnails of ``(image path, caption lines)``, every string escaped."""
    figures = []
    for path, lines in items:
        thumb = _thumbnail(path)
        image = _img(thumb, Path(path).name, "jpeg", "thumb") if thumb else '<div class="missing">unreadable</div>'
        caption = "<br>".join(_e(line) for line in lines)
        figures.append(f"<figure>{image}<figcaption>{caption}</figcaption></figure>")
    return f'<div class="gallery">{"".join(figures)}</div>'


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, (float, np.floating)):
        return "–" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def _percent(value: Any) -> str:
    return "–" if value is None or np.isnan(value) else f"{100 * value:.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        css = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{_e(_fmt(v))}</td>" for v in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(b64: str, alt: str, kind: str = "png", css: str = "plot") -> str:
    return f'<img class="{css}" alt="{_e(alt)}" src="data:image/{kind};base64,{b64}">'


def _section(anchor: str, heading: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(heading)}</h2>{body}</section>'


def _summary(metrics: dict[str, Any], top: int, ece: float) -> str:
    cards = [("accuracy", _percent(metrics.get("accuracy"))),
             (f"top-{top} accuracy", _percent(metrics.get(f"top{top}_accuracy"))),
             ("images", _fmt(metrics.get("n_images"))),
             ("ECE", f"{ece:.4f}" if not np.isnan(ece) else "–")]
    if metrics.get("ms_per_image") is not None:
        cards.append(("ms per image", _fmt(float(metrics["ms_per_image"]))))
    if metrics.get("n_bad_files"):
        cards.append(("unreadable files", _fmt(metrics["n_bad_files"])))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="value">{_e(v)}</div><div class="label">{_e(k)}</div></div>'
        for k, v in cards) + "</div>"


def _per_class(metrics: dict[str, Any], names: Sequence[str]) -> str:
    per_class = metrics["per_class"]
    rows, css = [], []
    for name in names:
        m = per_class.get(name, {})
        rows.append([name, m.get("precision"), m.get("recall"), m.get("f1"), m.get("support")])
        css.append("low" if m.get("f1") is not None and m.get("support") and m["f1"] < 0.5 else "")
    return _table(["class", "precision", "recall", "F1", "support"], rows, css)


def _mistakes(proba: np.ndarray, y: np.ndarray, names: Sequence[str], paths: Sequence[str], limit: int) -> str:
    pred = proba.argmax(axis=1)
    wrong = np.flatnonzero(pred != y)
    if not len(wrong):
        return "<p>No mistakes: every image was classified correctly.</p>"
    order = wrong[np.argsort(-proba[wrong, pred[wrong]], kind="stable")][:limit]
    cards = []
    for i in order:
        thumb = _thumbnail(paths[i])
        picture = (_img(thumb, Path(paths[i]).name, kind="jpeg", css="thumb") if thumb
                   else '<div class="missing">image unavailable</div>')
        cards.append(
            f'<figure title="{_e(paths[i])}">{picture}<figcaption>'
            f'<div class="wrong">predicted {_e(names[pred[i]])} ({proba[i, pred[i]]:.3f})</div>'
            f'<div class="right">true {_e(names[y[i]])} ({proba[i, y[i]]:.3f})</div>'
            f'<div class="name">{_e(Path(paths[i]).name)}</div></figcaption></figure>')
    shown = f"the {len(order)} most confident of {len(wrong)}" if len(wrong) > len(order) else f"all {len(wrong)}"
    return (f"<p>Wrong predictions with the highest confidence ({shown}); predicted and true class with their "
            f'probabilities.</p><div class="gallery">{"".join(cards)}</div>')


def _leakage(pairs: Sequence[Sequence[str]], limit: int = 50) -> str:
    """The byte-identical (train, val) pairs: validation figures of the run are optimistic."""
    note = (f"<p class=\"warn\">{len(pairs)} validation image(s) are byte-identical copies of training images: "
            "the run's validation figures count them and are optimistic. Remove the copies from one side.</p>")
    rows = [[a, b] for a, b in list(pairs)[:limit]]
    more = f"<p>... and {len(pairs) - limit} more (run.json lists them all).</p>" if len(pairs) > limit else ""
    return note + _table(["training file", "validation file"], rows) + more


def _ablation(rows: Sequence[dict[str, Any]]) -> str:
    header: list[str] = []
    for row in rows:
        header += [k for k in row if k not in header]
    return _table(header, [[row.get(k) for k in header] for row in rows])


def _selection(selections: Sequence[dict[str, Any]], top: int = 15) -> str:
    """The chosen head setting of each model and its cross-validation leaderboard."""
    parts = []
    for sel in selections:
        rows = [[i, r["setting"], r["cv_accuracy"], r["cv_std"], r["cv_log_loss"], r.get("temperature"),
                 r.get("folds_done"), r.get("seconds")]
                for i, r in enumerate(sel.get("leaderboard", [])[:top], 1)]
        who = f"{sel['member']}: " if sel.get("member") else ""
        parts.append(f"<p>{_e(who)}chosen <b>{_e(sel.get('chosen'))}</b> among {_e(sel.get('n_candidates'))} "
                     f"settings by {_e(sel.get('folds'))}-fold cross-validation on the training images, then "
                     "refitted on all of them.</p>"
                     + _table(["rank", "setting", "CV accuracy", "+-", "CV log-loss", "T", "folds", "seconds"], rows))
    return ("".join(parts) + "<p>Log-loss at each setting's temperature T (its logits divided by T, fitted out of "
            "fold; the chosen head ships with it). The CV figures are the selection's own (slightly optimistic); "
            "this page's accuracy "
            "is measured on the evaluated data.</p>")


def write_report(
    path: str | os.PathLike[str],
    *,
    evaluation: dict[str, Any],
    proba: np.ndarray,
    y_true: np.ndarray,
    class_names: list[str],
    image_paths: list[str],
    title: str = "headstart evaluation",
    curves: list[dict[str, Any]] | None = None,
    ablation: list[dict[str, Any]] | None = None,
    selection: list[dict[str, Any]] | None = None,
    leakage: Sequence[Sequence[str]] | None = None,
    inspection: Sequence[tuple[str, str]] | None = None,
    top_k: int = 5,
    n_mistakes: int = 24,
) -> Path:
    """Write one self-contained HTML page about an evaluation; returns its path.

    Args:
        path: the ``.html`` file to write (atomically: a temporary file renamed into place).
        evaluation: the dict from :func:`headstart.evaluate`; its numbers are shown as they are, and
            any it lacks (accuracy, top-k, per-class, confusion matrix) are computed from ``proba``.
        proba: ``(n, k)`` probabilities, columns in ``class_names`` order.
        y_true: ``(n,)`` integer labels into ``class_names``.
        class_names: the ``k`` class names.
        image_paths: the ``n`` image files, for the gallery of mistakes.
        title: page title.
        curves: per-epoch dicts such as ``{"epoch": 1, "train_loss": 0.4, "val_accuracy": 0.9}``.
        ablation: rows such as ``{"setting": "+TTA", "accuracy": 0.97, "ms_per_image": 12.3}``.
        selection: per model, the run's head selection (``run.metrics["selection"]``, plus an optional
            ``"member"`` name): the chosen setting and the leaderboard.
        leakage: (training file, validation file) pairs with the same bytes in the run's given splits;
            shown first, as a warning, when there are any.
        inspection: ``(label, page)`` links to ``headstart inspect`` pages of the data involved.
        top_k: ``k`` of the top-k accuracy shown.
        n_mistakes: how many of the most confident wrong predictions the gallery shows.

    Returns:
        The path written.
    """
    proba, y = _check_proba(proba, y_true)
    names = [str(n) for n in class_names]
    top = _check_report_inputs(proba, names, image_paths, top_k, evaluation)
    metrics = {**classification_metrics(y, proba, names, top_k=top), **evaluation}
    matrix = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    if matrix.shape != (len(names), len(names)):
        raise UsageError(f"evaluation['confusion_matrix'] has shape {matrix.shape}; expected "
                         f"({len(names)}, {len(names)}) for {len(names)} classes")
    meta = _meta(metrics, top) + _links(inspection or [])
    parts = [f"<h1>{_e(title)}</h1>", meta, *_sections(metrics, matrix, proba, y, names, top),
             _section("mistakes", "Most confident mistakes", _mistakes(proba, y, names, image_paths, n_mistakes))]
    if leakage:
        parts.insert(2, _section("leakage", "Warning: the same images in training and validation",
                                 _leakage(leakage)))
    if curves:
        parts.insert(-1, _section("curves", "Training curves", _img(_curves_plot(curves), "training curves")))
    if selection:
        parts.append(_section("selection", "Head selection", _selection(selection)))
    if ablation:
        parts.append(_section("ablation", "Ablation", _ablation(ablation)))
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body><main>\n"
            + "\n".join(p for p in parts if p) + "\n</main></body></html>\n")
    out = Path(path)
    atomic_write_bytes(out, page.encode("utf-8"))
    return out


def _check_report_inputs(proba: np.ndarray, names: list[str], image_paths: Sequence[str], top_k: Any,
                         evaluation: dict[str, Any]) -> int:
    """Raise :class:`UsageError` when the arguments of :func:`write_report` disagree; returns the top-k shown."""
    if proba.shape[1] != len(names):
        raise UsageError(f"proba has {proba.shape[1]} columns but there are {len(names)} class names")
    if len(image_paths) != len(proba):
        raise UsageError(f"image_paths has {len(image_paths)} entries but proba has {len(proba)} rows")
    check_positive_int(top_k, "top_k")
    if evaluation.get("class_names") is not None and list(evaluation["class_names"]) != names:
        raise UsageError("evaluation['class_names'] differs from class_names; pass the run's class names in the "
                         "order of the probability columns")
    return min(top_k, len(names))


def _meta(metrics: dict[str, Any], top: int) -> str:
    """The line under the title: run, data, and the top-k accuracies other than the summary's."""
    meta = [f"{key}: {metrics[key]}" for key in ("run", "data") if metrics.get(key)]
    other_topk = sorted(k for k in metrics if re.fullmatch(r"top\d+_accuracy", k) and k != f"top{top}_accuracy")
    meta += [f"{k.replace('_', ' ')}: {_percent(metrics[k])}" for k in other_topk]
    return f'<p class="meta">{_e(" · ".join(meta))}</p>' if meta else ""


def _links(pages: Sequence[tuple[str, str]]) -> str:
    """Links to the inspection pages (label errors, duplicates, outliers) of the data involved."""
    links = [f'<a href="{_e(Path(page).resolve().as_uri())}">{_e(label)}</a>' for label, page in pages]
    return f'<p class="meta">inspection findings: {" · ".join(links)}</p>' if links else ""


def _sections(metrics: dict[str, Any], matrix: np.ndarray, proba: np.ndarray, y: np.ndarray, names: list[str],
              top: int) -> list[str]:
    """Summary, per-class table, confusion matrix and calibration."""
    curve = reliability_curve(proba, y)
    ece = expected_calibration_error(proba, y)
    return [_section("summary", "Summary", _summary(metrics, top, ece)),
            _section("per-class", "Per-class precision, recall and F1", _per_class(metrics, names)),
            _section("confusion", "Confusion matrix",
                     "<p>Rows: true class; columns: predicted class; shade: fraction of the row.</p>"
                     + _img(_confusion_plot(matrix, names), "confusion matrix")),
            _section("calibration", "Calibration",
                     f"<p>Expected calibration error (15 bins): <b>{ece:.4f}</b>. Bars below the diagonal "
                     "mean the model is more confident than it is accurate.</p>"
                     + _img(_reliability_plot(curve, ece), "reliability diagram"))]
