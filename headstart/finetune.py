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
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn
from tqdm.auto import tqdm

from .backbones import Backbone
from .cache import FeatureCache, Locations, atomic_write_bytes
from .data import ImageSet
from .errors import DataError, UsageError
from .features import Cut, View, _autocast, default_num_workers, extract_views
from .preprocess import resolve_precision
from .stages import StagePlan, stage_plan


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
        for name in ("epochs", "batch_size", "checkpoint_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise UsageError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        for name in ("lr", "weight_decay", "warmup_epochs", "label_smoothing"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0):
                raise UsageError(f"{name} must be a number >= 0; got {getattr(self, name)!r}")
        if not 0 < self.lr_decay <= 1:
            raise UsageError(f"lr_decay must be in (0, 1]; got {self.lr_decay}")
        if self.label_smoothing >= 1:
            raise UsageError(f"label_smoothing must be below 1; got {self.label_smoothing}")
        if self.optimizer not in ("adamw", "sgd"):
            raise UsageError(f"optimizer must be 'adamw' or 'sgd'; got '{self.optimizer}'")
        if self.patience < 0 or self.gradual < 0:
            raise UsageError("patience and gradual must be >= 0")


# ------------------------------------------------------------------------------------------ freeze depth


def parse_freeze(value: str | int) -> str | int:
    """``all`` | ``none`` | ``auto`` | ``probe`` | a non-negative integer (as int)."""
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        n = int(value)
        if n < 0:
            raise UsageError(f"--freeze N needs N >= 0; got {n}")
        return n
    if value in ("all", "none", "auto", "probe"):
        return value
    raise UsageError(f"--freeze must be all, none, auto, probe or a number of stages; got '{value}'")


# ------------------------------------------------------------------------------------------ model parts


class FinetuneModel(nn.Module):
    """Trainable top of a backbone (stages N.. + tail) and a new linear head."""

    def __init__(self, plan: StagePlan, n_frozen: int, n_classes: int, num_features: int) -> None:
        super().__init__()
        self.plan = plan
        self.n_frozen = n_frozen
        self.backbone = plan.model  # registered so state_dict covers the whole network
        self.head = nn.Linear(num_features, n_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward_from_cut(self, activations: torch.Tensor) -> torch.Tensor:
        return self.head(self.plan.tail(self.plan.run(activations, self.n_frozen)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            cut = self.plan.run(images, 0, self.n_frozen)
        return self.forward_from_cut(cut)


def freeze_stages(plan: StagePlan, n_frozen: int) -> None:
    """Frozen for real: no gradients, and BatchNorm/dropout in eval mode (running stats untouched)."""
    for module in plan.frozen_modules(n_frozen):
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)


def set_train_mode(model: FinetuneModel, n_trainable_stages: int) -> None:
    """Train mode for the unfrozen part; eval for frozen stages and not-yet-unfrozen ones (gradual)."""
    plan = model.plan
    model.train()
    first_active = len(plan) - n_trainable_stages
    for i, stage in enumerate(plan.stages):
        active = i >= max(model.n_frozen, first_active)
        for module in stage:
            module.train(active)
            for p in module.parameters():
                p.requires_grad_(active)


def param_groups(model: FinetuneModel, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """Head at ``lr``; tail at ``lr * d``; stage i (from the top) at ``lr * d ** (depth + 1)``."""
    plan = model.plan
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr, "name": "head"}]
    tail = plan.tail_parameters()
    if tail:
        groups.append({"params": tail, "lr": cfg.lr * cfg.lr_decay, "name": "tail"})
    for depth, i in enumerate(range(len(plan) - 1, model.n_frozen - 1, -1), start=2):
        params = plan.stage_parameters(i)
        if params:
            groups.append({"params": params, "lr": cfg.lr * cfg.lr_decay ** depth, "name": plan.names[i]})
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


# ------------------------------------------------------------------------------------------ checkpoints


def _flatten(prefix: str, obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(f"{prefix}.k{i}", k, tensors), _flatten(f"{prefix}.{i}", v, tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]}
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, dict) and "__list__" in obj:
        return [_unflatten(v, tensors) for v in obj["__list__"]]
    return obj


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Nested state (tensors, numbers, strings, dicts, lists) as safetensors + JSON, atomically, no pickle."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten("s", state, tensors)
    atomic_write_bytes(path, safetensors_bytes(tensors))
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(skeleton).encode())


def load_state(path: Path) -> dict[str, Any]:
    skeleton = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    return _unflatten(skeleton, load_file(str(path)))


# ------------------------------------------------------------------------------------------ data


def _seed(*parts: Any) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:15], 16)


class _CutBatches:
    """Batches of cached cut activations: a random view per image per epoch, read memory-mapped."""

    def __init__(self, cache: FeatureCache, locations: Locations, shape: Sequence[int],
                 labels: np.ndarray) -> None:
        self.cache = cache
        self.locations = locations  # (n_views, n_images)
        self.shape = tuple(shape)
        self.labels = labels
        self.dim = int(np.prod(shape))

    def epoch(self, order: np.ndarray, views: np.ndarray, batch_size: int, skip: int = 0,
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b, start in enumerate(range(0, len(order), batch_size)):
            if b < skip:
                continue
            idx = order[start:start + batch_size]
            rows = self.cache.read_locations(self.locations.pick(idx, views[idx]), self.dim)
            x = torch.from_numpy(rows).view(len(idx), *self.shape)
            yield x, torch.from_numpy(self.labels[idx])


class _AugmentedImages(torch.utils.data.Dataset):
    """Training images decoded and augmented in worker processes.

    Items are addressed as ``(epoch_tag, index)``: the augmentation of an image is seeded by both, so
    persistent workers (which keep their own copy of this object) still produce each epoch's own views.
    """

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, transform: Any) -> None:
        self.paths, self.labels, self.transform = list(paths), labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int] | int) -> tuple[torch.Tensor, int]:
        from .data import decode_image

        tag, i = item if isinstance(item, tuple) else (0, item)
        image = decode_image(self.paths[i])
        return self.transform(image, f"{tag}|{i}"), int(self.labels[i])


class _EpochSampler(torch.utils.data.Sampler):
    """Yields ``(epoch_tag, index)`` in an order set before each epoch (lives in the main process)."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int]] = []

    def set(self, tag: int, order: Sequence[int]) -> None:
        self.items = [(tag, int(i)) for i in order]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)


# ------------------------------------------------------------------------------------------ training


@dataclass
class FinetuneResult:
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
) -> FinetuneResult:
    """Fine-tune ``backbone`` with its first ``n_frozen`` stages frozen; returns the best model.

    Args:
        train_views: views cached at the cut for training (clean + K augmented); with ``n_frozen == 0``
            or ``cfg.cache_cut=False``, ``augment_transform`` makes a fresh view per epoch instead.
        val_view: the clean view, for validation.
        work_dir: where checkpoints and ``metrics.jsonl`` go while training.
        resume: continue from the checkpoint in ``work_dir`` when its settings match.
    """
    cfg.validate()
    start_time = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(precision, device)
    plan = stage_plan(backbone.model, whole_ok=n_frozen == 0)
    if not 0 <= n_frozen <= len(plan):
        raise UsageError(f"--freeze {n_frozen}: {backbone.name} has {len(plan)} stages ({', '.join(plan.names)})")
    n_classes = len(train_set.class_names)
    model = FinetuneModel(plan, n_frozen, n_classes, backbone.num_features)
    freeze_stages(plan, n_frozen)
    model.to(device)
    labels = train_set.labels.astype(np.int64)
    use_cut = n_frozen >= 1 and cfg.cache_cut

    cut_seconds = 0.0
    bad_files: list[Any] = []
    if use_cut:
        with torch.no_grad():
            shape = tuple(plan.run(torch.zeros(1, *backbone.data_config["input_size"]), 0, n_frozen).shape[1:])
        cut = Cut(f"stage{n_frozen}:{plan.names[n_frozen - 1]}",
                  lambda m, x: stage_plan(m).run(x, 0, n_frozen), int(np.prod(shape)))
        t0 = time.perf_counter()
        res = extract_views(backbone, train_set.paths, train_views, cache=cache, cut=cut, load=False,
                            precision=precision, num_workers=num_workers, progress=progress, desc="cut cache")
        val_res = extract_views(backbone, val_set.paths, [val_view], cache=cache, cut=cut, load=False,
                                precision=precision, num_workers=num_workers, progress=progress,
                                desc="val cut cache") if val_set is not None else None
        cut_seconds = time.perf_counter() - t0 if (res.n_computed or (val_res and val_res.n_computed)) else 0.0
        bad_files = list(res.bad_files) + (list(val_res.bad_files) if val_res is not None else [])
        keep = np.flatnonzero(res.ok)
        train_batches = _CutBatches(cache, res.locations.take(keep), shape, labels[keep])
        labels = labels[keep]
        n_views = len(train_views)
        val_batches, vkeep = None, None
        if val_res is not None and val_res.ok.any():
            vkeep = np.flatnonzero(val_res.ok)
            val_batches = _CutBatches(cache, val_res.locations.take(vkeep), shape,
                                      val_set.labels.astype(np.int64)[vkeep])
    else:
        if augment_transform is None:
            augment_transform = val_view.transform
        train_set, val_set, bad_files = _usable_only(train_set, val_set, cache, num_workers)
        labels = train_set.labels.astype(np.int64)
        dataset = _AugmentedImages(train_set.paths, labels, augment_transform)
        sampler = _EpochSampler()
        workers = default_num_workers() if num_workers is None else num_workers
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                                             num_workers=workers, persistent_workers=workers > 0)
        n_views = 1
        val_dataset = _AugmentedImages(val_set.paths, val_set.labels.astype(np.int64), val_view.transform) \
            if val_set is not None else None

    missing = [c for c in range(n_classes) if not (labels == c).any()]
    if missing:
        names = [train_set.class_names[c] for c in missing]
        examples = "; ".join(f"{b.path}: {b.reason}" for b in bad_files[:3])
        raise DataError(f"class(es) {names} have no usable training image after skipping {len(bad_files)} bad "
                        f"file(s){', e.g. ' + examples if examples else ''}")
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, total_steps))
    config_hash = hashlib.sha256(json.dumps(
        [asdict(cfg), n_frozen, backbone.weights_digest, seed, [v.description for v in train_views],
         sorted(map(str, train_set.paths))], sort_keys=True, default=str).encode()).hexdigest()

    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt = work_dir / "checkpoint.safetensors"
    history: list[dict[str, Any]] = []
    best = {"accuracy": -1.0, "loss": float("inf"), "epoch": 0, "state": None}
    epoch, step_in_epoch, global_step, bad_epochs = 0, 0, 0, 0
    if resume and ckpt.is_file():
        state = load_state(ckpt)
        if state["config_hash"] == config_hash:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
            history = state["history"]
            best = {**state["best"], "state": state.get("best_state")}
            bad_epochs = int(state.get("bad_epochs", 0))
            log(f"resuming from epoch {epoch + 1}, step {step_in_epoch} (global step {global_step})")
        else:
            log("checkpoint found but the settings differ; starting over")
    elif not resume:
        (work_dir / "metrics.jsonl").unlink(missing_ok=True)

    def save_checkpoint() -> None:
        save_state(ckpt, {"config_hash": config_hash, "model": model.state_dict(),
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                          "history": history, "best": {k: v for k, v in best.items() if k != "state"},
                          "best_state": best["state"] or {}, "bad_epochs": bad_epochs})

    det = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    epoch_times = []
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None  # fp16 needs loss scaling
    try:
        while epoch < cfg.epochs:
            t_epoch = time.perf_counter()
            trainable = len(plan) - n_frozen if cfg.gradual == 0 else min(len(plan) - n_frozen,
                                                                         epoch // cfg.gradual)
            set_train_mode(model, trainable)
            for m in plan.frozen_modules(n_frozen):
                m.eval()
            g = torch.Generator().manual_seed(_seed(seed, "epoch", epoch))
            order = torch.randperm(len(labels), generator=g).numpy()
            views = torch.randint(n_views, (len(labels),), generator=g).numpy()
            if use_cut:
                batches: Any = train_batches.epoch(order, views, cfg.batch_size, skip=step_in_epoch)
            else:
                sampler.set(_seed(seed, "aug-epoch", epoch) % (2 ** 31), order[step_in_epoch * cfg.batch_size:])
                batches = iter(loader)
            bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       unit="step", file=sys.stderr, disable=not progress, leave=False)
            losses, correct, seen = [], 0, 0
            for x, y in batches:
                torch.manual_seed(_seed(seed, "step", epoch, step_in_epoch))  # dropout / drop-path
                x, y = x.to(device), y.to(device)
                with _autocast(device, precision):
                    logits = model.forward_from_cut(x) if use_cut else model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                scheduler.step()
                step_in_epoch += 1
                global_step += 1
                losses.append(loss.item())
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", acc=f"{correct / seen:.3f}")
                bar.update(1)
                if global_step % cfg.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                    save_checkpoint()  # (the last step of an epoch is saved with the epoch's results)
            bar.close()
            row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else None,
                   "train_accuracy": correct / seen if seen else None, "trainable_stages": trainable,
                   "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t_epoch, 3)}
            if use_cut and val_batches is not None:
                row.update(_evaluate(model, _in_order(val_batches, cfg.batch_size), device, precision, True))
            elif not use_cut and val_set is not None:
                vloader = torch.utils.data.DataLoader(val_dataset, batch_size=cfg.batch_size, num_workers=0)
                row.update(_evaluate(model, vloader, device, precision, False))
            history.append(row)
            epoch_times.append(row["seconds"])
            with open(work_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            score = row.get("val_accuracy", row["train_accuracy"] or 0.0)
            loss_now = row.get("val_loss", row["train_loss"] or 0.0)
            if score > best["accuracy"] or (score == best["accuracy"] and loss_now < best["loss"]):
                best = {"accuracy": score, "loss": loss_now, "epoch": epoch + 1,
                        "state": copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})}
                bad_epochs = 0
            else:
                bad_epochs += 1
            log(f"epoch {epoch + 1}: train loss {_num(row['train_loss'])} acc {_num(row['train_accuracy'])}"
                + (f", val loss {_num(row['val_loss'])} acc {_num(row['val_accuracy'])}" if "val_accuracy" in row
                   else "") + f" ({row['seconds']:.1f}s)")
            epoch += 1
            step_in_epoch = 0
            save_checkpoint()
            if cfg.patience and "val_accuracy" in row and bad_epochs >= cfg.patience:
                log(f"early stopping: no better validation accuracy for {cfg.patience} epochs")
                break
    finally:
        if cfg.deterministic:
            torch.use_deterministic_algorithms(det)
    if best["state"]:
        model.load_state_dict(best["state"])
    val_proba = None
    if use_cut and val_batches is not None:
        val_proba = _predict(model, _in_order(val_batches, cfg.batch_size), device, precision, True)[0]
    model.cpu().eval()  # the run is saved and evaluated from the CPU copy
    return FinetuneResult(model=model, bad_files=bad_files, n_frozen=n_frozen, history=history,
                          best_epoch=best["epoch"],
                          seconds=time.perf_counter() - start_time,
                          seconds_per_epoch=float(np.mean(epoch_times)) if epoch_times else 0.0,
                          cut_seconds=cut_seconds, val_proba=val_proba,
                          val_index=vkeep if val_proba is not None else None)


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _usable_only(train_set: ImageSet, val_set: ImageSet | None, cache: FeatureCache,
                 num_workers: int | None) -> tuple[ImageSet, ImageSet | None, list[Any]]:
    """Drop images that cannot be read or decoded (checked once, remembered by the cache), listing them."""
    from .data import BadFile, ImageDecodeError, decode_image
    from .preprocess import decoder_id

    bad: list[Any] = []

    def keep(images: ImageSet) -> ImageSet:
        keys, errors = cache.image_keys(images.paths)
        known = cache.failures([k for k in keys if k is not None], decoder_id())
        good = []
        for i, (path, key) in enumerate(zip(images.paths, keys)):
            reason = errors.get(i) or (known.get(key) if key else None)
            if reason is None:
                try:
                    decode_image(path)
                except ImageDecodeError as exc:
                    reason = str(exc).removeprefix(f"{path}: ")
                    if exc.permanent and key:
                        cache.record_failures({key: reason}, decoder_id())
            if reason is None:
                good.append(i)
            else:
                bad.append(BadFile(str(path), reason))
        return images.subset(good)

    return keep(train_set), keep(val_set) if val_set is not None else None, bad


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model: FinetuneModel, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _in_order(batches: _CutBatches, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every image once, in order, from its clean view (view 0)."""
    n = len(batches.labels)
    return batches.epoch(np.arange(n), np.zeros(n, dtype=int), batch_size)


def _predict(model: FinetuneModel, batches: Any, device: torch.device, precision: str,
             from_cut: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels of every image of ``batches``, in order."""
    was = model.training
    model.eval()
    probas, labels = [], []
    with torch.no_grad(), _autocast(device, precision):
        for x, y in batches:
            logits = (model.forward_from_cut(x.to(device)) if from_cut else model(x.to(device))).float()
            probas.append(torch.softmax(logits, 1).cpu().numpy().astype(np.float64))
            labels.append(y.numpy())
    model.train(was)
    k = model.head.out_features
    return (np.concatenate(probas) if probas else np.zeros((0, k))), (
        np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64))


def _evaluate(model: FinetuneModel, batches: Any, device: torch.device, precision: str,
              from_cut: bool) -> dict[str, float]:
    proba, y = _predict(model, batches, device, precision, from_cut)
    p_true = np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0)
    return {"val_loss": float(-np.log(p_true).mean()) if len(y) else 0.0,
            "val_accuracy": float((proba.argmax(1) == y).mean()) if len(y) else 0.0}


def cleanup(work_dir: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(work_dir)
