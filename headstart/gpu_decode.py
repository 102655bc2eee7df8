"""Clean views made on a CUDA device: JPEGs decoded in batches by nvJPEG, resized and normalised as tensors.

On a GPU the network is not what limits feature extraction: Pillow's decoding is (the hand-written
pipeline keeps an H200 ~7% busy). :class:`DeviceCleanBatches` replaces the DataLoader of
:mod:`headstart.features` for the one clean view when the device is CUDA:

* threads read and hash the files ahead of the device (:data:`READ_AHEAD` batches), so reading
  overlaps decoding and the forward pass;
* the JPEGs of a batch are decoded together on the device (``torchvision.io.decode_jpeg`` on a list);
  anything else (PNG, CMYK or EXIF-rotated JPEGs, a file nvJPEG refuses) is decoded by Pillow as on
  the CPU path and moved over;
* images of the same size are resized as one stack (:func:`size_groups`), with the eval transform's
  geometry (:func:`resize_plan`: timm's ``center`` mode, torchvision's ``Resize``/``CenterCrop``
  rounding) and antialiasing, then cropped and normalised.

Every step but nvJPEG also runs on the CPU (``device="cpu"``), which is how the tests check the
batching and the resize maths on machines without a GPU. The pixels differ slightly from Pillow's
(another JPEG decoder, tensor resizing): the view's cache key says ``decode: device`` so the two are
never mixed, and the features agree within cosine 0.99 (tests).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import ImageDecodeError, decode_bytes
from .data.decode import max_pixels, quiet_orientation
from .views import read_and_hash

READ_AHEAD = 4  # batches of files read (and hashed) ahead of the one on the device
READERS = 8  # threads reading files
DEVICE_VIEW = {"view": "clean", "decode": "device"}  # the cache description of views made here


@dataclass(frozen=True)
class Plan:
    """Where one image of ``(height, width)`` goes: resized to ``size``, then ``crop`` = (top, left, h, w)."""

    size: tuple[int, int]
    crop: tuple[int, int, int, int]


def supported(data_config: dict[str, Any]) -> bool:
    """True for the eval preprocessing this module reproduces: timm's ``center`` crop of a square resize."""
    crop_pct = data_config.get("crop_pct") or 0.875
    _, height, width = data_config["input_size"]
    return (data_config.get("crop_mode") in (None, "center") and math.floor(height / crop_pct) ==
            math.floor(width / crop_pct) and data_config.get("interpolation", "bilinear") in ("bilinear", "bicubic"))


def resize_plan(height: int, width: int, data_config: dict[str, Any]) -> Plan:
    """The eval transform's geometry for an image of ``height`` x ``width``.

    The shorter side becomes ``floor(crop / crop_pct)`` and the longer one keeps the aspect ratio,
    truncated (torchvision's ``Resize(int)``); the crop is centred, its offsets rounded
    (torchvision's ``CenterCrop``).
    """
    crop_pct = data_config.get("crop_pct") or 0.875
    _, crop_h, crop_w = (int(s) for s in data_config["input_size"])
    short = math.floor(crop_h / crop_pct)
    size = (short, int(short * width / height)) if height <= width else (int(short * height / width), short)
    top, left = round((size[0] - crop_h) / 2.0), round((size[1] - crop_w) / 2.0)
    return Plan(size, (top, left, crop_h, crop_w))


def size_groups(shapes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Indices of ``shapes`` grouped by equal shape, in order of first appearance: one resize per group."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    return list(groups.values())


def preprocess(images: Sequence[torch.Tensor], data_config: dict[str, Any]) -> torch.Tensor:
    """uint8 ``(3, h, w)`` images (any sizes, one device) -> the normalised batch ``(n, 3, H, W)`` float32.

    Images of one size are resized together (antialiased, the config's interpolation), then cropped.
    """
    device = images[0].device
    mode = data_config.get("interpolation", "bilinear")
    mean = torch.tensor(data_config["mean"], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(data_config["std"], device=device).view(1, 3, 1, 1) * 255
    _, crop_h, crop_w = (int(s) for s in data_config["input_size"])
    out = torch.empty((len(images), 3, crop_h, crop_w), device=device)
    for group in size_groups([tuple(im.shape[1:]) for im in images]):
        plan = resize_plan(*images[group[0]].shape[1:], data_config)
        stack = torch.stack([images[i] for i in group]).float()
        if stack.shape[2:] != plan.size:
            stack = F.interpolate(stack, size=plan.size, mode=mode, antialias=True, align_corners=False)
        top, left, h, w = plan.crop
        out[group] = stack[:, :, top:top + h, left:left + w].clamp_(0, 255).round_()
    return (out - mean) / std


@dataclass
class _Read:
    """One file as the readers leave it: its bytes and hash, or why it could not be read."""

    data: bytes = b""
    digest: str = ""
    error: str = ""
    plain_jpeg: bool = False  # baseline for nvJPEG: a JPEG with no EXIF rotation, RGB or greyscale


def read_file(path: Path) -> _Read:
    """Read and hash ``path`` (in a reader thread: nothing here touches process-wide state)."""
    data, digest, error = read_and_hash(path)
    return _Read(data, digest, error)


def _plain_jpeg(data: bytes) -> bool:
    if data[:3] != b"\xff\xd8\xff":
        return False
    from PIL import Image

    try:
        with warnings.catch_warnings():  # (in the main thread: the filters are the process's, not a thread's)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # the header only
                # quiet_orientation, not getexif: Pillow's warnings on a damaged EXIF block would be swallowed
                # here; such a file goes to Pillow's decode, which names it in its warning
                return (img.mode in ("RGB", "L") and quiet_orientation(img) == 1
                        and img.size[0] * img.size[1] <= max_pixels())  # a larger one: Pillow refuses it
    except Exception:
        return False


class DeviceCleanBatches:
    """Batches of items (as :class:`~headstart.views.ViewsOfFiles` makes them) with clean views made on ``device``.

    Iterating yields lists of dicts: ``index``, ``digest``, ``error``, ``permanent``, ``views`` and
    ``tensors`` (``(1, 3, H, W)`` on the device) for up to ``batch_size`` files each.
    """

    def __init__(self, paths: Sequence[Path], data_config: dict[str, Any], batch_size: int,
                 device: torch.device) -> None:
        self.paths, self.data_config, self.batch_size, self.device = list(paths), data_config, batch_size, device

    def __len__(self) -> int:
        return -(-len(self.paths) // self.batch_size)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        starts = list(range(0, len(self.paths), self.batch_size))
        with ThreadPoolExecutor(READERS) as pool:
            ahead: list[list[Future[_Read]]] = []
            for n, start in enumerate(starts):
                while len(ahead) <= READ_AHEAD and n + len(ahead) < len(starts):
                    first = starts[n + len(ahead)]
                    ahead.append([pool.submit(read_file, p) for p in self.paths[first:first + self.batch_size]])
                reads = [future.result() for future in ahead.pop(0)]
                yield self._batch(start, reads)

    def _batch(self, start: int, reads: list[_Read]) -> list[dict[str, Any]]:
        for r in reads:  # here, not in the reader threads: catch_warnings is not thread-safe
            r.plain_jpeg = not r.error and _plain_jpeg(r.data)
        items = [{"index": start + i, "digest": r.digest, "error": r.error, "permanent": False, "views": [0],
                  "tensors": None} for i, r in enumerate(reads)]
        images: dict[int, torch.Tensor] = self._decode_jpegs(reads)
        for i, r in enumerate(reads):
            if r.error or i in images:
                continue
            try:
                images[i] = _pillow_to_device(r.data, self.paths[start + i], self.device)
            except ImageDecodeError as exc:
                items[i]["error"] = str(exc).removeprefix(f"{self.paths[start + i]}: ")
                items[i]["permanent"] = exc.permanent
            except Exception as exc:  # as on the CPU path: a strange image must not kill the run
                items[i]["error"] = f"cannot preprocess image ({type(exc).__name__}: {exc})"
        order = sorted(images)
        if order:
            batch = preprocess([images[i] for i in order], self.data_config)
            for row, i in enumerate(order):
                items[i]["tensors"] = batch[row:row + 1]
        return items

    def _decode_jpegs(self, reads: list[_Read]) -> dict[int, torch.Tensor]:
        """The plain JPEGs of a batch decoded on the device in one call (one by one if that call fails)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        index = [i for i, r in enumerate(reads) if r.plain_jpeg and not r.error]
        if not index:
            return {}
        encoded = [torch.frombuffer(bytearray(reads[i].data), dtype=torch.uint8) for i in index]
        try:
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            return dict(zip(index, decoded))
        except RuntimeError:
            out = {}
            for i, data in zip(index, encoded):
                with contextlib.suppress(RuntimeError):  # left to Pillow
                    out[i] = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            return out


def _pillow_to_device(data: bytes, path: Path, device: torch.device) -> torch.Tensor:
    """Decode with Pillow as the CPU path does (EXIF rotation, palette, CMYK) -> uint8 ``(3, h, w)`` on ``device``."""
    import numpy as np

    image = decode_bytes(data, path)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).to(device)


def device_path_applies(device: torch.device, views: Sequence[Any], data_config: dict[str, Any],
                        default_decoder: bool, cut: Any) -> bool:
    """True where extraction takes this path: CUDA, the one clean view, the default decoder, pooled features."""
    return (device.type == "cuda" and cut is None and default_decoder and len(views) == 1
            and views[0].description.get("view") == "clean" and supported(data_config))
