"""The ensemble branch of ``headstart train`` (``--ensemble N`` or several backbones ``a,b,c``).

Each member is a complete single run trained into a scratch folder beside ``out``; the members are
then moved into one ensemble run folder, written once with its validation metrics. The ensemble's
validation probabilities are the average of the members' own (kept beside each member, so that
``--resume`` keeps finished members without scoring them again).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from ._io import atomic_write_bytes
from .ensemble import average_probabilities
from .metrics import classification_metrics
from .runs import EnsembleRun, Run, write_ensemble_run
from .train_common import HeldOut, log

if TYPE_CHECKING:
    from .training import TrainConfig

# trains one member: (config, data, out, progress) -> the saved run and its validation probabilities
MemberTrainer = Callable[["TrainConfig", Any, Path, bool], tuple[Run, HeldOut | None]]


def train_ensemble(config: TrainConfig, data: Any, out: Path, progress: bool,
                   train_member: MemberTrainer) -> EnsembleRun:
    """One member per backbone and per ``ensemble`` index, each a complete run, assembled into one folder.

    Members of one backbone share its cached features and differ in their bootstrap sample of the
    training split (and seed): heads on the same features with only another seed are nearly identical.
    The validation split is the same for every member.
    """
    backbones = [b.strip() for b in config.backbone.split(",") if b.strip()]
    plan = [(b, m) for b in backbones for m in range(config.ensemble)]
    scratch = out.parent / f".{out.name}.members"
    if not config.resume:
        shutil.rmtree(scratch, ignore_errors=True)
    members: list[Run] = []
    held_outs: list[HeldOut | None] = []
    for i, (name, m) in enumerate(plan):
        run, held_out = _member(config, data, scratch, i, len(plan), name, m, progress, train_member)
        members.append(run)
        held_outs.append(held_out)
    metrics = _ensemble_metrics(members, held_outs, progress)
    extra = {"config": asdict(config), "headstart_version": __version__, "metrics": metrics}
    ensemble = write_ensemble_run(out, members, [1.0] * len(members), move=True, extra=extra)
    shutil.rmtree(scratch, ignore_errors=True)
    log(progress, f"saved ensemble run ({len(plan)} members) to {out}")
    return ensemble


def _member(config: TrainConfig, data: Any, scratch: Path, i: int, n: int, name: str, m: int, progress: bool,
            train_member: MemberTrainer) -> tuple[Run, HeldOut | None]:
    """Member ``i`` of ``n`` (bootstrap sample ``m`` of backbone ``name``), trained or kept from a resumed run."""
    folder, held_path = scratch / str(i), scratch / f"{i}.val.npz"
    if config.resume and (folder / "run.json").is_file() and held_path.is_file():
        log(progress, f"ensemble member {i + 1}/{n}: already trained, kept")
        return Run.load(folder), _load_held_out(held_path)
    log(progress, f"ensemble member {i + 1}/{n}: {name}"
                  + (f", bootstrap sample {m + 1}" if config.ensemble > 1 else ""))
    params = dict(config.head_params)
    if config.head == "mlp" and config.select == "none":
        params["seed"] = config.seed * 1000 + m
    member_cfg = replace(config, backbone=name, ensemble=1, head_params=params,
                         cv=config.cv if config.select == "cv" else 0,
                         bootstrap=config.seed * 1000 + m if config.ensemble > 1 else None)
    run, held_out = train_member(member_cfg, data, folder, progress)
    _save_held_out(held_path, held_out)
    return run, held_out


def _ensemble_metrics(members: list[Run], held_outs: list[HeldOut | None], progress: bool) -> dict[str, Any]:
    """Each member's validation accuracy, and the ensemble's on the images every member could use."""
    metrics: dict[str, Any] = {"members": [m.metrics.get("val", {}).get("accuracy") for m in members]}
    scored = [h for h in held_outs if h is not None]
    if len(scored) < len(held_outs):  # no validation set
        return metrics
    ok = np.logical_and.reduce([h.ok for h in scored])
    if ok.any():
        proba = average_probabilities([h.proba[ok] for h in scored])
        metrics["val"] = classification_metrics(scored[0].labels[ok], proba, members[0].class_names)
        log(progress, f"ensemble validation accuracy {metrics['val']['accuracy']:.4f} "
                      f"(members: {', '.join(f'{a:.4f}' for a in metrics['members'] if a is not None)})")
    return metrics


def _save_held_out(path: Path, held_out: HeldOut | None) -> None:
    """Keep a member's validation probabilities beside it (empty arrays: no validation set)."""
    if held_out is None:
        held_out = HeldOut(np.zeros((0, 0)), np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64))
    buffer = io.BytesIO()
    np.savez(buffer, proba=held_out.proba, ok=held_out.ok, labels=held_out.labels)
    atomic_write_bytes(path, buffer.getvalue())


def _load_held_out(path: Path) -> HeldOut | None:
    with np.load(path) as saved:
        held_out = HeldOut(saved["proba"], saved["ok"], saved["labels"])
    return held_out if len(held_out.ok) else None
