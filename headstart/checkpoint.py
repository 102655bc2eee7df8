"""Fine-tuning checkpoints: nested state as safetensors + JSON (no pickle), and exact resume.

A checkpoint holds the model, optimizer and scheduler states, the position in the run (epoch, step in
the epoch, global step), the history so far, the best epoch's scores and weights and the early-stopping
count, under a hash of the settings: it is resumed only by a run with the same settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ._io import atomic_write_bytes


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
    """What :func:`save_state` wrote to ``path`` (and its ``.json`` skeleton)."""
    skeleton = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    return _unflatten(skeleton, load_file(str(path)))


def settings_hash(cfg: dict[str, Any], n_frozen: int, weights_digest: str, seed: int,
                  view_descriptions: Sequence[Any], train_paths: Sequence[Any]) -> str:
    """What a checkpoint must match to be resumed: the settings, depth, weights, seed, views and images."""
    return hashlib.sha256(json.dumps(
        [cfg, n_frozen, weights_digest, seed, list(view_descriptions), sorted(map(str, train_paths))],
        sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class TrainState:
    """Where a fine-tuning run is, and the best epoch so far (what a checkpoint saves besides the weights)."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimiser steps done in the current epoch
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per completed epoch
    best: dict[str, Any] = field(default_factory=lambda: {"accuracy": -1.0, "loss": float("inf"), "epoch": 0})
    best_state: dict[str, torch.Tensor] | None = None  # the best epoch's weights (on the CPU)
    bad_epochs: int = 0  # epochs since the best one (early stopping)


@dataclass
class Checkpoint:
    """The checkpoint file of a run and the objects whose state it holds."""

    path: Path
    settings: str  # :func:`settings_hash` of the run
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def save(self, state: TrainState) -> None:
        save_state(self.path, {"config_hash": self.settings, "model": self.model.state_dict(),
                               "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                               "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
                               "global_step": state.global_step, "history": state.history,
                               "best": dict(state.best), "best_state": state.best_state or {},
                               "bad_epochs": state.bad_epochs})

    def restore(self, log: Callable[[str], None]) -> TrainState | None:
        """The saved state, loaded into the model, optimizer and scheduler; None when absent or other settings."""
        if not self.path.is_file():
            return None
        saved = load_state(self.path)
        if saved["config_hash"] != self.settings:
            log("checkpoint found but the settings differ; starting over")
            return None
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        state = TrainState(saved["epoch"], saved["step_in_epoch"], saved["global_step"], saved["history"],
                           dict(saved["best"]), saved.get("best_state"), int(saved.get("bad_epochs", 0)))
        log(f"resuming from epoch {state.epoch + 1}, step {state.step_in_epoch} (global step {state.global_step})")
        return state
