"""Fine-tuning with the first N stages frozen, trained from cached activations at the cut.

``freeze`` is ``all`` (head only, the cached pooled features; see :mod:`headstart.api`), ``none``
(train everything), an integer N (freeze the first N stages of :func:`headstart.stages.stage_plan`),
``auto`` (compare depths on a held-out fold: :mod:`headstart.freeze_auto`) or ``probe``
(:mod:`headstart.probe`).

When N >= 1 stages are frozen, their output never changes, so it is computed once per view (the
clean view and K augmented views) and cached on disk in float16 (the seed's speed trick, one level
deeper); each epoch reads a random view per image from the memory-mapped cache and trains only the
top stages and the head. Frozen stages stay frozen for real: no gradients and BatchNorm in eval
mode (with the cut cache they do not even run).

The loop: AdamW or SGD, linear warm-up then cosine decay per step, label smoothing, discriminative
learning rates (each stage below the top gets ``lr_decay`` times the rate of the one above), optional
gradual unfreezing, early stopping on validation accuracy with the best weights kept, bf16 autocast on
CPUs with AMX and on GPUs, metrics per epoch in JSONL, and a checkpoint every ``checkpoint_every``
steps from which ``resume`` continues exactly: data order, view choice and dropout are seeded per
(seed, epoch, step), so a resumed run reproduces an uninterrupted one.

The parts: :mod:`headstart.finetune_model` (the network, freezing, optimiser),
:mod:`headstart.finetune_data` (cut-cached or full-image batches), :mod:`headstart.finetune_loop`
(the epochs) and :mod:`headstart.checkpoint` (saving and exact resume).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from ._constants import FREEZE_MODES, OPTIMIZERS
from ._validation import check_choice
from .backbones import Backbone
from .cache import FeatureCache
from .checkpoint import Checkpoint, TrainState, load_state, save_state, settings_hash
from .data import ImageSet, require_every_class
from .errors import UsageError
from .features import View
from .finetune_data import CutData, ImageData, cut_data, image_data
from .finetune_loop import Evaluator, Loop, evaluate, predict, train_epochs
from .finetune_model import FinetuneModel, freeze_stages, make_optimizer, param_groups, set_train_mode
from .preprocess import resolve_precision
from .stages import stage_plan

__all__ = ["FinetuneConfig", "FinetuneModel", "FinetuneResult", "cleanup", "finetune", "freeze_stages",
           "load_state", "param_groups", "parse_freeze", "save_state", "set_train_mode"]


@dataclass
class FinetuneConfig:
    """Settings of the fine-tuning loop (``headstart train --freeze ...``)."""

    epochs: int = 8  # passes over the training images
    lr: float = 1e-3  # peak learning rate of the head; lower layers get lr * lr_decay ** depth
    lr_decay: float = 0.5  # discriminative learning rates: 1.0 = the same rate everywhere
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum 0.9, nesterov)
    weight_decay: float = 0.01  # decoupled weight decay (AdamW) / L2 (SGD)
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to zero
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    patience: int = 3  # early stopping: epochs without a better validation accuracy
    gradual: int = 0  # gradual unfreezing: one more stage (from the top) every `gradual` epochs; 0 = off
    batch_size: int = 32  # images per optimiser step
    cache_cut: bool = True  # cache the frozen stages' output (False: recompute it every step)
    checkpoint_every: int = 50  # optimiser steps between checkpoints (and at each epoch end)
    deterministic: bool = False  # torch.use_deterministic_algorithms during training

    def validate(self) -> None:
        """Refuse values that cannot train; messages name the ``headstart train`` flag too."""
        for name in ("epochs", "batch_size", "checkpoint_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise UsageError(f"{_flag(name)} must be a positive integer; got {getattr(self, name)!r}")
        for name in ("weight_decay", "warmup_epochs", "label_smoothing"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0):
                raise UsageError(f"{_flag(name)} must be a number >= 0; got {getattr(self, name)!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise UsageError(f"{_flag('lr')} must be a number > 0, e.g. 1e-3; got {self.lr!r}")
        if not 0 < self.lr_decay <= 1:
            raise UsageError(f"{_flag('lr_decay')} must be in (0, 1] (1 = one rate for every stage); "
                             f"got {self.lr_decay}")
        if self.label_smoothing >= 1:
            raise UsageError(f"{_flag('label_smoothing')} must be below 1, e.g. 0.1; got {self.label_smoothing}")
        check_choice(self.optimizer, OPTIMIZERS, _flag("optimizer"))
        for name in ("patience", "gradual"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise UsageError(f"{_flag(name)} must be an integer >= 0 (0 = off); got {getattr(self, name)!r}")


def _flag(name: str) -> str:
    """``lr_decay`` -> ``lr_decay (--lr-decay)``: the field and the flag that sets it."""
    return f"{name} (--{name.replace('_', '-')})"


def parse_freeze(value: str | int) -> str | int:
    """``all`` | ``none`` | ``auto`` | ``probe`` | a non-negative integer (as int)."""
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        n = int(value)
        if n < 0:
            raise UsageError(f"--freeze N needs N >= 0; got {n}")
        return n
    if value in FREEZE_MODES:
        return value
    raise UsageError(f"--freeze must be all, none, auto, probe or a number of stages; got '{value}'")


def check_freeze_depth(backbone: Any, n_frozen: int) -> Any:
    """The stage plan of ``backbone`` when ``--freeze n_frozen`` fits it (builds the model); else UsageError."""
    plan = stage_plan(backbone.model, whole_ok=n_frozen == 0)
    if not 0 <= n_frozen <= len(plan):
        raise UsageError(f"--freeze {n_frozen}: {backbone.name} has {len(plan)} stages ({', '.join(plan.names)}); "
                         f"give N from 0 to {len(plan)} (see 'headstart backbones {backbone.name} --stages')")
    return plan


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the best epoch's model and what the run measured."""

    model: FinetuneModel
    bad_files: list[Any]  # BadFile records of images that could not be used
    n_frozen: int
    history: list[dict[str, Any]]
    best_epoch: int
    seconds: float
    seconds_per_epoch: float
    cut_seconds: float  # time spent computing the cut cache (0 when it was warm)
    val_proba: np.ndarray | None = None  # the best model's probabilities on the usable validation images
    val_index: np.ndarray | None = None  # which images of val_set those rows are (cut path only)


def finetune(
    backbone: Backbone,
    train_set: ImageSet,
    val_set: ImageSet | None,
    *,
    n_frozen: int,
    cfg: FinetuneConfig,
    cache: FeatureCache,
    train_views: Sequence[View],
    val_view: View,
    augment_transform: Callable[[Any, str], torch.Tensor] | None = None,
    work_dir: Path,
    resume: bool = False,
    seed: int = 0,
    precision: str = "auto",
    num_workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda m: None,
    evaluator: Evaluator = evaluate,
) -> FinetuneResult:
    """Fine-tune ``backbone`` with its first ``n_frozen`` stages frozen; returns the best model.

    Args:
        train_views: views cached at the cut for training (clean + K augmented); with ``n_frozen == 0``
            or ``cfg.cache_cut=False``, ``augment_transform`` makes a fresh view per epoch instead.
        val_view: the clean view, for validation.
        work_dir: where checkpoints and ``metrics.jsonl`` go while training.
        resume: continue from the checkpoint in ``work_dir`` when its settings match.
        evaluator: scores the model on the validation batches after each epoch (default
            :func:`~headstart.finetune_loop.evaluate`).
    """
    cfg.validate()
    _check_ranks(cfg)
    start_time = time.perf_counter()
    device = distributed.device()  # cuda:LOCAL_RANK under torchrun on GPUs; cuda or cpu otherwise
    precision = resolve_precision(precision, device)
    plan = check_freeze_depth(backbone, n_frozen)
    model = FinetuneModel(plan, n_frozen, len(train_set.class_names), backbone.num_features)
    freeze_stages(plan, n_frozen)
    model.to(device)
    data: CutData | ImageData
    if n_frozen >= 1 and cfg.cache_cut:
        data = cut_data(backbone, plan, n_frozen, train_set, val_set, cache, train_views, val_view,
                        precision=precision, num_workers=num_workers, progress=progress)
    else:
        transform = val_view.transform if augment_transform is None else augment_transform
        data = image_data(train_set, val_set, cache, transform, val_view, batch_size=cfg.batch_size,
                          num_workers=num_workers)
    require_every_class(data.labels, train_set.class_names, data.bad_files)
    optimizer, scheduler = make_optimizer(model, cfg, math.ceil(len(data.labels) / cfg.batch_size))
    settings = settings_hash(asdict(cfg), n_frozen, backbone.weights_digest, seed,
                             [v.description for v in train_views], data.train_paths)
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(work_dir / "checkpoint.safetensors", settings, model, optimizer, scheduler)
    state = _start(checkpoint, resume, work_dir / "metrics.jsonl", log)
    loop = Loop(model, data, cfg, optimizer, scheduler, checkpoint, device, precision, seed,
                work_dir / "metrics.jsonl", progress, log, evaluator)
    train_epochs(loop, state)
    return _result(loop, state, start_time)


def _start(checkpoint: Checkpoint, resume: bool, metrics_path: Path, log: Callable[[str], None]) -> TrainState:
    """The state to train from: the checkpoint's when resuming one with the same settings, else a fresh one."""
    if resume:
        return checkpoint.restore(log) or TrainState()
    if distributed.is_main():
        metrics_path.unlink(missing_ok=True)
    return TrainState()


def _check_ranks(cfg: FinetuneConfig) -> None:
    """Under torchrun every rank needs a share of each full batch."""
    if cfg.batch_size < distributed.world_size():
        raise UsageError(f"batch_size (--batch-size) {cfg.batch_size} is the global batch, shared by "
                         f"{distributed.world_size()} processes; give at least {distributed.world_size()}")


def _result(loop: Loop, state: TrainState, start_time: float) -> FinetuneResult:
    """The best epoch's model (on the CPU, in eval mode) and what the run measured."""
    model, data = loop.model, loop.data
    if state.best_state:
        model.load_state_dict(state.best_state)
    val_proba = None
    batches = data.scored_validation(loop.cfg.batch_size) if distributed.is_main() else None  # rank 0 writes the run
    if batches is not None:
        val_proba = predict(model, batches, loop.device, loop.precision, data.from_cut)[0]
    model.cpu().eval()  # the run is saved and evaluated from the CPU copy
    times = loop.epoch_times
    return FinetuneResult(model=model, bad_files=data.bad_files, n_frozen=model.n_frozen, history=state.history,
                          best_epoch=state.best["epoch"], seconds=time.perf_counter() - start_time,
                          seconds_per_epoch=float(np.mean(times)) if times else 0.0, cut_seconds=data.cut_seconds,
                          val_proba=val_proba, val_index=data.val_index if val_proba is not None else None)


def cleanup(work_dir: Path) -> None:
    """Remove a fine-tuning work folder (checkpoints, metrics), ignoring errors."""
    with contextlib.suppress(OSError):
        shutil.rmtree(work_dir)
