"""The fine-tuned network (trainable top of a backbone and a new head), its freezing and its optimiser."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .stages import StagePlan

if TYPE_CHECKING:
    from .finetune import FinetuneConfig


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


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: FinetuneModel, cfg: FinetuneConfig,
                   steps_per_epoch: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW or SGD over :func:`param_groups`, and its per-step schedule (:func:`lr_factor`)."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True,
                                                           weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
