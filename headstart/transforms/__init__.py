"""Image augmentation for training: presets, one fused pipeline, and composable transforms.

``build_pipeline(preset, size, overrides, pca)`` gives a callable that turns a decoded image (PIL,
uint8 ``(C, H, W)`` or a uint8 ``(N, C, H, W)`` batch) into uint8 tensor(s) of ``size``; all
randomness comes from the ``generator`` passed to it. Pixel values, colour shifts and fills are
grey levels on 0..255; PCA statistics are on 0..1 (see :mod:`headstart.transforms.color`).

Presets (``overrides`` change any setting, see ``build_pipeline``):

========  ===========================================  ===============================  ========================
preset    crop / mirror / rotate / shear               local warp                       colour
========  ===========================================  ===============================  ========================
none      resize shorter side + centre crop            --                               --
light     RRC area 35-100%, mirror p=0.5               --                               --
standard  RRC 25-100%, mirror, rotate +-10, shear x 5  --                               shift +-10, PCA 0.1
heavy     RRC 8-100%, mirror, rotate +-25,             elastic alpha 6 px, sigma 40;    shift +-20, PCA 0.2
          shear x +-10 / y +-5                         grid steps 5, limit 0.25
========  ===========================================  ===============================  ========================

RRC = random-resized crop (area fraction of the image, aspect ratios 3/4..4/3); angles in degrees;
shifts in grey levels per channel; PCA = sigma of AlexNet's PCA colour noise, with statistics
fitted by ``fit_pca_stats`` when given, else the ImageNet (AlexNet) constants.

Each transform is also a ``torchvision.transforms.v2.Transform`` over a pure kernel in
:mod:`headstart.transforms.functional`: ``t.make_params(img, generator)`` draws, ``t(img, params=p)``
replays.

Example:
    >>> import torch
    >>> from headstart.transforms import build_pipeline
    >>> pipe = build_pipeline("standard", size=224, overrides={"affine": {"degrees": 20}})
    >>> pipe(torch.zeros(3, 300, 400, dtype=torch.uint8), generator=torch.Generator().manual_seed(0)).shape
    torch.Size([3, 224, 224])
"""

from . import functional
from ._base import AugmentTransform, GeometricTransform
from .color import IMAGENET_PCA, ChannelShift, PCAColor, PCAStats, fit_pca_stats
from .geometry import RandomAffine, RandomCrop, RandomHorizontalFlip, RandomResizedCrop, ResizeCenterCrop
from .pipeline import (
    PRESETS,
    TRANSFORMS,
    AugmentPipeline,
    build_pipeline,
    describe_presets,
    transform_from_config,
)
from .plan import WarpPlan
from .preview import preview_grid
from .warp import ElasticWarp, GridDistortion

__all__ = [
    "IMAGENET_PCA",
    "PRESETS",
    "TRANSFORMS",
    "AugmentPipeline",
    "AugmentTransform",
    "ChannelShift",
    "ElasticWarp",
    "GeometricTransform",
    "GridDistortion",
    "PCAColor",
    "PCAStats",
    "RandomAffine",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "ResizeCenterCrop",
    "WarpPlan",
    "build_pipeline",
    "describe_presets",
    "fit_pca_stats",
    "functional",
    "preview_grid",
    "transform_from_config",
]
