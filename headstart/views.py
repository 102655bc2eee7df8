"""Views of an image: how a decoded image becomes the tensor a backbone sees, and its cache identity.

The clean view is the backbone's own evaluation preprocessing; an augmented view's randomness is
seeded from (seed, image content, view index) alone, so the same view is reproduced whatever the
number of workers or the image order. :func:`~headstart.features.extract_views` takes any list of them;
:class:`ViewsOfFiles` makes the views of a file from one read and one decode (in DataLoader workers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .data import ImageDecodeError
from .preprocess import eval_transform


class View:
    """How one view of an image is made: decoded RGB image (+ its content key) -> normalised tensor.

    Args:
        transform: ``transform(image, image_key) -> float tensor (3, H, W)``; must be picklable
            (it runs in DataLoader workers).
        description: what, besides backbone and preprocessing, identifies this view in cache keys.
    """

    def __init__(self, transform: Any, description: dict[str, Any]) -> None:
        self.transform = transform
        self.description = description


class CleanTransform:
    """The backbone's own evaluation preprocessing (resize, centre crop, normalise)."""

    def __init__(self, data_config: dict[str, Any]) -> None:
        self.data_config = data_config
        self._transform = None

    def __call__(self, image: Any, image_key: str) -> torch.Tensor:
        if self._transform is None:
            self._transform = eval_transform(self.data_config)
        return self._transform(image)

    def __getstate__(self) -> dict[str, Any]:
        return {"data_config": self.data_config, "_transform": None}


class AugmentedTransform:
    """One augmented view: ``pipeline(image, generator)`` -> uint8 (3, H, W), then the backbone's mean/std.

    The generator is seeded from ``(seed, image content hash, view index)``.
    """

    def __init__(self, pipeline: Any, data_config: dict[str, Any], seed: int, view: int) -> None:
        self.pipeline = pipeline
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(data_config["std"], dtype=torch.float32).view(3, 1, 1)
        self.seed = seed
        self.view = view

    def __call__(self, image: Any, image_key: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(view_seed(self.seed, image_key, self.view))
        out = self.pipeline(image, generator=generator)
        return (out.float() / 255.0 - self.mean) / self.std


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (e.g. seed, "epoch", epoch): the same parts, the same seed, on any machine."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def view_seed(seed: int, image_key: str, view: int) -> int:
    """A seed that depends only on the run seed, the image's content and the view index."""
    return derive_seed(seed, image_key, view)


def clean_view(data_config: dict[str, Any]) -> View:
    return View(CleanTransform(data_config), {"view": "clean"})


def augmented_views(pipeline: Any, data_config: dict[str, Any], n_views: int, seed: int = 0) -> list[View]:
    """``n_views`` augmented views; view ``v`` has the same cache key in any run with the same pipeline and seed."""
    config = pipeline.get_config()
    return [View(AugmentedTransform(pipeline, data_config, seed, v),
                 {"view": "augmented", "augment": config, "seed": seed, "index": v}) for v in range(n_views)]


class ViewsOfFiles(Dataset):
    """Item ``i``: every requested view of file ``i``, from one read and one decode.

    The same bytes are hashed and decoded, so a feature is always filed under the hash of the content
    it was computed from, even if the file changes meanwhile. ``decode(data, path)`` raises
    :class:`~headstart.data.ImageDecodeError` for bytes that are not an image.
    """

    def __init__(self, paths: Sequence[Path], wanted: Sequence[Sequence[int]], views: Sequence[View],
                 decode: Callable[[bytes, Path], Any]) -> None:
        self.paths = list(paths)
        self.wanted = [list(w) for w in wanted]
        self.transforms = [v.transform for v in views]
        self.decode = decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        item: dict[str, Any] = {"index": i, "digest": "", "error": "", "permanent": False,
                                "views": self.wanted[i], "tensors": None}
        try:
            data = path.read_bytes()
        except OSError as exc:
            item["error"] = "file not found" if isinstance(exc, FileNotFoundError) else f"cannot read file ({exc})"
            return item
        item["digest"] = hashlib.sha256(data).hexdigest()
        try:
            image = self.decode(data, path)
            item["tensors"] = torch.stack([self.transforms[v](image, item["digest"]) for v in self.wanted[i]])
        except ImageDecodeError as exc:
            item["error"], item["permanent"] = str(exc).removeprefix(f"{path}: "), exc.permanent
        except Exception as exc:  # a transform failure on a strange image must not kill the run
            item["error"] = f"cannot preprocess image ({type(exc).__name__}: {exc})"
        return item
