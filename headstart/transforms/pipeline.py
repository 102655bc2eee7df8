"""Presets and the fused augmentation pipeline: every geometric step in one resample, colour in one add.

:func:`build_pipeline` turns a preset name plus overrides into an :class:`AugmentPipeline`; the
pipeline's :meth:`~AugmentPipeline.config` is JSON and :meth:`~AugmentPipeline.from_config`
rebuilds it exactly (same outputs for the same generator seed).

Fusion changes two details against running the same transforms one after another: pixels that a
rotation or warp pulls in from outside an earlier crop come from the original image (fill appears
only outside the original image), and colour offsets are added together and clamped once.
"""

from __future__ import annotations

import copy
import difflib
import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .._constants import AUGMENT_PRESETS
from ..errors import UsageError
from ._base import (
    AugmentTransform,
    GeometricTransform,
    Params,
    check_fill,
    check_padding_mode,
    check_size,
    jsonable,
    to_image_tensor,
)
from .color import ChannelShift, PCAColor, PCAStats
from .geometry import RandomAffine, RandomCrop, RandomHorizontalFlip, RandomResizedCrop, ResizeCenterCrop
from .plan import WarpPlan
from .warp import ElasticWarp, GridDistortion

CONFIG_FORMAT = "headstart.augment/1"

#: Every transform by its config name, in the canonical order presets and overrides place them.
TRANSFORMS: dict[str, type[AugmentTransform]] = {
    cls.name: cls
    for cls in (ResizeCenterCrop, RandomResizedCrop, RandomCrop, RandomHorizontalFlip, RandomAffine, ElasticWarp,
                GridDistortion, ChannelShift, PCAColor)
}
_SIZING = ("resize", "resized_crop", "crop")  # transforms that set the output size (given ``size``)
_EXCLUSIVE = ("resize", "resized_crop")  # choosing one through overrides drops the other

#: name -> (one-line summary, {transform name: hyperparameters}); ``size`` is filled in by build_pipeline.
_PRESETS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "none": ("no augmentation: resize the shorter side and cut the centre", {"resize": {}}),
    "light": ("random-resized crop (35-100% of the area) and mirroring", {
        "resized_crop": {"scale": (0.35, 1.0)},
        "flip": {"p": 0.5},
    }),
    "standard": ("crop (25-100%), mirror, rotate +-10 deg, shear +-5 deg, channel shift +-10, PCA colour 0.1", {
        "resized_crop": {"scale": (0.25, 1.0)},
        "flip": {"p": 0.5},
        "affine": {"degrees": 10.0, "shear": 5.0},
        "channel_shift": {"shift": 10.0},
        "pca_color": {"sigma": 0.1},
    }),
    "heavy": ("crop (8-100%), mirror, rotate +-25 deg, shear x +-10 / y +-5 deg, elastic and grid warps, "
              "channel shift +-20, PCA colour 0.2", {
        "resized_crop": {"scale": (0.08, 1.0)},
        "flip": {"p": 0.5},
        "affine": {"degrees": 25.0, "shear": (-10.0, 10.0, -5.0, 5.0)},
        "elastic": {"alpha": 6.0, "sigma": 40.0},
        "grid_distortion": {"steps": 5, "limit": 0.25},
        "channel_shift": {"shift": 20.0},
        "pca_color": {"sigma": 0.2},
    }),
}
PRESETS: tuple[str, ...] = AUGMENT_PRESETS  # the names, shared with the CLI (headstart._constants)
assert tuple(_PRESETS) == PRESETS, "headstart._constants.AUGMENT_PRESETS must list the presets defined here"


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


class AugmentPipeline(AugmentTransform):
    """A list of transforms run as one: geometry fused into one resample, colour offsets into one add.

    Takes a decoded image (PIL, uint8 ``(C, H, W)`` or uint8 ``(N, C, H, W)``, any size) and returns
    uint8 tensor(s) of exactly ``size``. Per image, each transform draws its parameters in order
    from ``generator``; a batch draws image after image, so ``pipeline(batch, generator=g)`` equals
    stacking ``pipeline(batch[i], generator=g)`` for the same ``g``.

    Args:
        transforms: headstart transforms; the last of ``resize``/``resized_crop``/``crop`` must output ``size``.
        size: output ``(height, width)``.
        preset: the preset name it was built from (recorded in the config), or ``"custom"``.
        fill: grey level(s) of pixels that come from outside the source image.
        padding_mode: ``"constant"`` (fill), ``"edge"`` or ``"symmetric"``, for the whole resample.

    Example:
        >>> pipe = build_pipeline("standard", size=224)
        >>> view = pipe(torch.zeros(3, 375, 500, dtype=torch.uint8), generator=torch.Generator().manual_seed(7))
        >>> view.shape
        torch.Size([3, 224, 224])
    """

    name: ClassVar[str] = "pipeline"

    def __init__(self, transforms: Sequence[AugmentTransform], size: int | Sequence[int], preset: str = "custom",
                 fill: int | Sequence[int] = 0, padding_mode: str = "constant") -> None:
        super().__init__()
        self.size = check_size(size)
        self.preset = str(preset)
        self.fill = check_fill(fill)
        self.padding_mode = check_padding_mode(padding_mode)
        transforms = list(transforms)
        for t in transforms:
            if not isinstance(t, AugmentTransform) or isinstance(t, AugmentPipeline):
                raise UsageError(f"AugmentPipeline takes headstart transforms ({', '.join(TRANSFORMS)}); got "
                                 f"{type(t).__name__}")
            if isinstance(t, GeometricTransform) and (t.fill != 0 or t.padding_mode != "constant"):
                raise UsageError(f"{type(t).__name__} in a pipeline has its own fill/padding_mode, but a pipeline "
                                 "renders all geometry in one resample: set them on the pipeline instead, e.g. "
                                 "build_pipeline(..., overrides={'render': {'fill': 128}})")
        sizing = [t for t in transforms if t.name in _SIZING]
        if not sizing or sizing[-1].size != self.size:
            got = f"its last sizing step outputs {sizing[-1].size}" if sizing else "it has none"
            raise UsageError(f"a pipeline must end its geometry at size {self.size} with one of {', '.join(_SIZING)};"
                             f" {got}")
        self.transforms = torch.nn.ModuleList(transforms)

    @property
    def steps(self) -> tuple[AugmentTransform, ...]:
        """The transforms, in order (e.g. ``any(isinstance(s, PCAColor) for s in pipe.steps)``)."""
        return tuple(self.transforms)

    # ---- drawing and applying
    def sample(self, height: int, width: int, generator: torch.Generator | None) -> list[Params]:
        """Draw every transform's parameters for one image: a list, one dict per transform."""
        size = (height, width)
        draws = []
        for t in self.transforms:
            draws.append(t.sample(size[0], size[1], generator))
            size = t.output_size(size)
        return draws

    def apply(self, img: torch.Tensor, params: list[Params]) -> torch.Tensor:
        if not isinstance(params, list) or len(params) != len(self.transforms):
            raise UsageError(f"pipeline params for one image must be a list of {len(self.transforms)} dicts (one "
                             "per transform), as make_params returns")
        plan = WarpPlan(img.shape[-2:])
        offset = None
        for t, p in zip(self.transforms, params):
            if t.geometric:
                t.update_plan(plan, p)
            else:
                offset = t.offset(p) if offset is None else offset + t.offset(p)
        if offset is not None and img.shape[-3] != offset.numel():
            raise UsageError(f"the pipeline's colour steps need RGB images; got {img.shape[-3]} channel(s)")
        return plan.render(img, offset, fill=self.fill, padding_mode=self.padding_mode)

    def _apply_any(self, img: torch.Tensor, params: Any) -> torch.Tensor:
        if img.ndim == 4 and isinstance(params, list) and params and isinstance(params[0], dict):
            params = [params] * img.shape[0]  # one image's draw for every image of the batch
        if img.ndim == 3:
            return self.apply(img, params)
        return super()._apply_any(img, params)

    def transform(self, inpt: Any, params: Any) -> torch.Tensor:
        """Always a uint8 tensor, whatever the input type (the output feeds a model)."""
        return self._apply_any(to_image_tensor(inpt, "pipeline input"), params)

    # ---- configuration
    def get_config(self) -> dict[str, Any]:
        """The exact pipeline as JSON-serialisable data (as every transform's own); :meth:`from_config` rebuilds it."""
        pca = next((t.stats for t in self.transforms if isinstance(t, PCAColor)), None)
        return {
            "format": CONFIG_FORMAT,
            "preset": self.preset,
            "size": list(self.size),
            "render": {"fill": jsonable(self.fill), "padding_mode": self.padding_mode, "interpolation": "bilinear"},
            # members' own fill/padding_mode are always the defaults here: the pipeline's render settings rule
            "transforms": [{k: v for k, v in t.get_config().items() if k not in ("fill", "padding_mode")}
                           for t in self.transforms],
            "pca_source": None if pca is None else pca.source,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> AugmentPipeline:
        """Rebuild a pipeline from :meth:`config` output (e.g. read back from JSON)."""
        if not isinstance(cfg, dict) or cfg.get("format") != CONFIG_FORMAT:
            got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
            raise UsageError(f"not an augmentation config: expected format '{CONFIG_FORMAT}', got {got!r}")
        render = cfg.get("render", {})
        return cls([transform_from_config(t) for t in cfg["transforms"]], cfg["size"], cfg.get("preset", "custom"),
                   fill=render.get("fill", 0), padding_mode=render.get("padding_mode", "constant"))

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, size={self.size}"


def transform_from_config(cfg: dict[str, Any]) -> AugmentTransform:
    """One transform from its ``get_config()`` dict."""
    if not isinstance(cfg, dict) or cfg.get("name") not in TRANSFORMS:
        name = cfg.get("name") if isinstance(cfg, dict) else cfg
        raise UsageError(f"unknown transform {name!r}{_did_you_mean(name, TRANSFORMS)}; known: {', '.join(TRANSFORMS)}")
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    return _construct(cfg["name"], kwargs)


def _construct(name: str, kwargs: dict[str, Any]) -> AugmentTransform:
    cls = TRANSFORMS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise UsageError(f"'{name}' has no setting {unknown[0]!r}{_did_you_mean(unknown[0], accepted)}; "
                         f"its settings are {', '.join(accepted)}")
    return cls(**kwargs)


def build_pipeline(preset: str = "standard", size: int | tuple[int, int] = 224, overrides: dict | None = None,
                   pca: PCAStats | None = None) -> AugmentPipeline:
    """The augmentation pipeline of a preset, with any hyperparameter overridden.

    Args:
        preset: one of :data:`PRESETS` (``none``, ``light``, ``standard``, ``heavy``).
        size: output ``(height, width)``, or an int for squares.
        overrides: ``{transform name: {setting: value}}`` changes settings, e.g.
            ``{"affine": {"degrees": 20}}``; naming a transform the preset lacks adds it in the
            canonical order (``{"elastic": {}}`` adds it with defaults); ``None``/``False`` removes it.
            ``resize`` and ``resized_crop`` exclude each other. ``{"render": {"fill": 128,
            "padding_mode": "edge"}}`` sets what pixels from outside the image look like.
        pca: PCA colour statistics from :func:`fit_pca_stats`; when the pipeline has ``pca_color``
            and this is None, the ImageNet constants are used (recorded as ``pca_source``).

    Returns:
        AugmentPipeline; ``pipeline(img, generator=g)`` gives uint8 tensor(s) of ``size``.

    Example:
        >>> pipe = build_pipeline("heavy", size=(192, 256), overrides={"elastic": None, "affine": {"degrees": 5}})
        >>> [t["name"] for t in pipe.get_config()["transforms"]]
        ['resized_crop', 'flip', 'affine', 'grid_distortion', 'channel_shift', 'pca_color']
    """
    if preset not in _PRESETS:
        raise UsageError(f"unknown augmentation preset {preset!r}{_did_you_mean(preset, PRESETS)}; "
                         f"choose one of {', '.join(PRESETS)}")
    size = check_size(size)
    if pca is not None and not isinstance(pca, PCAStats):
        raise UsageError(f"pca must be PCAStats (see fit_pca_stats) or None; got {type(pca).__name__}")
    spec = copy.deepcopy(_PRESETS[preset][1])
    render: dict[str, Any] = {}
    if overrides is not None and not isinstance(overrides, dict):
        raise UsageError("overrides must be a dict like {'affine': {'degrees': 20}}; got "
                         f"{type(overrides).__name__}")
    for name, settings in (overrides or {}).items():
        known = (*TRANSFORMS, "render")
        if name not in known:
            raise UsageError(f"overrides: unknown transform {name!r}{_did_you_mean(name, known)}; "
                             f"known: {', '.join(known)}")
        if name == "render":
            unknown = [k for k in (settings or {}) if k not in ("fill", "padding_mode")]
            if not isinstance(settings, dict) or unknown:
                raise UsageError(f"overrides['render'] takes {{'fill': ..., 'padding_mode': ...}}; got {settings!r}")
            render.update(settings)
            continue
        if settings is None or settings is False:
            spec.pop(name, None)
            continue
        if settings is True:
            settings = {}
        if not isinstance(settings, dict):
            raise UsageError(f"overrides[{name!r}] must be a dict of settings, True/{{}} to add it with defaults, "
                             f"or None/False to remove it; got {settings!r}")
        blocked = [k for k in settings if k in ("size", "fill", "padding_mode", "stats")]
        if blocked:
            fix = {"size": "pass size= to build_pipeline", "stats": "pass pca= to build_pipeline"}.get(
                blocked[0], "set it for the whole pipeline with overrides={'render': {...}}")
            raise UsageError(f"overrides[{name!r}] cannot set {blocked[0]!r}: {fix}")
        if name in _EXCLUSIVE:
            for other in _EXCLUSIVE:
                if other != name:
                    spec.pop(other, None)
        spec.setdefault(name, {}).update(settings)
    if not any(name in spec for name in _SIZING):
        raise UsageError(f"the pipeline needs one of {', '.join(_SIZING)} to produce {size[0]}x{size[1]} images; "
                         "do not remove all of them")
    transforms = []
    for name in TRANSFORMS:  # canonical order
        if name not in spec:
            continue
        kwargs = dict(spec[name])
        if name in _SIZING:
            kwargs["size"] = size
        if name == "pca_color":
            kwargs["stats"] = pca
        transforms.append(_construct(name, kwargs))
    return AugmentPipeline(transforms, size, preset=preset, **render)


def describe_presets(size: int | tuple[int, int] = 224) -> list[dict[str, Any]]:
    """Each preset's name, one-line summary and exact transforms with every setting (for docs and the CLI).

    PCA statistics are shown as their source only (``"imagenet-alexnet"`` unless fitted ones are given).
    """
    out = []
    for name, (summary, _) in _PRESETS.items():
        cfg = build_pipeline(name, size).get_config()
        steps = [{k: v for k, v in t.items() if k != "stats"} for t in cfg["transforms"]]
        out.append({"name": name, "summary": summary, "transforms": steps, "pca_source": cfg["pca_source"]})
    return out
