"""A backbone's stages, counted from the input, so that "freeze the first N stages" means something.

Stages come from the model's own structure (the groups timm uses for layer-wise learning rates):

* EfficientNet / MobileNet-style models (``conv_stem``, ``bn1``, ``blocks``): stage 0 is the stem,
  stages 1..k are ``blocks.0`` .. ``blocks.{k-1}``; ``conv_head``/``bn2`` belong to the tail.
* ResNet-style models (``conv1``, ``layer1..4``): the stem, then ``layer1`` .. ``layer4``.
* ConvNeXt-style models (``stem``, ``stages``): the stem, then ``stages.0`` ..; ``norm_pre`` is tail.

The *tail* (always trained unless everything is frozen) is what runs after the last stage up to the
pooled feature vector: ``tail(x) == model.forward_head(model_post_stages(x), pre_logits=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import UsageError


@dataclass
class StagePlan:
    """The stages of a model and how to run any slice of them."""

    model: nn.Module
    names: list[str]
    stages: list[list[nn.Module]]
    post: list[nn.Module]  # layers after the last stage, before forward_head (e.g. conv_head, bn2)

    def __len__(self) -> int:
        return len(self.stages)

    def run(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run stages ``start .. stop-1`` (``stop=None``: to the last stage)."""
        for stage in self.stages[start:stop]:
            for module in stage:
                x = module(x)
        return x

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """From the last stage's output to the pooled feature vector ``(N, num_features)``."""
        for module in self.post:
            x = module(x)
        return self.model.forward_head(x, pre_logits=True)

    def features(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Pooled features from the input of stage ``start``."""
        return self.tail(self.run(x, start))

    def stage_parameters(self, index: int) -> list[nn.Parameter]:
        return [p for m in self.stages[index] for p in m.parameters()]

    def tail_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the model outside the stages (post layers, head norms, ...)."""
        in_stages = {id(p) for stage in self.stages for m in stage for p in m.parameters()}
        return [p for p in self.model.parameters() if id(p) not in in_stages]

    def frozen_modules(self, n_frozen: int) -> list[nn.Module]:
        return [m for stage in self.stages[:n_frozen] for m in stage]


def _children(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    return [getattr(model, n) for n in names if isinstance(getattr(model, n, None), nn.Module)]


class _Features(nn.Module):
    """The whole feature extractor as one stage, for models whose stages are not mapped."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = [model]  # a list, so the model is not registered twice as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner[0].forward_features(x)

    def parameters(self, recurse: bool = True):  # type: ignore[override]
        return self.inner[0].parameters(recurse)

    def train(self, mode: bool = True) -> _Features:
        self.inner[0].train(mode)
        return super().train(mode)


def stage_plan(model: nn.Module, whole_ok: bool = False) -> StagePlan:
    """The :class:`StagePlan` of a timm model, or a clear error for layouts not mapped yet.

    With ``whole_ok``, an unmapped model becomes one stage (its ``forward_features``): enough to
    train everything (``--freeze none``), not to freeze part of it.
    """
    has = lambda *names: all(hasattr(model, n) for n in names)  # noqa: E731
    if has("conv_stem", "bn1", "blocks") and isinstance(model.blocks, nn.Sequential):
        names = ["stem"] + [f"blocks.{i}" for i in range(len(model.blocks))]
        stages = [[model.conv_stem, model.bn1]] + [[block] for block in model.blocks]
        # EfficientNet keeps conv_head/bn2 in forward_features; MobileNetV3 has them in forward_head
        post = _children(model, ["conv_head", "bn2"]) if type(model).__name__ == "EfficientNet" else []
        return StagePlan(model, names, stages, post)
    if has("conv1", "bn1", "layer1", "layer4"):
        stem = _children(model, ["conv1", "bn1", "act1", "maxpool"])
        layers = [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, n)]
        return StagePlan(model, ["stem", *layers], [stem] + [[getattr(model, n)] for n in layers], [])
    if has("stem", "stages") and isinstance(model.stages, nn.Sequential):
        names = ["stem"] + [f"stages.{i}" for i in range(len(model.stages))]
        stages = [[model.stem]] + [[stage] for stage in model.stages]
        return StagePlan(model, names, stages, _children(model, ["norm_pre"]))
    if whole_ok and hasattr(model, "forward_features"):
        return StagePlan(model, ["features"], [[_Features(model)]], [])
    raise UsageError(
        f"freezing by stages is not mapped for {type(model).__name__} models yet (supported: EfficientNet/"
        "MobileNet, ResNet, ConvNeXt families); use --freeze all (head only) or --freeze none (everything)"
    )


def describe_stages(model: nn.Module, input_size: Sequence[int]) -> list[dict[str, Any]]:
    """Per stage: name, parameter count and output shape for one image of ``input_size`` (C, H, W)."""
    plan = stage_plan(model)
    rows = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        x = torch.zeros(1, *input_size)
        for i, name in enumerate(plan.names):
            x = plan.run(x, i, i + 1)
            rows.append({"index": i + 1, "stage": name, "params": sum(p.numel() for p in plan.stage_parameters(i)),
                         "output_shape": list(x.shape[1:])})
        pooled = plan.tail(x)
        rows.append({"index": None, "stage": "tail (always trained)", "params":
                     sum(p.numel() for p in plan.tail_parameters()), "output_shape": list(pooled.shape[1:])})
    model.train(was_training)
    return rows
