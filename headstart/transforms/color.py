"""Colour augmentations: per-channel shifts and AlexNet's PCA colour noise, with the PCA fit.

Both add one offset per channel, in grey levels on the 0..255 scale; in a pipeline their offsets
are summed and added once, together with the geometric resample.

PCA scale: :class:`PCAStats` holds the covariance of RGB values on the **0..1 scale** (pixel / 255),
the convention of the widely used ImageNet constants (fb.resnet.torch); the offset
``eigvecs @ (alpha * eigvals)`` is computed on that scale and multiplied by 255 before it is added.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..errors import UsageError
from . import functional as F
from ._base import AugmentTransform, Params, check_number, check_range, jsonable


@dataclass(frozen=True, eq=False)
class PCAStats:
    """The eigen-decomposition of the 3x3 covariance of RGB pixel values (0..1 scale).

    Attributes:
        eigvals: ``(3,)`` variances along each principal axis, largest first.
        eigvecs: ``(3, 3)``; column ``k`` is the unit eigenvector of ``eigvals[k]`` (rows R, G, B).
        n_pixels: pixels the covariance was estimated from (0 for built-in constants).
        mean: ``(3,)`` mean RGB on the 0..1 scale, or None when unknown.
        source: ``"fitted"`` or the name of built-in constants (``"imagenet-alexnet"``).
    """

    eigvals: np.ndarray
    eigvecs: np.ndarray
    n_pixels: int = 0
    mean: np.ndarray | None = None
    source: str = "fitted"

    def __post_init__(self) -> None:
        vals = np.asarray(self.eigvals, dtype=np.float64)
        vecs = np.asarray(self.eigvecs, dtype=np.float64)
        if vals.shape != (3,) or vecs.shape != (3, 3) or not np.isfinite(vals).all() or not np.isfinite(vecs).all():
            raise UsageError(f"PCAStats needs eigvals (3,) and eigvecs (3, 3) of finite numbers; got shapes "
                             f"{vals.shape} and {vecs.shape}")
        if (vals < 0).any():
            raise UsageError(f"PCAStats eigvals are variances and cannot be negative; got {vals.tolist()}")
        object.__setattr__(self, "eigvals", vals)
        object.__setattr__(self, "eigvecs", vecs)
        object.__setattr__(self, "n_pixels", int(self.n_pixels))
        if self.mean is not None:
            object.__setattr__(self, "mean", np.asarray(self.mean, dtype=np.float64).reshape(3))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; :meth:`from_dict` reads it back."""
        return jsonable({"eigvals": self.eigvals, "eigvecs": self.eigvecs, "n_pixels": self.n_pixels,
                         "mean": self.mean, "source": self.source, "scale": "0..1"})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PCAStats:
        missing = [k for k in ("eigvals", "eigvecs") if k not in data]
        if missing:
            raise UsageError(f"PCA stats need the keys 'eigvals' and 'eigvecs'; missing {missing}")
        if data.get("scale", "0..1") != "0..1":
            raise UsageError(f"PCA stats must be on the 0..1 pixel scale; got scale {data['scale']!r}")
        return cls(np.asarray(data["eigvals"]), np.asarray(data["eigvecs"]), int(data.get("n_pixels", 0)),
                   None if data.get("mean") is None else np.asarray(data["mean"]), str(data.get("source", "fitted")))


#: AlexNet-style ImageNet constants (as published with fb.resnet.torch): the fallback when no
#: statistics were fitted on the user's images.
IMAGENET_PCA = PCAStats(
    eigvals=np.array([0.2175, 0.0188, 0.0045]),
    eigvecs=np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]),
    n_pixels=0,
    source="imagenet-alexnet",
)


def _pixels_hwc_or_chw(image: Any, index: int) -> tuple[np.ndarray, bool]:
    """An image as an array and whether it is channels-first; uint8 values, or floats on 0..1."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB")), False
    if isinstance(image, torch.Tensor):
        array, chw = image.detach().cpu().numpy(), True
    elif isinstance(image, np.ndarray):
        array, chw = image, False
    else:
        raise UsageError(f"fit_pca_stats: image {index} is a {type(image).__name__}; expected a PIL image, "
                         "an (H, W, 3) array or a (3, H, W) tensor")
    channel_axis = 0 if chw else -1
    if array.ndim != 3 or array.shape[channel_axis] != 3:
        layout = "(3, H, W) tensor" if chw else "(H, W, 3) array"
        raise UsageError(f"fit_pca_stats: image {index} has shape {array.shape}; expected an RGB {layout}")
    return array, chw


def fit_pca_stats(images: Iterable[PIL.Image.Image | np.ndarray | torch.Tensor], max_pixels_per_image: int = 4096,
                  seed: int = 0) -> PCAStats:
    """Estimate the RGB covariance of a set of images and its eigen-decomposition, streaming.

    Up to ``max_pixels_per_image`` random pixels of each image (drawn with replacement, seeded) are
    added to running sums and outer products, so memory stays constant and a few hundred decoded
    images take well under a second.

    Args:
        images: RGB images: PIL, ``(H, W, 3)`` arrays or ``(3, H, W)`` / ``(N, 3, H, W)`` tensors; uint8
            values, or floats on 0..1.
        max_pixels_per_image: pixels sampled per image (all of them when the image has fewer).
        seed: seed of the pixel sampling.

    Returns:
        PCAStats on the 0..1 scale, eigenvalues largest first; each eigenvector's largest
        component is positive (the sign is otherwise arbitrary).

    Example:
        >>> from PIL import Image
        >>> stats = fit_pca_stats([Image.new("RGB", (32, 32), (200, 30, 30))])
        >>> stats.eigvals.shape
        (3,)
    """
    if isinstance(max_pixels_per_image, bool) or not isinstance(max_pixels_per_image, int) or max_pixels_per_image < 1:
        raise UsageError(f"max_pixels_per_image must be a positive int; got {max_pixels_per_image!r}")
    rng = np.random.default_rng(seed)
    total = np.zeros(3)
    outer = np.zeros((3, 3))
    n = 0

    def add(array: np.ndarray, chw: bool) -> None:
        nonlocal n, total, outer
        flat = array.reshape(3, -1) if chw else array.reshape(-1, 3)
        count = flat.shape[1] if chw else flat.shape[0]
        idx = rng.integers(0, count, size=min(count, max_pixels_per_image))
        sample = (flat[:, idx].T if chw else flat[idx]).astype(np.float64)
        if array.dtype == np.uint8:
            sample /= 255.0
        elif array.dtype.kind == "f" and sample.size and (sample.max() > 1.0 or sample.min() < 0.0):
            raise UsageError("fit_pca_stats: float images must hold values on 0..1; got values outside it. "
                             "Pass uint8 images or divide by 255")
        total += sample.sum(axis=0)
        outer += sample.T @ sample
        n += len(sample)

    for i, image in enumerate(images):
        if isinstance(image, torch.Tensor) and image.ndim == 4:
            for item in image:
                add(*_pixels_hwc_or_chw(item, i))
        else:
            add(*_pixels_hwc_or_chw(image, i))
    if n < 2:
        raise UsageError("fit_pca_stats needs at least one image with two or more pixels; got none")
    mean = total / n
    cov = (outer - n * np.outer(mean, mean)) / (n - 1)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    vals, vecs = np.clip(vals[order], 0.0, None), vecs[:, order]
    signs = np.sign(vecs[np.abs(vecs).argmax(axis=0), np.arange(3)])
    return PCAStats(vals, vecs * np.where(signs == 0, 1.0, signs), n_pixels=n, mean=mean, source="fitted")


class ChannelShift(AugmentTransform):
    """Add a random shift to each colour channel, in grey levels (0..255 scale).

    Args:
        shift: ``s`` shifts every channel by a value in ``(-s, s)``; ``(low, high)`` uses that range for
            every channel; three pairs give per-channel ranges, e.g. ``((-20, 0), (0, 0), (0, 30))``
            for less red and more blue.

    Params:
        ``{"shift": tensor (3,)}`` grey levels.
    """

    name = "channel_shift"

    def __init__(self, shift: float | Sequence[float] | Sequence[Sequence[float]] = 10.0) -> None:
        super().__init__()
        if isinstance(shift, Sequence) and len(shift) == 3:
            if not all(isinstance(s, Sequence) for s in shift):
                raise UsageError(f"shift: give per-channel ranges as three (low, high) pairs, e.g. ((-5, 5), (0, 0), "
                                 f"(0, 20)); got {shift!r}")
            self.shift = tuple(check_range(s, f"shift[{i}]", low=-255, high=255) for i, s in enumerate(shift))
        else:
            self.shift = (check_range(shift, "shift", low=-255, high=255),) * 3

    def sample(self, height: int, width: int, generator: torch.Generator | None) -> Params:
        low = torch.tensor([s[0] for s in self.shift])
        high = torch.tensor([s[1] for s in self.shift])
        return {"shift": low + (high - low) * torch.rand(3, generator=generator)}

    def offset(self, params: Params) -> torch.Tensor:
        return torch.as_tensor(params["shift"], dtype=torch.float32)

    def apply(self, img: torch.Tensor, params: Params) -> torch.Tensor:
        return F.channel_shift(img, self.offset(params))

    def get_config(self) -> dict[str, Any]:
        return jsonable({"name": self.name, "shift": self.shift})


class PCAColor(AugmentTransform):
    """AlexNet's PCA colour augmentation: add ``eigvecs @ (alpha * eigvals)``, ``alpha ~ N(0, sigma)``.

    Args:
        sigma: standard deviation of each ``alpha`` (AlexNet: 0.1).
        stats: :class:`PCAStats` from :func:`fit_pca_stats` on the training images; None uses the
            ImageNet constants :data:`IMAGENET_PCA`.

    Params:
        ``{"alpha": tensor (3,)}``.
    """

    name = "pca_color"

    def __init__(self, sigma: float = 0.1, stats: PCAStats | dict[str, Any] | None = None) -> None:
        super().__init__()
        self.sigma = check_number(sigma, "sigma", 0.0, 100.0)
        if isinstance(stats, dict):
            stats = PCAStats.from_dict(stats)
        if stats is not None and not isinstance(stats, PCAStats):
            raise UsageError(f"stats must be PCAStats (see fit_pca_stats) or None; got {type(stats).__name__}")
        self.stats = stats if stats is not None else IMAGENET_PCA
        self._basis = torch.from_numpy(self.stats.eigvecs * self.stats.eigvals[None, :] * 255.0)  # columns v_k l_k

    def sample(self, height: int, width: int, generator: torch.Generator | None) -> Params:
        return {"alpha": torch.randn(3, generator=generator) * self.sigma}

    def offset(self, params: Params) -> torch.Tensor:
        return (self._basis @ torch.as_tensor(params["alpha"], dtype=torch.float64)).float()

    def apply(self, img: torch.Tensor, params: Params) -> torch.Tensor:
        if img.shape[-3] != 3:
            raise UsageError(f"PCAColor needs RGB images (3 channels); got {img.shape[-3]}")
        return F.add_channel_offset(img, self.offset(params))

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "sigma": self.sigma, "stats": self.stats.to_dict()}
