"""The Python API that the CLI mirrors: extract, train, evaluate, predict, export.

Example:
    >>> import headstart
    >>> run = headstart.train("photos/", out="runs/photos")          # doctest: +SKIP
    >>> headstart.evaluate("runs/photos", "photos_test/")["accuracy"]  # doctest: +SKIP
    0.97
    >>> headstart.predict("runs/photos", ["new.jpg"], top_k=2)        # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import distributed
from ._constants import ENGINES
from ._validation import (
    check_batch_size,
    check_choice,
    check_num_workers,
    check_precision,
    check_tta_average,
    check_tta_mode,
    check_weights,
    is_int,
)
from .backbones import DEFAULT_BACKBONE, Backbone, create_backbone
from .cache import FeatureCache
from .data import BadFile, ImageSet, in_class_order, list_image_paths, load_images, max_pixels
from .errors import DataError, UsageError
from .export import export  # noqa: F401  (part of this API)
from .features import extract_features
from .inference import run_probabilities
from .metrics import classification_metrics
from .runs import AnyRun, EnsembleRun, combine_runs, load_run, members_of
from .sweep import sweep  # noqa: F401  (part of this API)
from .training import TrainConfig, train  # noqa: F401  (part of this API)

EXTRACT_CHUNK = 10_000  # headstart features hashes, looks up and computes this many images at a time


def extract(
    data: str | os.PathLike[str],
    *,
    backbone: str | Backbone = DEFAULT_BACKBONE,
    weights: str = "default",
    cache_dir: str | os.PathLike[str] | None = None,
    precision: str = "auto",
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = True,
    engine: str = "auto",
) -> dict[str, Any]:
    """Pre-compute and cache the features of every image in ``data`` (``headstart features``).

    ``engine``: what runs the forward (``auto``, ``torch``, ``openvino``; :mod:`headstart.engines`).

    Under ``torchrun`` each rank computes its share of the images by content hash
    (:func:`headstart.distributed.my_share`) into the shared cache; every rank returns the summed
    counts (``ranks`` lists each rank's), and only rank 0 shows progress.
    """
    check_reading(batch_size, num_workers, None if isinstance(backbone, Backbone) else weights)
    check_precision(precision, "precision (--precision)")
    check_choice(engine, ENGINES, "engine (--engine)")
    with distributed.session():  # under torchrun (the CLI has joined already; from Python it joins here)
        return _extract(data, backbone, weights, cache_dir, precision, batch_size, num_workers, progress, engine)


def _extract(data: str | os.PathLike[str], backbone: str | Backbone, weights: str, cache_dir: Any, precision: str,
             batch_size: int, num_workers: int | None, progress: bool, engine: str) -> dict[str, Any]:
    """:func:`extract` after its checks, in this rank's process group if any."""
    loaded = load_images(data, val_split=0, min_classes=1)  # a train/ + val/ tree still yields both parts
    paths = loaded.train.paths + (loaded.val.paths if loaded.val else [])
    bad, computed, cached, seconds = [], 0, 0, 0.0
    with FeatureCache(cache_dir) as cache:
        bb = backbone if isinstance(backbone, Backbone) else create_backbone(backbone, weights, memo=cache)
        start = time.perf_counter()
        mine = [paths[i] for i in distributed.my_share(cache, paths)]  # every path without torchrun
        progress = progress and distributed.is_main()
        chunks = range(0, max(1, len(mine)), EXTRACT_CHUNK)
        for n, first in enumerate(chunks, 1):  # nothing per image outlives its chunk: memory stays flat
            result = extract_features(bb, mine[first:first + EXTRACT_CHUNK], cache=cache, precision=precision,
                                      batch_size=batch_size, num_workers=num_workers, progress=progress,
                                      engine=engine, load=False, full_batches=True,
                                      desc="features" if len(chunks) == 1 else f"features {n}/{len(chunks)}")
            bad += [b.to_dict() for b in result.bad_files]
            computed, cached, seconds = computed + result.n_computed, cached + result.n_cached, seconds + result.seconds
        root = str(cache.root)
    ranks = None
    if distributed.active():  # the ranks' counts, summed; the wall time of the slowest
        ranks = distributed.all_gather_json({"rank": distributed.rank(), "n_images": len(mine), "n_computed": computed,
                                             "n_cached": cached, "seconds": round(time.perf_counter() - start, 3),
                                             "bad_files": bad})
        computed, cached = sum(r["n_computed"] for r in ranks), sum(r["n_cached"] for r in ranks)
        seconds, bad = max(r["seconds"] for r in ranks), [b for r in ranks for b in r.pop("bad_files")]
    bad = [b.to_dict() for b in loaded.bad_files] + bad
    out = {"n_images": len(paths), "n_computed": computed, "n_cached": cached, "n_bad": len(bad), "bad_files": bad,
           "seconds": round(seconds, 3), "images_per_second": round(len(paths) / seconds, 2) if seconds else 0.0,
           "backbone": bb.name, "weights_digest": bb.weights_digest, "engine": result.engine,
           "precision": result.precision, "cache_dir": root}
    if ranks is not None:
        out["ranks"] = ranks
    return out


def check_reading(batch_size: Any, num_workers: Any, weights: Any = None, tta: str = "none",
                  tta_average: str = "mean") -> None:
    """The options every command that computes features shares, checked before any file is read."""
    check_batch_size(batch_size, "batch_size (--batch-size)")
    check_num_workers(num_workers, "num_workers (--workers)")
    check_tta_mode(tta, "tta (--tta)")
    check_tta_average(tta_average, "tta_average (--tta-average)")
    max_pixels()  # $HEADSTART_MAX_PIXELS, read by every decode
    if weights is not None:
        check_weights(weights)


def _images_for_evaluation(run: AnyRun, data: Any) -> tuple[Any, ImageSet, np.ndarray]:
    loaded = load_images(data, val_split=0, min_classes=1)
    images = loaded.val if loaded.val is not None else loaded.train
    ordered = in_class_order(images, run.class_names, str(data), f"run '{run.path}'",
                             "evaluate on those classes only, or train a run that has them")
    return loaded, images, ordered.labels


def evaluate(
    run_dir: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    tta: str = "none",
    tta_average: str = "mean",
    ablation: bool = False,
    report: str | os.PathLike[str] | None = None,
    weights: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy and per-class metrics of a saved run (single or ensemble) on labelled data.

    ``data`` is read like training data; for a ``train/``+``val/`` tree the validation part is used,
    otherwise every image. Its class names must be among the run's.

    Args:
        tta: test-time views: ``none``, ``flip``, ``5crop``, ``10crop``, ``multiscale``.
        tta_average: ``mean`` or ``geomean`` of the views' probabilities.
        ablation: also measure single model / +TTA / +ensemble / both (accuracy and ms per image);
            TTA rows use ``tta``, or ``10crop`` when ``tta`` is ``none``. Implied by ``report``.
        report: write a self-contained HTML report to this path.
    """
    start = time.perf_counter()
    check_reading(batch_size, num_workers, weights, tta, tta_average)
    run = load_run(run_dir)
    loaded, images, y_all = _images_for_evaluation(run, data)
    names = run.class_names
    with FeatureCache(cache_dir) as cache:
        kw = {"weights": weights, "batch_size": batch_size, "num_workers": num_workers, "progress": progress}
        probs = run_probabilities(run, images.paths, cache, tta=tta, average=tta_average, **kw)
        y = y_all[probs.ok]
        if not len(y):
            examples = "; ".join(f"{b.path}: {b.reason}" for b in probs.bad_files[:3])
            raise DataError(f"no usable image in '{data}' to evaluate ({len(images)} failed, e.g. {examples}); "
                            "fix or replace those files")
        out = classification_metrics(y, probs.proba, names)
        n_members = len(members_of(run))
        main_row = {"setting": _setting_name(tta, n_members), "tta": tta, "members": n_members,
                    "accuracy": out["accuracy"], "ms_per_image": round(1000 * probs.seconds / len(images), 3),
                    "features_computed": probs.n_computed}
        rows = [main_row]
        if ablation or report is not None:
            rows = _ablation(run, images.paths, y_all, cache, tta if tta != "none" else "10crop", tta_average, kw)
    seconds = time.perf_counter() - start
    bad = [b.to_dict() for b in loaded.bad_files + probs.bad_files]
    out.update({"seconds": round(seconds, 3), "n_bad_files": len(bad), "bad_files": bad,
                "run": str(run_dir), "data": str(data), "tta": tta, "tta_average": tta_average,
                "ensemble_size": n_members, "ms_per_image": main_row["ms_per_image"], "ablation": rows})
    if report is not None:
        from .report import write_report

        curves = members_of(run)[0].metrics.get("history")
        ok_paths = [str(p) for p, ok in zip(images.paths, probs.ok) if ok]
        members = members_of(run)
        selections = [{"member": f"{m.backbone_name} ({m.path.name})" if len(members) > 1 else "",
                       **m.metrics["selection"]} for m in members if "selection" in m.metrics]
        leaks = sorted({tuple(pair) for m in members
                        for pair in m.info.get("data", {}).get("identical_in_train_and_val", [])})
        pages = _inspection_pages(cache_dir, data, [m.info.get("data", {}).get("source") for m in members])
        out["report"] = str(write_report(Path(report), evaluation=out, proba=probs.proba, y_true=y,
                                         class_names=names, image_paths=ok_paths, curves=curves, ablation=rows,
                                         selection=selections, leakage=leaks, inspection=pages,
                                         title=f"headstart evaluation of {Path(run_dir).name} on {Path(data).name}"))
    return out


def _inspection_pages(cache_dir: Any, data: Any, training: Sequence[str | None]) -> list[tuple[str, str]]:
    """``(label, page)`` of the ``headstart inspect`` pages of the evaluated data and the training data."""
    from .inspection import findings_page

    with FeatureCache(cache_dir) as cache:
        wanted = [("evaluated data", data)] + [("training data", t) for t in dict.fromkeys(training) if t]
        found = [(label, findings_page(cache, where)) for label, where in wanted]
    return [(label, page) for label, page in found if page]


def _setting_name(tta: str, n_members: int) -> str:
    parts = ["single model" if n_members == 1 else f"ensemble of {n_members}"]
    if tta != "none":
        parts.append(f"+ {tta} TTA")
    return " ".join(parts)


ABLATION_COLD_SAMPLE = 64  # images timed with an empty cache per ablation row


def _ablation(run: AnyRun, paths: Sequence[Path], y_all: np.ndarray, cache: FeatureCache, tta: str, average: str,
              kw: dict[str, Any]) -> list[dict[str, Any]]:
    """Single model / +TTA / +ensemble / both: accuracy, and ms per image cold and cached.

    Accuracy uses every image. ``ms_per_image`` is the cost with features already cached (a re-run);
    ``ms_per_image_cold`` is measured on up to 64 images with an empty cache (decode + every forward).
    """
    import tempfile

    n_members = len(members_of(run))
    settings = [("single model", "none", [0]), (f"single model + {tta} TTA", tta, [0])]
    if n_members > 1:
        everyone = list(range(n_members))
        settings += [(f"ensemble of {n_members}", "none", everyone),
                     (f"ensemble of {n_members} + {tta} TTA", tta, everyone)]
    sample = list(paths)[:: max(1, len(paths) // ABLATION_COLD_SAMPLE)][:ABLATION_COLD_SAMPLE]
    quiet = {**kw, "progress": False}
    rows = []
    for name, mode, members in settings:
        run_probabilities(run, paths, cache, tta=mode, average=average, members=members, **kw)  # fill the cache
        probs = run_probabilities(run, paths, cache, tta=mode, average=average, members=members, **quiet)
        with tempfile.TemporaryDirectory() as tmp, FeatureCache(tmp) as empty:
            cold = run_probabilities(run, sample, empty, tta=mode, average=average, members=members, **quiet)
        y = y_all[probs.ok]
        accuracy = float((probs.proba.argmax(1) == y).mean()) if len(y) else float("nan")
        rows.append({"setting": name, "tta": mode, "members": len(members), "accuracy": accuracy,
                     "ms_per_image": round(1000 * probs.seconds / max(1, len(paths)), 3),
                     "ms_per_image_cold": round(1000 * cold.seconds / max(1, len(sample)), 2)})
    return rows


def predict(
    run_dir: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    *,
    top_k: int = 1,
    tta: str = "none",
    tta_average: str = "mean",
    weights: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Top-k classes with probabilities for image files and folders (searched recursively).

    Returns:
        ``{"predictions": [{"path", "label", "probability", "top_k": [[label, p], ...]}], "bad_files": [...]}``
    """
    if not is_int(top_k) or top_k < 1:
        raise UsageError(f"top_k (--top-k) must be a whole number >= 1 (classes listed per image); got {top_k!r}")
    check_reading(batch_size, num_workers, weights, tta, tta_average)
    run = load_run(run_dir)
    paths, listing_bad = list_image_paths(inputs)
    with FeatureCache(cache_dir) as cache:
        probs = run_probabilities(run, paths, cache, tta=tta, average=tta_average, weights=weights,
                                  batch_size=batch_size, num_workers=num_workers, progress=progress)
    names = run.class_names
    k = min(top_k, len(names))
    predictions = []
    for path, p in zip([p for p, ok in zip(paths, probs.ok) if ok], probs.proba):
        order = np.argsort(-p)[:k]
        predictions.append({"path": str(path), "label": names[order[0]], "probability": float(p[order[0]]),
                            "top_k": [[names[j], float(p[j])] for j in order]})
    bad: list[BadFile] = listing_bad + probs.bad_files
    return {"predictions": predictions, "bad_files": [b.to_dict() for b in bad], "class_names": names,
            "tta": tta, "ensemble_size": len(members_of(run))}


def make_ensemble(run_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                  member_weights: Sequence[float] | None = None) -> EnsembleRun:
    """Combine existing runs with the same classes into one ensemble run (``headstart ensemble``).

    ``member_weights`` (one per run, ``--member-weights``) weigh the runs' probabilities; default equal.
    """
    return combine_runs(run_dirs, out, member_weights)
