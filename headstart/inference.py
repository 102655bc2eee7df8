"""Probabilities of a saved run (single or ensemble), with optional test-time multi-crop.

An *ensemble run* is a folder whose ``run.json`` says ``"type": "ensemble"`` and lists member runs
stored inside it (``members/0``, ``members/1`` ...); every member is a complete single run, so
evaluating an ensemble reuses everything a single run does, and each member's features (and crop
features) come from the cache of its own backbone.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backbones import Backbone, create_backbone
from .cache import FeatureCache, MissingShardError
from .data import BadFile
from .ensemble import average_probabilities, check_compatible
from .errors import RunError, UsageError
from .features import FeatureResult, View, extract_views
from .runs import RUN_FILE, RUN_FORMAT, Run, check_out_folder, swap_into_place
from .tta import TTA_MODES, predict_proba_cached, tta_views


@dataclass
class EnsembleRun:
    """Members (complete single runs inside the folder) whose probabilities are averaged."""

    path: Path
    info: dict[str, Any]
    members: list[Run]
    weights: list[float]

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    @property
    def metrics(self) -> dict[str, Any]:
        return self.info.get("metrics", {})


AnyRun = Run | EnsembleRun


def load_run(path: str | os.PathLike[str]) -> AnyRun:
    """Load a single or an ensemble run."""
    path = Path(path)
    info_path = path / RUN_FILE
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise RunError(f"run '{path}' is damaged ({exc}); train it again") from None
        if info.get("type") == "ensemble":
            members = [Run.load(path / m["path"]) for m in info.get("members", [])]
            if not members:
                raise RunError(f"ensemble run '{path}' lists no members")
            return EnsembleRun(path, info, members, [float(m.get("weight", 1.0)) for m in info["members"]])
    return Run.load(path)


def members_of(run: AnyRun) -> list[Run]:
    return run.members if isinstance(run, EnsembleRun) else [run]


# ------------------------------------------------------------------------------------------ probabilities


@dataclass
class Probabilities:
    """Averaged class probabilities of the images that could be used."""

    proba: np.ndarray  # (n_ok, n_classes), columns in the run's class order
    ok: np.ndarray  # (n,) bool
    bad_files: list[BadFile] = field(default_factory=list)
    n_computed: int = 0  # backbone forwards (views) this call needed
    seconds: float = 0.0


def run_backbone(run: Run, weights: str | None, cache: FeatureCache) -> Backbone:
    """The backbone a run was trained on, with the run's own preprocessing; refuses other weights."""
    spec = run.info["backbone"]
    source = weights if weights is not None else spec["weights"]
    if source.startswith("run:"):  # fine-tuned weights saved inside the run folder
        source = str(run.path / source.removeprefix("run:"))
    if source not in ("default", "random") and not Path(source).exists():
        raise RunError(f"run '{run.path}' was trained with the weights file '{source}', which is missing; "
                       "pass its new location with --weights")
    bb = create_backbone(spec["name"], source, memo=cache)
    bb.data_config = dict(run.info["data_config"])  # the run's preprocessing, whatever timm resolves today
    if bb.weights_digest != spec["weights_digest"]:
        raise RunError(
            f"run '{run.path}' was trained on '{spec['name']}' weights with digest {spec['weights_digest'][:12]}, "
            f"but the weights found now have digest {bb.weights_digest[:12]}; pass the original file with --weights"
        )
    return bb


def _align(proba: np.ndarray, head_classes: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """Columns of ``proba`` (ordered as ``head_classes``) rearranged to ``class_names``; absent = 0."""
    out = np.zeros((len(proba), len(class_names)))
    position = {str(c): i for i, c in enumerate(head_classes)}
    for j, name in enumerate(class_names):
        if name in position:
            out[:, j] = proba[:, position[name]]
    return out


def view_probabilities(head: Any, backbone: Backbone, paths: Sequence[Path], views: Sequence[View],
                       cache: FeatureCache, *, precision: str = "auto", average: str = "mean", batch_size: int = 32,
                       num_workers: int | None = None, progress: bool = True, desc: str = "features",
                       ) -> tuple[np.ndarray, FeatureResult]:
    """One head's probabilities for ``paths``, averaged over ``views`` (e.g. :func:`~headstart.tta.tta_views`).

    Missing features are computed into the cache; then the features are read back block by block
    (:func:`~headstart.tta.predict_proba_cached`), so memory stays bounded whatever the number of crops.

    Returns:
        (probabilities of the images in ``result.ok``, columns in ``head.classes_`` order; the extraction result).
    """
    computed = 0
    for attempt in range(3):  # a shard that vanished meanwhile is dropped from the index; extracting refills it
        result = extract_views(backbone, paths, views, cache=cache, precision=precision, batch_size=batch_size,
                               num_workers=num_workers, progress=progress, load=False, desc=desc)
        computed = result.n_computed = computed + result.n_computed
        try:
            return predict_proba_cached(head, cache, result, average), result
        except MissingShardError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def run_probabilities(run: AnyRun, paths: Sequence[Path], cache: FeatureCache, *, tta: str = "none",
                      average: str = "mean", members: Sequence[int] | None = None, weights: str | None = None,
                      batch_size: int = 32, num_workers: int | None = None, progress: bool = True) -> Probabilities:
    """Class probabilities for ``paths``: per member, per TTA view, averaged (views, then members).

    Args:
        tta: ``none``, ``flip``, ``5crop``, ``10crop`` or ``multiscale``; all views of a batch of images
            go through the backbone as one batch, and crop features are cached like the rest.
        average: how views are averaged: ``mean`` or ``geomean``.
        members: indices of the ensemble members to use (default all); a single run is member 0.
        weights: a backbone weights file that replaces the run's recorded one (single runs only).
    """
    if tta not in TTA_MODES:
        raise UsageError(f"tta must be one of {', '.join(TTA_MODES)}; got '{tta}'")
    start = time.perf_counter()
    all_members = members_of(run)
    chosen = list(range(len(all_members))) if members is None else list(members)
    if weights is not None and len(all_members) > 1:
        raise UsageError("--weights replaces the backbone file of a single run; an ensemble's members keep theirs")
    names = run.class_names
    if not paths:
        return Probabilities(proba=np.zeros((0, len(names))), ok=np.zeros(0, dtype=bool))
    probas, oks, computed = [], None, 0
    bad: dict[str, BadFile] = {}
    for i in chosen:
        member = all_members[i]
        bb = run_backbone(member, weights, cache)
        views = tta_views(bb.data_config, tta)
        member_proba, result = view_probabilities(
            member.head, bb, paths, views, cache, precision=member.info["preprocessing"]["precision"],
            average=average, batch_size=batch_size, num_workers=num_workers, progress=progress,
            desc=f"features ({bb.name}, {len(views)} view{'s' if len(views) > 1 else ''})")
        computed += result.n_computed
        full = np.zeros((len(paths), len(names)))
        full[result.ok] = _align(member_proba, member.head.classes_, names)
        probas.append(full)
        oks = result.ok if oks is None else oks & result.ok
        for item in result.bad_files:  # a file can fail for one member only (e.g. non-finite features)
            bad.setdefault(item.path, item)
    assert oks is not None
    member_weights = [run.weights[i] for i in chosen] if isinstance(run, EnsembleRun) else None
    proba = average_probabilities([p[oks] for p in probas], member_weights)
    return Probabilities(proba=proba, ok=oks, bad_files=list(bad.values()), n_computed=computed,
                         seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ ensembles on disk


def write_ensemble(out: Path, member_dirs: Sequence[Path], *, weights: Sequence[float] | None = None,
                   move: bool = False, extra: dict[str, Any] | None = None) -> EnsembleRun:
    """Assemble member runs into one ensemble run folder at ``out`` (built aside, renamed into place)."""
    runs = [load_run(d) for d in member_dirs]
    flat: list[tuple[Path, float]] = []
    for r, w in zip(runs, weights or [1.0] * len(runs)):
        if isinstance(r, EnsembleRun):  # an ensemble of ensembles is flattened into its members
            total = sum(r.weights)  # the inner ensemble as a whole gets weight w
            flat.extend((m.path, w * mw / total) for m, mw in zip(r.members, r.weights))
        else:
            flat.append((r.path, float(w)))
    members = [Run.load(p) for p, _ in flat]
    check_compatible([m.class_names for m in members], [str(p) for p, _ in flat])
    if any(w < 0 for _, w in flat) or not sum(w for _, w in flat) > 0:
        raise UsageError("ensemble weights must be >= 0 and not all zero")
    check_out_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    (staging / "members").mkdir(parents=True)
    try:
        entries = []
        for i, (path, weight) in enumerate(flat):
            target = staging / "members" / str(i)
            if move:
                shutil.move(str(path), target)
            else:
                shutil.copytree(path, target)
            member = Run.load(target)
            entries.append({"path": f"members/{i}", "weight": weight, "backbone": member.backbone_name,
                            "freeze": member.info["backbone"].get("freeze", "all"),
                            "source": str(path) if not move else None})
        info = {"format": RUN_FORMAT, "type": "ensemble", "class_names": members[0].class_names,
                "members": entries, **(extra or {})}
        (staging / RUN_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
        swap_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    run = load_run(out)
    assert isinstance(run, EnsembleRun)
    return run


def combine_runs(run_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                 weights: Sequence[float] | None = None) -> EnsembleRun:
    """``headstart ensemble RUN_A RUN_B ... --out RUN``: copy existing runs with the same classes into one."""
    if len(run_dirs) < 2:
        raise UsageError("an ensemble needs at least 2 runs")
    if weights is not None and len(weights) != len(run_dirs):
        raise UsageError(f"{len(weights)} weights for {len(run_dirs)} runs; give one weight per run")
    return write_ensemble(Path(out), [Path(d) for d in run_dirs], weights=weights)
