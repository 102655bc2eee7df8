"""Pure augmentation kernels on uint8 image tensors: the work behind every class in headstart.transforms.

Conventions shared by every kernel:

* Images are ``torch.uint8`` tensors shaped ``(C, H, W)`` or ``(N, C, H, W)``; a kernel applies the
  same parameters to every image of a batch (the classes draw per-image parameters).
* Pixel values and colour offsets are grey levels on the 0..255 scale.
* Coordinates are continuous: an image spans ``[0, W] x [0, H]`` and pixel (row ``i``, column ``j``)
  has its centre at ``(x, y) = (j + 0.5, i + 0.5)``.
* Geometry is a *sampling matrix*: a 3x3 affine map from output coordinates to source coordinates
  (the inverse of the visible motion), optionally followed by a displacement field ``(2, H, W)``
  (x and y, in source pixels). :func:`warp` renders any such map with one resample (bilinear), taking exact
  integer paths for pure crops/flips and torch's antialiased resize for axis-aligned scaling.

Example:
    >>> img = torch.zeros(3, 64, 80, dtype=torch.uint8)
    >>> affine(img, angle=10.0, translate=(0, 0), scale=1.0, shear=(5.0, 0.0)).shape
    torch.Size([3, 64, 80])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError

PADDING_MODES = ("constant", "edge", "symmetric")
_GRID_PADDING = {"constant": "zeros", "edge": "border", "symmetric": "reflection"}
_EPS = 1e-6
#: Shrinking by more than this factor (source pixels per output pixel) first resizes the source with
#: an antialiased filter, so the bilinear resample does not alias.
ANTIALIAS_FACTOR = 1.5


def _check_image(img: torch.Tensor) -> None:
    if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.ndim not in (3, 4):
        got = f"{img.dtype} tensor of shape {tuple(img.shape)}" if isinstance(img, torch.Tensor) else type(img).__name__
        raise UsageError(f"img must be a uint8 tensor shaped (C, H, W) or (N, C, H, W); got a {got}")


def _fill_tensor(fill: int | Sequence[int], channels: int) -> torch.Tensor:
    values = [fill] * channels if isinstance(fill, (int, np.integer)) else list(fill)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise UsageError(f"fill has {len(values)} values but the image has {channels} channels")
    return torch.tensor(values, dtype=torch.float32)


def _near_int(v: float) -> bool:
    return abs(v - round(v)) < _EPS


def _fresh(out: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """``out`` as a new contiguous tensor that shares no memory with ``img``."""
    out = out.contiguous()
    return out.clone() if out.untyped_storage().data_ptr() == img.untyped_storage().data_ptr() else out


def pixel_centres(size: Sequence[int]) -> torch.Tensor:
    """``(2, h, w)`` float32 x and y coordinates of the pixel centres of an image of ``size``."""
    h, w = int(size[0]), int(size[1])
    out = torch.empty(2, h, w)
    out[0] = (torch.arange(w, dtype=torch.float32) + 0.5)[None, :]
    out[1] = (torch.arange(h, dtype=torch.float32) + 0.5)[:, None]
    return out


# --------------------------------------------------------------------------------------------- matrices


def hflip_matrix(width: float) -> np.ndarray:
    """Sampling matrix of a horizontal mirror of an image ``width`` pixels wide."""
    return np.array([[-1.0, 0.0, float(width)], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def crop_matrix(top: float, left: float) -> np.ndarray:
    """Sampling matrix of a crop whose top-left corner is at ``(left, top)`` (may lie outside: padding)."""
    return np.array([[1.0, 0.0, float(left)], [0.0, 1.0, float(top)], [0.0, 0.0, 1.0]])


def resized_crop_matrix(top: float, left: float, height: float, width: float, size: Sequence[int]) -> np.ndarray:
    """Sampling matrix of cropping the box ``(top, left, height, width)`` and resizing it to ``size``."""
    return np.array([[width / size[1], 0.0, float(left)], [0.0, height / size[0], float(top)], [0.0, 0.0, 1.0]])


def center_box(height: int, width: int, size: Sequence[int]) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of the largest centred box of ``size``'s aspect ratio inside ``height x width``."""
    aspect = size[1] / size[0]
    if width / height > aspect:
        w = max(1, min(width, round(height * aspect)))
        return 0, (width - w) // 2, height, w
    h = max(1, min(height, round(width / aspect)))
    return (height - h) // 2, 0, h, width


def affine_matrix(angle: float, translate: Sequence[float], scale: float, shear: Sequence[float],
                  center: Sequence[float]) -> np.ndarray:
    """Sampling matrix of an affine motion about ``center``.

    The visible motion is ``out = center + translate + R(angle) @ Shear @ (scale * (src - center))``
    with ``angle`` in degrees counter-clockwise (as seen on screen), ``shear = (sx, sy)`` degrees
    (``x += tan(sx) * y`` then ``y += tan(sy) * x``) and ``translate`` in pixels.
    """
    a = math.radians(angle)
    rotation = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    shear_x = np.array([[1.0, math.tan(math.radians(shear[0]))], [0.0, 1.0]])
    shear_y = np.array([[1.0, 0.0], [math.tan(math.radians(shear[1])), 1.0]])
    forward = rotation @ shear_x @ shear_y * scale
    inverse = np.linalg.inv(forward)
    c = np.asarray(center, dtype=np.float64)
    m = np.eye(3)
    m[:2, :2] = inverse
    m[:2, 2] = c - inverse @ (c + np.asarray(translate, dtype=np.float64))
    return m


# --------------------------------------------------------------------------------------------- displacement fields


@functools.lru_cache(maxsize=64)
def _bspline_basis(n_out: int, n_spans: int) -> torch.Tensor:
    """``(n_out, n_spans + 3)`` cubic B-spline weights at each pixel centre: >= 0, rows sum to 1."""
    t = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_spans / n_out)
    k = t.floor().clamp(max=n_spans - 1)
    u = t - k
    weights = torch.stack([(1 - u) ** 3, 3 * u**3 - 6 * u**2 + 4, -3 * u**3 + 3 * u**2 + 3 * u + 1, u**3], 1) / 6
    basis = torch.zeros(n_out, n_spans + 3, dtype=torch.float64)
    basis.scatter_(1, k.long()[:, None] + torch.arange(4), weights)
    return basis.float()


def bspline_field(control: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A smooth displacement field from a coarse grid of control displacements (cubic B-spline).

    Every output value is a convex combination of control values, so the field never exceeds the
    largest control displacement: ``|field[..., k]| <= control[k].abs().max()``.

    Args:
        control: ``(2, gh, gw)`` x and y displacements in pixels; ``gh, gw >= 4`` (``g - 3`` spans).
        size: ``(height, width)`` of the field.

    Returns:
        ``(2, height, width)`` float32 field (x then y displacement).
    """
    if control.ndim != 3 or control.shape[0] != 2 or min(control.shape[1:]) < 4:
        raise UsageError(f"control must be shaped (2, gh, gw) with gh, gw >= 4; got {tuple(control.shape)}")
    by = _bspline_basis(int(size[0]), control.shape[1] - 3)
    bx = _bspline_basis(int(size[1]), control.shape[2] - 3)
    return by @ control.float() @ bx.T


def _piecewise_linear(shifts: torch.Tensor, n: int) -> torch.Tensor:
    steps = shifts.numel() + 1
    cell = n / steps
    knots = torch.cat([torch.zeros(1), shifts.double().flatten() * cell, torch.zeros(1)]).double()
    pos = (torch.arange(n, dtype=torch.float64) + 0.5) / cell
    k = pos.floor().clamp(max=steps - 1).long()
    u = pos - k
    return (knots[k] * (1 - u) + knots[k + 1] * u).float()


def grid_distortion_field(x_shifts: torch.Tensor, y_shifts: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The displacement of a grid distortion: interior grid lines moved, linear in between.

    The image is cut into ``len(x_shifts) + 1`` columns and ``len(y_shifts) + 1`` rows of equal cells;
    interior vertical line ``k`` samples the source ``x_shifts[k]`` cells to the right (horizontal
    lines likewise, down), the borders stay put. With ``|shift| < 0.5`` the map keeps pixel order
    (no folds) and moves no pixel more than ``max|shift|`` cells.

    Returns:
        ``(2, height, width)`` float32 field in pixels (x then y displacement).
    """
    h, w = int(size[0]), int(size[1])
    field = torch.empty(2, h, w)
    field[0] = _piecewise_linear(torch.as_tensor(x_shifts), w)[None, :]
    field[1] = _piecewise_linear(torch.as_tensor(y_shifts), h)[:, None]
    return field


# --------------------------------------------------------------------------------------------- the renderer


def warp(img: torch.Tensor, matrix: np.ndarray | Sequence[Sequence[float]], size: Sequence[int],
         displacement: torch.Tensor | None = None, offset: torch.Tensor | Sequence[float] | None = None,
         fill: int | Sequence[int] = 0, padding_mode: str = "constant") -> torch.Tensor:
    """Resample ``img`` through a sampling matrix (and displacement field) into an image of ``size``.

    Output pixel ``p`` takes the bilinear value of the source at ``matrix @ p + displacement[:, p]``.
    Integer crops and flips are copied exactly; axis-aligned scaling uses torch's antialiased resize;
    anything else is one ``grid_sample`` from the part of the source it needs (shrunk first with an
    antialiased resize when it shrinks by more than ``ANTIALIAS_FACTOR``). Values are rounded half up.

    Args:
        img: uint8 ``(C, H, W)`` or ``(N, C, H, W)``.
        matrix: 3x3 (or 2x3) map from output to source coordinates.
        size: ``(height, width)`` of the output.
        displacement: ``(2, height, width)`` x and y source-pixel offsets added after ``matrix``.
        offset: per-channel grey levels added before rounding (colour shift / PCA colour).
        fill: grey level(s) outside the source when ``padding_mode`` is ``"constant"``.
        padding_mode: ``"constant"`` (fill), ``"edge"`` (repeat the border pixel) or ``"symmetric"``
            (mirror, repeating the border pixel).

    Returns:
        uint8 tensor ``(C, h, w)`` or ``(N, C, h, w)``, never sharing memory with ``img``.
    """
    _check_image(img)
    if padding_mode not in PADDING_MODES:
        raise UsageError(f"padding_mode must be one of {', '.join(PADDING_MODES)}; got {padding_mode!r}")
    size = (int(size[0]), int(size[1]))
    rows = np.asarray(matrix, dtype=np.float64)[:2].tolist()
    coef = (*rows[0], *rows[1])  # (a, b, tx, c, d, ty): src_x = a x + b y + tx, src_y = c x + d y + ty
    batch = img if img.ndim == 4 else img[None]
    off = None if offset is None else torch.as_tensor(offset, dtype=torch.float32).flatten()
    if off is not None and off.numel() != batch.shape[1]:
        raise UsageError(f"offset has {off.numel()} values but the image has {batch.shape[1]} channels")
    out = None
    if displacement is None:
        out = _warp_exact(batch, coef, size, fill, padding_mode)
        if out is None:
            out = _warp_resize(batch, coef, size)
        if out is not None and off is not None:
            out = add_channel_offset(out, off)
    if out is None:
        out = _warp_sample(batch, coef, size, displacement, off, fill, padding_mode)
    out = out if img.ndim == 4 else out[0]
    return _fresh(out, img)


def _resolve_index(idx: torch.Tensor, n_src: int, padding_mode: str) -> torch.Tensor:
    """Map out-of-range source indices back inside, as ``padding_mode`` says (edge or symmetric)."""
    if padding_mode == "edge":
        return idx.clamp(0, n_src - 1)
    idx = idx.remainder(2 * n_src)
    return torch.where(idx >= n_src, 2 * n_src - 1 - idx, idx)


def _warp_exact(x: torch.Tensor, coef: tuple[float, ...], size: tuple[int, int], fill, padding_mode: str):
    """Integer translations with optional flips: copy pixels (exact), or None when the map is not one."""
    sx, b, tx, c, sy, ty = coef
    if (abs(b) > _EPS or abs(c) > _EPS or abs(abs(sx) - 1) > _EPS or abs(abs(sy) - 1) > _EPS
            or not _near_int(tx) or not _near_int(ty)):
        return None
    h, w = size
    H, W = x.shape[-2:]
    # the source window [r0, r0 + h) x [c0, c0 + w) that the output copies, mirrored where the scale is -1
    r0 = round(ty) - (h if sy < 0 else 0)
    c0 = round(tx) - (w if sx < 0 else 0)
    flips = [d for d, s in ((-2, sy), (-1, sx)) if s < 0]
    if 0 <= r0 <= H - h and 0 <= c0 <= W - w:
        out = x[..., r0:r0 + h, c0:c0 + w]
    elif padding_mode == "constant":
        out = torch.empty((*x.shape[:-2], h, w), dtype=torch.uint8, device=x.device)
        if isinstance(fill, (int, np.integer)):
            out.fill_(int(fill))
        else:
            out[:] = _fill_tensor(fill, x.shape[-3]).round().to(torch.uint8).view(-1, 1, 1).to(x.device)
        top, bottom, left, right = max(r0, 0), min(r0 + h, H), max(c0, 0), min(c0 + w, W)
        if bottom > top and right > left:
            out[..., top - r0:bottom - r0, left - c0:right - c0] = x[..., top:bottom, left:right]
    else:
        rows = _resolve_index(torch.arange(r0, r0 + h), H, padding_mode).to(x.device)
        cols = _resolve_index(torch.arange(c0, c0 + w), W, padding_mode).to(x.device)
        out = x.index_select(-2, rows).index_select(-1, cols)
    return out.flip(flips) if flips else out


def _warp_resize(x: torch.Tensor, coef: tuple[float, ...], size: tuple[int, int]):
    """Axis-aligned scaling of an integer box inside the source: antialiased resize, or None."""
    sx, b, tx, c, sy, ty = coef
    if abs(b) > _EPS or abs(c) > _EPS:
        return None
    h, w = size
    H, W = x.shape[-2:]
    x0, x1 = sorted((tx, tx + sx * w))
    y0, y1 = sorted((ty, ty + sy * h))
    if not (_near_int(x0) and _near_int(x1) and _near_int(y0) and _near_int(y1)):
        return None
    x0, x1, y0, y1 = round(x0), round(x1), round(y0), round(y1)
    if x0 < 0 or y0 < 0 or x1 > W or y1 > H or x1 <= x0 or y1 <= y0:
        return None
    # torch's uint8 antialiased resize is about twice as fast on a contiguous input as on a slice
    region = x[..., y0:y1, x0:x1].contiguous()
    out = F.interpolate(region, size=size, mode="bilinear", antialias=True, align_corners=False)
    flips = [d for d, s in ((-2, sy), (-1, sx)) if s < 0]
    return out.flip(flips) if flips else out


def _warp_sample(x, coef, size, displacement, offset, fill, padding_mode) -> torch.Tensor:
    """The general path: one bilinear ``grid_sample`` from the needed part of the source."""
    n, ch, H, W = x.shape
    h, w = size
    a, b, tx, c, d, ty = coef
    if displacement is not None and tuple(displacement.shape) != (2, h, w):
        raise UsageError(f"displacement must be shaped (2, {h}, {w}); got {tuple(displacement.shape)}")
    if padding_mode == "symmetric":  # mirrored samples can come from anywhere in the source
        x0, y0, x1, y1 = 0, 0, W, H
    else:  # only the source's bounding box of the samples (+1 pixel) is converted and read
        margin = 1.0 + (float(displacement.abs().max()) if displacement is not None else 0.0)
        xs_c = (tx, a * w + tx, b * h + tx, a * w + b * h + tx)
        ys_c = (ty, c * w + ty, d * h + ty, c * w + d * h + ty)
        x0 = min(max(math.floor(min(xs_c) - margin), 0), W - 1)
        y0 = min(max(math.floor(min(ys_c) - margin), 0), H - 1)
        x1 = max(min(math.ceil(max(xs_c) + margin), W), x0 + 1)
        y1 = max(min(math.ceil(max(ys_c) + margin), H), y0 + 1)
    region = x[..., y0:y1, x0:x1]
    # source pixels per output pixel along x and y: shrink first when that is large
    step_x, step_y = math.hypot(a, b), math.hypot(c, d)
    if step_x > ANTIALIAS_FACTOR or step_y > ANTIALIAS_FACTOR:
        shrunk = (max(1, round((y1 - y0) / max(step_y, 1.0))), max(1, round((x1 - x0) / max(step_x, 1.0))))
        region = F.interpolate(region.contiguous(), size=shrunk, mode="bilinear", antialias=True, align_corners=False)
    src = region.float()
    add = torch.full((ch,), 0.5)  # + 0.5 then truncation rounds half up
    if padding_mode == "constant" and fill != 0:
        fill_values = _fill_tensor(fill, ch)
        if bool(fill_values.any()):  # zero padding + shift = padding with fill
            src = src.sub_(fill_values.view(1, ch, 1, 1).to(src.device))
            add = add + fill_values
    if offset is not None:
        add = add + offset
    device = x.device  # the batched path runs on the training device (e.g. CUDA) when the batch is there
    add = add.to(device)
    # output pixel centres -> the region's normalised coordinates [-1, 1] (align_corners=False)
    kx, ky = 2.0 / (x1 - x0), 2.0 / (y1 - y0)
    xs = torch.arange(w, dtype=torch.float32, device=device) + 0.5
    ys = torch.arange(h, dtype=torch.float32, device=device) + 0.5
    grid = torch.empty(h, w, 2, device=device)
    gx, gy = grid[..., 0], grid[..., 1]
    torch.add((xs * (kx * a))[None, :], (ys * (kx * b) + (kx * (tx - x0) - 1.0))[:, None], out=gx)
    torch.add((xs * (ky * c))[None, :], (ys * (ky * d) + (ky * (ty - y0) - 1.0))[:, None], out=gy)
    if displacement is not None:
        gx.add_(displacement[0].to(device), alpha=kx)
        gy.add_(displacement[1].to(device), alpha=ky)
    out = F.grid_sample(src, grid[None].expand(n, h, w, 2), mode="bilinear",
                        padding_mode=_GRID_PADDING[padding_mode], align_corners=False)
    return out.add_(add.view(1, ch, 1, 1)).clamp_(0.0, 255.0).to(torch.uint8)


# --------------------------------------------------------------------------------------------- per-transform kernels


def hflip(img: torch.Tensor) -> torch.Tensor:
    """Mirror left-right."""
    _check_image(img)
    return img.flip(-1)


def crop(img: torch.Tensor, top: int, left: int, height: int, width: int, fill: int | Sequence[int] = 0,
         padding_mode: str = "constant") -> torch.Tensor:
    """Cut the box ``(top, left, height, width)``; parts outside the image are padded (exact copy)."""
    _check_image(img)
    if padding_mode not in PADDING_MODES:
        raise UsageError(f"padding_mode must be one of {', '.join(PADDING_MODES)}; got {padding_mode!r}")
    out = _warp_exact(img, (1.0, 0.0, float(left), 0.0, 1.0, float(top)), (int(height), int(width)), fill,
                      padding_mode)
    if out is None:  # a fractional corner: resample
        return warp(img, crop_matrix(top, left), (height, width), fill=fill, padding_mode=padding_mode)
    return _fresh(out, img)


def resized_crop(img: torch.Tensor, top: int, left: int, height: int, width: int, size: Sequence[int]) -> torch.Tensor:
    """Cut the box ``(top, left, height, width)`` and resize it to ``size`` (bilinear, antialiased)."""
    return warp(img, resized_crop_matrix(top, left, height, width, size), size, padding_mode="edge")


def resize_center_crop(img: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize so the image covers ``size`` (shorter side first) and cut its centre: the un-augmented view."""
    _check_image(img)
    top, left, h, w = center_box(img.shape[-2], img.shape[-1], size)
    return resized_crop(img, top, left, h, w, size)


def affine(img: torch.Tensor, angle: float, translate: Sequence[float], scale: float, shear: Sequence[float],
           fill: int | Sequence[int] = 0, padding_mode: str = "constant") -> torch.Tensor:
    """Rotate/shear/scale/translate about the image centre (see :func:`affine_matrix`), same output size."""
    _check_image(img)
    h, w = img.shape[-2:]
    return warp(img, affine_matrix(angle, translate, scale, shear, (w / 2, h / 2)), (h, w), fill=fill,
                padding_mode=padding_mode)


def elastic(img: torch.Tensor, control: torch.Tensor, fill: int | Sequence[int] = 0,
            padding_mode: str = "constant") -> torch.Tensor:
    """Smooth local warp from B-spline control displacements ``(2, gh, gw)`` in pixels (see :func:`bspline_field`)."""
    _check_image(img)
    size = img.shape[-2:]
    return warp(img, np.eye(3), size, displacement=bspline_field(control, size), fill=fill, padding_mode=padding_mode)


def grid_distortion(img: torch.Tensor, x_shifts: torch.Tensor, y_shifts: torch.Tensor,
                    fill: int | Sequence[int] = 0, padding_mode: str = "constant") -> torch.Tensor:
    """Move the interior lines of a grid by fractions of a cell (see :func:`grid_distortion_field`)."""
    _check_image(img)
    size = img.shape[-2:]
    field = grid_distortion_field(x_shifts, y_shifts, size)
    return warp(img, np.eye(3), size, displacement=field, fill=fill, padding_mode=padding_mode)


def add_channel_offset(img: torch.Tensor, offset: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Add a grey-level offset per channel (rounded to whole levels) and clamp to 0..255, in integers."""
    _check_image(img)
    off = torch.as_tensor(offset, dtype=torch.float32).flatten()
    channels = img.shape[-3]
    if off.numel() != channels:
        raise UsageError(f"offset has {off.numel()} values but the image has {channels} channels")
    step = off.round().to(torch.int16).view(channels, 1, 1).to(img.device)
    return img.to(torch.int16).add_(step).clamp_(0, 255).to(torch.uint8)


def channel_shift(img: torch.Tensor, shift: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Shift each channel by ``shift[c]`` grey levels (e.g. ``(-10, 0, 15)``: less red, more blue)."""
    return add_channel_offset(img, shift)


def pca_offset(alpha: torch.Tensor | Sequence[float], eigvals: torch.Tensor | Sequence[float],
               eigvecs: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
    """AlexNet's colour offset ``eigvecs @ (alpha * eigvals)``, computed on 0..1 and returned in grey levels.

    ``eigvals`` are variances of RGB values on the 0..1 scale and ``eigvecs``' columns the unit
    eigenvectors, the convention of the widely used ImageNet constants; the result is times 255.
    """
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    vals = torch.as_tensor(eigvals, dtype=torch.float64)
    vecs = torch.as_tensor(eigvecs, dtype=torch.float64)
    return (255.0 * (vecs @ (alpha * vals))).float()


def pca_color(img: torch.Tensor, alpha: torch.Tensor | Sequence[float], eigvals: torch.Tensor | Sequence[float],
              eigvecs: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
    """Add the PCA colour offset of :func:`pca_offset` to an RGB image."""
    return add_channel_offset(img, pca_offset(alpha, eigvals, eigvecs))
