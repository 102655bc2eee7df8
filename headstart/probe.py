"""``--freeze probe``: choose the freeze depth from evidence instead of habit.

One pass over the data extracts the globally average-pooled output of *every* stage (one forward per
image, one cached row holding all stages side by side), a cheap linear head is fitted on each stage's
features, and its validation accuracy is measured. The rule:

* the stage whose features score best is the deepest one worth keeping as it is: freeze the stages
  up to and including it, and fine-tune everything above (they are the most ImageNet-specific);
* when the last stage scores best (within ``tolerance`` of the best), the pre-trained features already
  suit the task: freeze all and train the head only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .backbones import Backbone
from .cache import FeatureCache
from .data import ImageSet
from .errors import DataError
from .features import Cut, clean_view, extract_views
from .heads import LinearHead
from .stages import stage_plan

PROBE_VERSION = 1


def _probe_cut(backbone: Backbone) -> tuple[Cut, list[tuple[str, int, int]]]:
    """A cut whose row is [pool(stage 1) | pool(stage 2) | ... | pooled features]; and the column spans."""
    plan = stage_plan(backbone.model)
    with torch.no_grad():
        x = torch.zeros(1, *backbone.data_config["input_size"])
        widths = []
        for i in range(len(plan)):
            x = plan.run(x, i, i + 1)
            widths.append(x.shape[1])
    spans, start = [], 0
    for name, width in [*zip(plan.names, widths), ("pooled features", backbone.num_features)]:
        spans.append((name, start, start + width))
        start += width

    def forward(model: Any, images: torch.Tensor) -> torch.Tensor:
        steps = stage_plan(model)
        pooled, h = [], images
        for i in range(len(steps)):
            h = steps.run(h, i, i + 1)
            pooled.append(h.float().mean(dim=(2, 3)))
        pooled.append(steps.tail(h).float())
        return torch.cat(pooled, dim=1)

    return Cut(f"probe-v{PROBE_VERSION}", forward, start), spans


def probe(backbone: Backbone, train_set: ImageSet, val_set: ImageSet | None, cache: FeatureCache, *,
          precision: str = "auto", num_workers: int | None = None, progress: bool = True,
          tolerance: float = 0.0) -> tuple[str | int, str, list[dict[str, Any]]]:
    """Fit a linear head on every stage's pooled output; returns (freeze choice, reason, table rows)."""
    if val_set is None or len(val_set) == 0:
        raise DataError("--freeze probe needs validation images to compare stages; use --val-split or a val/ folder")
    cut, spans = _probe_cut(backbone)
    view = [clean_view(backbone.data_config)]
    kw = {"cache": cache, "cut": cut, "precision": precision, "num_workers": num_workers, "progress": progress}
    train = extract_views(backbone, train_set.paths, view, desc="probe (train)", **kw)
    val = extract_views(backbone, val_set.paths, view, desc="probe (val)", **kw)
    x_train, y_train = train.features[train.ok, 0], train_set.labels[train.ok]
    x_val, y_val = val.features[val.ok, 0], val_set.labels[val.ok]
    if len(np.unique(y_train)) < 2 or not len(y_val):
        raise DataError("--freeze probe needs usable training images of 2+ classes and validation images; fix the "
                        "skipped files, add images, or choose the depth yourself (--freeze all or --freeze N)")
    rows = []
    for index, (name, a, b) in enumerate(spans):
        head = LinearHead(standardize=True).fit(x_train[:, a:b], y_train)
        rows.append({"stage": name, "freeze": index + 1 if index < len(spans) - 1 else "all",
                     "features": b - a, "val_accuracy": head.score(x_val[:, a:b], y_val)})
    choice, reason = choose_from_probe(rows, tolerance)
    return choice, reason, rows


def choose_from_probe(rows: Sequence[dict[str, Any]], tolerance: float = 0.0) -> tuple[str | int, str]:
    """The probe rule on its table (last row: the pooled features); see the module docstring."""
    scores = np.asarray([r["val_accuracy"] for r in rows])
    best = float(scores.max())
    if scores[-1] >= best - tolerance:
        return "all", (f"the pooled features score best ({scores[-1]:.4f}): the pre-trained features suit this "
                       "task; training the head only")
    stage = int(np.argmax(scores[:-1]))  # the first of equally good stages: the most generic one
    return stage + 1, (f"stage {rows[stage]['stage']} scores best ({best:.4f} vs {scores[-1]:.4f} for the pooled "
                       f"features): freezing stages 1..{stage + 1} and fine-tuning the rest")


def format_probe_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'freeze':>7}  {'stage':<16} {'features':>8}  val accuracy"]
    lines += [f"{r['freeze']!s:>7}  {r['stage']:<16} {r['features']:>8}  {r['val_accuracy']:.4f}" for r in rows]
    return "\n".join(lines)
