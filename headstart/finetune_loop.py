"""The fine-tuning epochs: seeded steps, validation, metrics in JSONL, the best weights, early stopping.

Data order, view choice and dropout are seeded per (seed, epoch, step), so a run resumed from a
checkpoint reproduces an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import Checkpoint, TrainState
from .finetune_data import Batches, CutData, ImageData
from .finetune_model import FinetuneModel, set_train_mode
from .preprocess import autocast
from .views import derive_seed

if TYPE_CHECKING:
    from .finetune import FinetuneConfig

Evaluator = Callable[[FinetuneModel, Batches, torch.device, str, bool], dict[str, float]]


def predict(model: FinetuneModel, batches: Batches, device: torch.device, precision: str,
            from_cut: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels of every image of ``batches``, in order."""
    was = model.training
    model.eval()
    probas, labels = [], []
    with torch.no_grad(), autocast(device, precision):
        for x, y in batches:
            logits = (model.forward_from_cut(x.to(device)) if from_cut else model(x.to(device))).float()
            probas.append(torch.softmax(logits, 1).cpu().numpy().astype(np.float64))
            labels.append(y.numpy())
    model.train(was)
    k = model.head.out_features
    return (np.concatenate(probas) if probas else np.zeros((0, k))), (
        np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64))


def evaluate(model: FinetuneModel, batches: Batches, device: torch.device, precision: str,
             from_cut: bool) -> dict[str, float]:
    """``val_loss`` (log-loss) and ``val_accuracy`` of the model on ``batches``."""
    proba, y = predict(model, batches, device, precision, from_cut)
    p_true = np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0)
    return {"val_loss": float(-np.log(p_true).mean()) if len(y) else 0.0,
            "val_accuracy": float((proba.argmax(1) == y).mean()) if len(y) else 0.0}


@dataclass
class Loop:
    """What the epochs need: the model and its optimiser, the data, the settings, where results go."""

    model: FinetuneModel
    data: CutData | ImageData
    cfg: FinetuneConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    checkpoint: Checkpoint
    device: torch.device
    precision: str  # resolved (fp32, bf16 or fp16)
    seed: int
    metrics_path: Path  # metrics.jsonl: one line per epoch, appended
    progress: bool = True
    log: Callable[[str], None] = lambda m: None
    evaluator: Evaluator = evaluate  # scores the model on the validation batches
    epoch_times: list[float] = field(default_factory=list)  # seconds of each epoch run by this process

    ddp: torch.nn.Module | None = None  # under torchrun: the model in DistributedDataParallel (per epoch)

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None  # loss scaling

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.labels) / self.cfg.batch_size)


def train_epochs(loop: Loop, state: TrainState) -> None:
    """Train from ``state`` to the last epoch or early stopping, checkpointing as it goes."""
    det = torch.are_deterministic_algorithms_enabled()
    if loop.cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        while state.epoch < loop.cfg.epochs:
            row = train_epoch(loop, state)
            batches = loop.data.validation(loop.cfg.batch_size)
            if batches is not None:
                row.update(_score(loop, batches))
            if end_epoch(loop, state, row):
                break
    finally:
        if loop.cfg.deterministic:
            torch.use_deterministic_algorithms(det)


def train_epoch(loop: Loop, state: TrainState) -> dict[str, Any]:
    """The optimiser steps of one epoch (from ``state.step_in_epoch``); its row of training metrics."""
    t_epoch = time.perf_counter()
    cfg, plan, n_frozen = loop.cfg, loop.model.plan, loop.model.n_frozen
    trainable = len(plan) - n_frozen if cfg.gradual == 0 else min(len(plan) - n_frozen, state.epoch // cfg.gradual)
    set_train_mode(loop.model, trainable)
    for m in plan.frozen_modules(n_frozen):
        m.eval()
    n = len(loop.data.labels)
    g = torch.Generator().manual_seed(derive_seed(loop.seed, "epoch", state.epoch))
    order = torch.randperm(n, generator=g).numpy()
    views = torch.randint(loop.data.n_views, (n,), generator=g).numpy()
    tag = derive_seed(loop.seed, "aug-epoch", state.epoch) % (2 ** 31)
    part = (distributed.rank(), distributed.world_size())
    batches = loop.data.epoch(order, views, cfg.batch_size, state.step_in_epoch, tag, part)
    loop.ddp = _data_parallel(loop) if distributed.active() else None
    bar = tqdm(total=loop.steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
               unit="step", file=sys.stderr, disable=not loop.progress, leave=False)
    losses, correct, seen = [], 0, 0
    shape = tuple((getattr(loop.model.backbone, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))
    for batch in batches:  # None: this rank's empty share of a last batch smaller than the number of ranks
        x, y = batch if batch is not None else (torch.zeros((0, *shape)), torch.zeros(0, dtype=torch.int64))
        shape = tuple(x.shape[1:])
        loss, right, size = _step(loop, state, x, y, n)
        losses.append(loss)
        correct += right
        seen += size
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", acc=f"{correct / seen:.3f}")
        bar.update(1)
        if state.global_step % cfg.checkpoint_every == 0 and state.step_in_epoch < loop.steps_per_epoch:
            _save(loop, state)  # (the last step of an epoch is saved with the epoch's results)
    bar.close()
    return {"epoch": state.epoch + 1, "train_loss": float(np.mean(losses)) if losses else None,
            "train_accuracy": correct / seen if seen else None, "trainable_stages": trainable,
            "lr": loop.optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t_epoch, 3)}


def _step(loop: Loop, state: TrainState, x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[float, int, int]:
    """One optimiser step on a batch (this rank's share of it, under torchrun); the batch's loss, number of
    correct predictions and size (over every rank)."""
    torch.manual_seed(derive_seed(loop.seed, "step", state.epoch, state.step_in_epoch))  # dropout / drop-path
    x, y = x.to(loop.device), y.to(loop.device)
    if loop.ddp is None:
        with autocast(loop.device, loop.precision):
            logits = loop.model.forward_from_cut(x) if loop.data.from_cut else loop.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=loop.cfg.label_smoothing)
        right = int((logits.argmax(1) == y).sum())
        _update(loop, loss)
        loop.scheduler.step()
        state.step_in_epoch += 1
        state.global_step += 1
        return loss.item(), right, len(y)
    size = min(loop.cfg.batch_size, n - state.step_in_epoch * loop.cfg.batch_size)  # the global batch
    with autocast(loop.device, loop.precision), distributed.global_batch_norm():
        logits = loop.ddp(x)
    total = F.cross_entropy(logits.float(), y, label_smoothing=loop.cfg.label_smoothing, reduction="sum")
    _update(loop, total * (distributed.world_size() / size))  # DDP averages over ranks: the global batch's mean
    loop.scheduler.step()
    state.step_in_epoch += 1
    state.global_step += 1
    summed, right, _ = distributed.all_reduce_sum([total.item(), int((logits.argmax(1) == y).sum()), len(y)])
    return summed / size, int(right), size


def _update(loop: Loop, loss: torch.Tensor) -> None:
    """Backward and optimiser step (with loss scaling in fp16)."""
    loop.optimizer.zero_grad(set_to_none=True)
    if loop.scaler is not None:
        loop.scaler.scale(loss).backward()
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
    else:
        loss.backward()
        loop.optimizer.step()


class _Forward(torch.nn.Module):
    """The model's training forward (from the cut or from images) as ``forward``, for DDP to wrap."""

    def __init__(self, model: FinetuneModel, from_cut: bool) -> None:
        super().__init__()
        self.model, self.from_cut = model, from_cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_from_cut(x) if self.from_cut else self.model(x)


def _data_parallel(loop: Loop) -> torch.nn.Module:
    """The model in DistributedDataParallel over the parameters trained this epoch (gradual unfreezing
    changes them, so it is wrapped anew each epoch); batch norm statistics are global
    (:func:`~headstart.distributed.global_batch_norm`)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [loop.device.index] if loop.device.type == "cuda" else None
    return DistributedDataParallel(_Forward(loop.model, loop.data.from_cut), device_ids=ids)


def _save(loop: Loop, state: TrainState) -> None:
    """A checkpoint, written by rank 0 alone (the others hold the same state)."""
    if distributed.is_main():
        loop.checkpoint.save(state)


def _score(loop: Loop, batches: Batches) -> dict[str, float]:
    """The evaluator's scores on the validation batches; under torchrun each rank predicts every
    ``world``-th batch and the scores are computed from all of them, in order, as one process would."""
    if not distributed.active() or loop.evaluator is not evaluate:
        return loop.evaluator(loop.model, batches, loop.device, loop.precision, loop.data.from_cut)
    me, n = distributed.rank(), distributed.world_size()
    mine = [predict(loop.model, [b], loop.device, loop.precision, loop.data.from_cut)
            for i, b in enumerate(batches) if i % n == me]
    parts = distributed.all_gather_json([[p.tolist(), y.tolist()] for p, y in mine])
    ordered = [parts[i % n][i // n] for i in range(sum(len(part) for part in parts))]
    k = loop.model.head.out_features
    proba = np.asarray([row for p, _ in ordered for row in p], dtype=np.float64).reshape(-1, k)
    y = np.asarray([label for _, ys in ordered for label in ys], dtype=np.int64)
    p_true = np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0)
    return {"val_loss": float(-np.log(p_true).mean()) if len(y) else 0.0,
            "val_accuracy": float((proba.argmax(1) == y).mean()) if len(y) else 0.0}


def end_epoch(loop: Loop, state: TrainState, row: dict[str, Any]) -> bool:
    """Record the epoch's row, keep the best weights, checkpoint; True when early stopping ends the run."""
    state.history.append(row)
    loop.epoch_times.append(row["seconds"])
    if distributed.is_main():
        with open(loop.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
    _keep_best(loop.model, state, row)
    loop.log(f"epoch {state.epoch + 1}: train loss {_num(row['train_loss'])} acc {_num(row['train_accuracy'])}"
             + (f", val loss {_num(row['val_loss'])} acc {_num(row['val_accuracy'])}" if "val_accuracy" in row
                else "") + f" ({row['seconds']:.1f}s)")
    state.epoch += 1
    state.step_in_epoch = 0
    _save(loop, state)
    if loop.cfg.patience and "val_accuracy" in row and state.bad_epochs >= loop.cfg.patience:
        loop.log(f"early stopping: no better validation accuracy for {loop.cfg.patience} epochs")
        return True
    return False


def _keep_best(model: FinetuneModel, state: TrainState, row: dict[str, Any]) -> None:
    """Best by validation accuracy (training accuracy without validation), ties broken by the lower loss."""
    score = row.get("val_accuracy", row["train_accuracy"] or 0.0)
    loss_now = row.get("val_loss", row["train_loss"] or 0.0)
    if score > state.best["accuracy"] or (score == state.best["accuracy"] and loss_now < state.best["loss"]):
        state.best = {"accuracy": score, "loss": loss_now, "epoch": state.epoch + 1}
        state.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        state.bad_epochs = 0
    else:
        state.bad_epochs += 1


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"
