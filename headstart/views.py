"""Views of an image: how a decoded image becomes the tensor a backbone sees, and its cache identity.

The clean view is the backbone's own evaluation preprocessing; an augmented view's randomness is
seeded from (seed, image content, view index) alone, so the same view is reproduced whatever the
number of workers or the image order. :func:`~headstart.features.extract_views` takes any list of them;
:class:`ViewsOfFiles` makes the views of a file from one read and one decode (in DataLoader workers).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .data import ImageDecodeError, decode_bytes, draft_scale
from .preprocess import eval_transform, resize_size


class View:
    """How one view of an image is made: decoded RGB image (+ its content key) -> normalised tensor.

    Args:
        transform: ``transform(image, image_key) -> float tensor (3, H, W)``; must be picklable
            (it runs in DataLoader workers).
        description: what, besides backbone and preprocessing, identifies this view in cache keys.
        min_size: ``(height, width)`` the transform resizes the image down to, so that a large JPEG can
            be decoded at reduced scale for it (:func:`~headstart.data.decode_bytes`); it then goes
            into the view's cache key. ``None``: the transform gets every pixel.
    """

    def __init__(self, transform: Any, description: dict[str, Any],
                 min_size: tuple[int, int] | None = None) -> None:
        self.transform = transform
        self.description = description
        self.min_size = None if min_size is None else (int(min_size[0]), int(min_size[1]))


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


def clean_view(data_config: dict[str, Any], draft: bool = True) -> View:
    """The backbone's own eval preprocessing; with ``draft``, a large JPEG is decoded at reduced scale,
    still at least :data:`~headstart.data.decode.DRAFT_MARGIN` times the eval resize on both sides."""
    return View(CleanTransform(data_config), {"view": "clean"}, resize_size(data_config) if draft else None)


def augmented_views(pipeline: Any, data_config: dict[str, Any], n_views: int, seed: int = 0) -> list[View]:
    """``n_views`` augmented views; view ``v`` has the same cache key in any run with the same pipeline and seed.

    They decode every pixel: a random crop's box depends on the image's size, so a reduced-scale decode
    would give a different crop (measured on 12-megapixel photos: cosine to the full decode's features
    down to 0.7 with the ``light`` preset, 0.3 with ``heavy``).
    """
    config = pipeline.get_config()
    return [View(AugmentedTransform(pipeline, data_config, seed, v),
                 {"view": "augmented", "augment": config, "seed": seed, "index": v}) for v in range(n_views)]


def read_and_hash(path: Path) -> tuple[bytes, str, str]:
    """A file's bytes and their sha256, or why it could not be read: ``(data, digest, error)``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return b"", "", "file not found" if isinstance(exc, FileNotFoundError) else f"cannot read file ({exc})"
    return data, hashlib.sha256(data).hexdigest(), ""


class ViewsOfFiles(Dataset):
    """Item ``i``: every requested view of file ``i``, from one read and as few decodes as their sizes allow.

    The same bytes are hashed and decoded, so a feature is always filed under the hash of the content
    it was computed from, even if the file changes meanwhile. ``decode(data, path)`` raises
    :class:`~headstart.data.ImageDecodeError` for bytes that are not an image; a decode that also takes
    ``min_size`` gets each view's :attr:`View.min_size`. Views whose decoded images are the same (with
    :func:`~headstart.data.decode_bytes`: the same JPEG scale) share one decode; each view always sees
    the image decoded for its own ``min_size``, whatever other views are made with it.
    """

    def __init__(self, paths: Sequence[Path], wanted: Sequence[Sequence[int]], views: Sequence[View],
                 decode: Callable[..., Any]) -> None:
        self.paths = list(paths)
        self.wanted = [list(w) for w in wanted]
        self.transforms = [v.transform for v in views]
        self.sizes = [getattr(v, "min_size", None) for v in views]
        self.decode = decode
        self.sized = _takes_min_size(decode)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        item: dict[str, Any] = {"index": i, "digest": "", "error": "", "permanent": False,
                                "views": self.wanted[i], "tensors": None}
        data, item["digest"], item["error"] = read_and_hash(path)
        if item["error"]:
            return item
        try:
            item["tensors"] = torch.stack(self._views(data, path, item["digest"], self.wanted[i]))
        except ImageDecodeError as exc:
            item["error"], item["permanent"] = str(exc).removeprefix(f"{path}: "), exc.permanent
        except Exception as exc:  # a transform failure on a strange image must not kill the run
            item["error"] = f"cannot preprocess image ({type(exc).__name__}: {exc})"
        return item

    def _views(self, data: bytes, path: Path, image_key: str, wanted: list[int]) -> list[torch.Tensor]:
        """The wanted views in order, one decode per distinct decoded image, each released after use."""
        groups: dict[Any, list[int]] = {}
        one_size = len({self.sizes[v] for v in wanted}) == 1  # the common case: no need to read the header first
        for position, v in enumerate(wanted):
            groups.setdefault(None if one_size else self._decoded_as(data, self.sizes[v]), []).append(position)
        out: list[Any] = [None] * len(wanted)
        for positions in groups.values():
            size = self.sizes[wanted[positions[0]]]
            image = self.decode(data, path, min_size=size) if self.sized and size else self.decode(data, path)
            for position in positions:
                out[position] = self.transforms[wanted[position]](image, image_key)
        return out

    def _decoded_as(self, data: bytes, size: tuple[int, int] | None) -> Any:
        """Equal for views that get the same decoded image: ``None`` for every pixel."""
        if size is None or not self.sized:
            return None
        if self.decode is decode_bytes:  # its scale is known from the header
            scale = draft_scale(data, size)
            return None if scale == 1 else scale
        return size


def _takes_min_size(decode: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(decode).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "min_size" or p.kind is p.VAR_KEYWORD for p in params)
