"""Feature sources for the head: the pooled features, the backbone's own ImageNet logits, or both.

A timm backbone without its classifier returns the pooled vector ``x``; the network's ImageNet
classifier maps it to 1000 class scores, ``logits = W x + b``. Those scores are a second feature
source (they carry what the network learned about ImageNet's classes). Both are computed from the
same cached pooled rows, so a new source costs no backbone forward:

* ``pooled`` -- ``x``;
* ``logits`` -- ``W x + b``;
* ``pooled+logits`` -- ``[x, W x + b]``.

Because every source is an affine map of ``x``, a head trained on a source is folded back into a
head on ``x`` (:func:`fold_into_pooled`): runs, TTA, ensembles and export see an ordinary head on
pooled features, and the run records which source it was chosen on.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._constants import FEATURE_SOURCES
from .errors import UsageError

SOURCES = FEATURE_SOURCES


@dataclass(frozen=True)
class Classifier:
    """The backbone's own classifier: ``logits = x @ weight.T + bias`` (float32)."""

    weight: np.ndarray  # (n_imagenet_classes, num_features)
    bias: np.ndarray  # (n_imagenet_classes,)


def check_source(source: str) -> None:
    if source not in SOURCES:
        raise UsageError(f"feature source must be one of {', '.join(SOURCES)}; got '{source}'")


def source_dim(source: str, num_features: int, classifier: Classifier | None) -> int:
    n_logits = 0 if classifier is None else len(classifier.bias)
    return {"pooled": num_features, "logits": n_logits, "pooled+logits": num_features + n_logits}[source]


def source_features(x: np.ndarray, source: str, classifier: Classifier | None) -> np.ndarray:
    """The features of ``source`` for pooled rows ``x`` (``(..., num_features)``), float32."""
    check_source(source)
    if source == "pooled":
        return x
    if classifier is None:
        raise UsageError(f"feature source '{source}' needs the backbone's own classifier, which this backbone lacks")
    flat = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1]))
    logits = torch.nn.functional.linear(flat, torch.from_numpy(classifier.weight), torch.from_numpy(classifier.bias))
    logits = logits.numpy().reshape(*x.shape[:-1], -1)
    return logits if source == "logits" else np.concatenate([x.astype(np.float32, copy=False), logits], axis=-1)


def _affine(source: str, classifier: Classifier | None, num_features: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A, c)`` with ``source_features(x) = A @ x + c``, float64."""
    eye = np.eye(num_features)
    if source == "pooled":
        return eye, np.zeros(num_features)
    assert classifier is not None
    w, b = classifier.weight.astype(np.float64), classifier.bias.astype(np.float64)
    if source == "logits":
        return w, b
    return np.vstack([eye, w]), np.concatenate([np.zeros(num_features), b])


def fold_into_pooled(head: Any, source: str, classifier: Classifier | None, x_mean: np.ndarray) -> Any:
    """A copy of a fitted headstart head on ``source`` features that takes pooled features instead.

    The head's standardisation (mean ``m``, scale ``s``) and first linear layer ``(L, l)`` become one
    layer on pooled rows centred at ``x_mean`` (the training mean, for numerical comfort; any value
    gives the same function): ``L ((A x + c - m) / s) + l = (L / s) A (x - x_mean) + (L / s)(A x_mean + c - m) + l``.
    """
    if source == "pooled":
        return head
    a, c = _affine(source, classifier, len(x_mean))
    module = head.module_
    std, first = module[0], module[1]
    scale = std.scale.double().numpy()
    m = std.mean.double().numpy()
    lw = first.weight.detach().double().numpy() / scale
    new_w = lw @ a
    new_b = lw @ (a @ x_mean.astype(np.float64) + c - m) + first.bias.detach().double().numpy()
    folded = copy.deepcopy(head)
    new_module = copy.deepcopy(module)
    d = len(x_mean)
    new_std = type(std)(d)
    new_std.mean.copy_(torch.from_numpy(x_mean.astype(np.float32)))
    new_first = torch.nn.Linear(d, new_w.shape[0])
    with torch.no_grad():
        new_first.weight.copy_(torch.from_numpy(new_w).float())
        new_first.bias.copy_(torch.from_numpy(new_b).float())
    new_module[0], new_module[1] = new_std, new_first
    folded.module_ = new_module.eval()
    folded.n_features_in_ = d
    return folded


# ------------------------------------------------------------------------------------ the classifier


def _linear_of(module: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    if isinstance(module, torch.nn.Linear) and module.bias is not None:
        return module.weight.detach(), module.bias.detach()
    if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) and module.bias is not None:
        return module.weight.detach().flatten(1), module.bias.detach()
    return None


def backbone_classifier(backbone: Any, weights: str, memo: Any = None) -> Classifier:
    """The ImageNet classifier that belongs to a backbone's weights, as ``(weight, bias)``.

    Packaged weights carry it; timm downloads build the full model; a weights file must hold the
    classifier tensors under timm's name. ``weights="random"`` and headless models have none, and
    raise :class:`UsageError` that says so.
    """
    name, num_features = backbone.name, backbone.num_features
    if weights == "random":
        raise UsageError(f"feature source 'logits' needs a pre-trained classifier; '{name}' with --weights random "
                         "has none. Use --grid-source pooled")
    key = "classifier:" + hashlib.sha256(f"{name}|{weights}|{backbone.weights_digest}".encode()).hexdigest()
    cached = _load_memo(memo, key)
    if cached is not None:
        return cached
    tensors = _classifier_tensors(name, weights)
    if tensors is None or tensors[0].ndim != 2 or tensors[0].shape[1] != num_features:
        raise UsageError(f"'{name}' ({weights} weights) has no linear classifier on its {num_features} pooled "
                         "features, so the 'logits' feature source cannot be used; use --grid-source pooled")
    found = Classifier(tensors[0].float().numpy().copy(), tensors[1].float().numpy().copy())
    _save_memo(memo, key, found)
    return found


def _classifier_tensors(name: str, weights: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    import timm

    from .backbones import PACKAGED_WEIGHTS, lukemelas_to_timm, packaged_state_dict, read_weights_file

    if weights == "default" and name in PACKAGED_WEIGHTS:
        state = packaged_state_dict(name)
        return state["classifier.weight"], state["classifier.bias"]
    if weights == "default":
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as exc:
            raise UsageError(f"could not get '{name}' with its classifier from timm ({type(exc).__name__}); "
                             "offline? use --grid-source pooled") from None
        return _linear_of(model.get_classifier())
    from pathlib import Path

    state = read_weights_file(Path(weights))
    if any(k.startswith("_blocks.") for k in state):
        state = lukemelas_to_timm(state, timm.create_model(name, pretrained=False))
    model = timm.create_model(name, pretrained=False)
    prefix = model.default_cfg.get("classifier", "classifier")
    if f"{prefix}.weight" not in state or f"{prefix}.bias" not in state:
        return None
    return state[f"{prefix}.weight"].flatten(1), state[f"{prefix}.bias"]


def _load_memo(memo: Any, key: str) -> Classifier | None:
    root = getattr(memo, "root", None)
    if root is None:
        return None
    path = root / "classifiers" / f"{key.split(':')[1]}.safetensors"
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
        return Classifier(tensors["weight"], tensors["bias"])
    except Exception:  # a damaged memo is rebuilt
        return None


def _save_memo(memo: Any, key: str, classifier: Classifier) -> None:
    root = getattr(memo, "root", None)
    if root is None:
        return
    from safetensors.numpy import save

    from ._io import atomic_write_bytes

    data = save({"weight": classifier.weight, "bias": classifier.bias})
    with contextlib.suppress(OSError):  # a read-only cache still works, only slower next time
        atomic_write_bytes(root / "classifiers" / f"{key.split(':')[1]}.safetensors", data)
