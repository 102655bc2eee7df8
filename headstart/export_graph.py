"""A run as one ``torch.nn.Module``: uint8 images ``N x 3 x H x W`` -> class probabilities ``N x K``.

What ``headstart export`` writes to ONNX or TorchScript (:mod:`headstart.export`). Every step that
``headstart predict`` takes after the resize and crop is inside, in the same order and arithmetic:

1. the test-time views (:mod:`headstart.tta`'s geometry): ``none``; ``flip`` (the image and its
   mirror); ``10crop`` (the centre and four corner crops of the resized image, then their mirrors:
   the input is then the whole resized image, shorter side ``floor(S / crop_pct)``);
2. per member: ``pixels / 255``, the backbone's own mean/std, the backbone in fp32 (the packaged or
   timm weights, or the fine-tuned weights inside the run), its pooled features;
3. the head as :meth:`~headstart.heads.LinearHead.logit_function` computes it (the standardisation's
   scale folded into the first layer, the mean subtracted; a feature source other than ``pooled``
   and a temperature are already folded into the saved head, :mod:`headstart.sources`), softmax;
4. the columns in the run's class order (:func:`~headstart.ensemble.align_classes`); the views'
   mean; the members' weighted mean (:func:`~headstart.ensemble.average_probabilities`).

Example:
    >>> module = build_module(load_run("runs/photos"), tta="flip")            # doctest: +SKIP
    >>> module(torch.zeros(1, 3, 224, 224, dtype=torch.uint8)).sum(1)          # doctest: +SKIP
    tensor([1.0000])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ExportError, UsageError
from .inference import load_run_backbone
from .onnx_input import input_spec
from .runs import AnyRun, EnsembleRun, members_of

#: test-time modes the graph computes itself (input: the crop; for 10crop the whole resized image)
GRAPH_TTA = ("none", "flip", "10crop")
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"  # the graph's input and output names
#: what two members must share to take the same uint8 input
_PIXEL_KEYS = ("size", "resize", "crop_mode", "interpolation")


class Views(nn.Module):
    """uint8 ``N x 3 x H x W`` -> the views of every image, view-major: ``(V * N) x 3 x h x w``."""

    def __init__(self, mode: str, size: tuple[int, int]) -> None:
        super().__init__()
        self.mode, self.h, self.w = mode, int(size[0]), int(size[1])
        self.n_views = {"none": 1, "flip": 2, "10crop": 10}[mode]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return x
        if self.mode == "flip":
            return torch.cat([x, x.flip(-1)], 0)
        h, w = self.h, self.w
        height, width = x.shape[-2], x.shape[-1]
        top, left = _half_to_even(height - h), _half_to_even(width - w)
        rows, columns = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        boxes = ((top, left), (0, 0), (0, width - w), (height - h, 0), (height - h, width - w))
        # index_select, not slices: the crops' sizes stay static for the exporters whatever the input's
        # (symbolic) size, with no bound or stride guards on it to prove
        five = torch.cat([x.index_select(2, rows + t).index_select(3, columns + le) for t, le in boxes], 0)
        return torch.cat([five, five.flip(-1)], 0)


def _half_to_even(d: Any) -> Any:
    """``round(d / 2)`` with Python's rounding (half to even) in integer arithmetic, as
    :func:`~headstart.tta.crop_box` places the centre crop; works on the exporters' symbolic sizes."""
    half = d // 2
    return half + (d % 2) * (half % 2)


class HeadLogits(nn.Module):
    """A fitted headstart head's logits, computed as its ``logit_function`` computes them."""

    def __init__(self, head: Any) -> None:
        super().__init__()
        std, first = head.module_[0], head.module_[1]
        with torch.no_grad():
            self.register_buffer("weight", (first.weight / std.scale).detach().clone())
            self.register_buffer("bias", first.bias.detach().clone())
            self.centre = bool(std.mean.any())
            self.register_buffer("mean", std.mean.detach().clone())
        self.rest = head.module_[2:]  # MLP: GELU, dropout (eval: identity), output layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(F.linear(x - self.mean if self.centre else x, self.weight, self.bias))


class Member(nn.Module):
    """One single run: uint8 views -> its probabilities, columns in the exported class order."""

    def __init__(self, backbone: nn.Module, data_config: dict[str, Any], head: Any, class_names: list[str]) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(data_config["std"], dtype=torch.float32).view(1, 3, 1, 1))
        self.backbone = backbone.eval()
        self.head = HeadLogits(head).eval()
        align = _alignment(head.classes_, class_names)
        self.aligned = align is None
        self.register_buffer("align", torch.zeros(0) if align is None else torch.from_numpy(align))

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        x = (views.to(torch.float32) / 255.0 - self.pixel_mean) / self.pixel_std  # as to_tensor + Normalize
        proba = torch.softmax(self.head(self.backbone(x)), dim=1)
        return proba if self.aligned else proba @ self.align


def _alignment(head_classes: Any, class_names: list[str]) -> np.ndarray | None:
    """The 0/1 matrix that puts a head's columns in ``class_names`` order; None when they already are."""
    position = {str(c): i for i, c in enumerate(head_classes)}
    if [str(c) for c in head_classes] == list(class_names):
        return None
    out = np.zeros((len(position), len(class_names)), dtype=np.float32)
    for j, name in enumerate(class_names):
        if name in position:
            out[position[name], j] = 1.0
    return out


class ExportedModel(nn.Module):
    """uint8 ``N x 3 x H x W`` -> probabilities ``N x K``: views, members, views' mean, members' weighted mean."""

    def __init__(self, views: Views, members: list[Member], weights: list[float], n_classes: int) -> None:
        super().__init__()
        self.views = views
        self.members = nn.ModuleList(members)
        self.weights = [float(w) for w in weights]
        self.n_classes = n_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        views = self.views(images)
        probas = [member(views).reshape(self.views.n_views, -1, self.n_classes).mean(0) for member in self.members]
        if len(probas) == 1:
            return probas[0]
        total = probas[0] * self.weights[0]
        for proba, weight in zip(probas[1:], self.weights[1:]):
            total = total + proba * weight
        return total


def graph_input_spec(run: AnyRun, tta: str = "none") -> dict[str, Any]:
    """The uint8 input the exported graph takes (:func:`~headstart.onnx_input.input_spec`), the same for
    every member; refused with the members' settings when they differ or cannot be reproduced."""
    check_graph_tta(tta)
    specs = []
    for i, member in enumerate(members_of(run)):
        try:
            specs.append(input_spec(member.info["data_config"], crop=tta != "10crop"))
        except ValueError as exc:
            raise ExportError(f"{_member_name(run, i)} cannot be exported: {exc}") from None
    for i, spec in enumerate(specs[1:], 1):
        if any(spec[k] != specs[0][k] for k in _PIXEL_KEYS):
            raise ExportError(
                f"cannot export '{run.path}' as one graph: {_member_name(run, 0)} takes {_pixels(specs[0])} but "
                f"{_member_name(run, i)} takes {_pixels(spec)}; export the members one by one "
                "(headstart export RUN/members/N)")
    return specs[0]


def _member_name(run: AnyRun, i: int) -> str:
    members = members_of(run)
    return f"run '{run.path}'" if len(members) == 1 else f"member {i} ({members[i].backbone_name})"


def _pixels(spec: dict[str, Any]) -> str:
    return (f"{spec['size'][0]}x{spec['size'][1]} pixels cut from a {spec['crop_mode']} resize to "
            f"{spec['resize'][0]}x{spec['resize'][1]} ({spec['interpolation']})")


def check_graph_tta(tta: str) -> None:
    if tta not in GRAPH_TTA:
        raise UsageError(f"tta (--tta) must be one of {', '.join(GRAPH_TTA)} for an export; got '{tta}'")


def build_module(run: AnyRun, tta: str = "none", cache: Any = None) -> ExportedModel:
    """The run (single or ensemble) as one module in eval mode, fp32: uint8 images -> probabilities.

    Args:
        run: a loaded run (:func:`~headstart.runs.load_run`).
        tta: ``none``, ``flip`` or ``10crop`` (the input is then the whole resized image, see
            :func:`graph_input_spec`).
        cache: where backbones remember their digests (a :class:`~headstart.cache.FeatureCache`), or None.

    Raises:
        ExportError: members that need different inputs, or preprocessing the reference cannot make.
    """
    spec = graph_input_spec(run, tta)
    names = run.class_names
    members = []
    for member in members_of(run):
        bb = load_run_backbone(member, None, cache)
        model = bb.model
        for p in model.parameters():
            p.requires_grad_(False)
        members.append(Member(model, member.info["data_config"], member.head, names))
    weights = run.member_weights if isinstance(run, EnsembleRun) else [1.0]
    total = float(np.sum(np.asarray(weights, dtype=np.float64)))
    module = ExportedModel(Views(tta, tuple(spec["size"])), members, [w / total for w in weights], len(names))
    return module.eval()


def member_summary(run: AnyRun) -> list[dict[str, Any]]:
    """What each member of the exported graph is: backbone, weights and their digest, freeze, weight."""
    weights = run.member_weights if isinstance(run, EnsembleRun) else [1.0]
    total = float(sum(weights))
    out = []
    for member, weight in zip(members_of(run), weights):
        spec = member.info["backbone"]
        out.append({"backbone": spec["name"], "weights": spec.get("weights_source", spec["weights"]),
                    "weights_digest": spec["weights_digest"], "freeze": spec.get("freeze", "all"),
                    "feature_source": member.info.get("head", {}).get("feature_source", "pooled"),
                    "head": member.head.kind, "weight": weight / total})
    return out

