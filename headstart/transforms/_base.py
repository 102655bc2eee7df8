"""The base class of every headstart transform, and the checks and conversions they share.

A transform draws all its randomness in :meth:`AugmentTransform.make_params` (from a
``torch.Generator`` when given one) and does the work in one call into :mod:`.functional`, so a
draw can be replayed: ``t(img, params=p)``. Classes subclass ``torchvision.transforms.v2.Transform``
and so sit inside ``v2.Compose``; labels and other non-image inputs pass through untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..errors import UsageError
from .functional import PADDING_MODES
from .plan import WarpPlan

Params = dict[str, Any]


# --------------------------------------------------------------------------------------------- inputs


def is_image(inpt: Any) -> bool:
    """True for what the transforms augment: a PIL image, a plain tensor or a ``tv_tensors.Image``."""
    if isinstance(inpt, PIL.Image.Image):
        return True
    return isinstance(inpt, torch.Tensor) and (type(inpt) is torch.Tensor or isinstance(inpt, tv_tensors.Image))


def to_image_tensor(inpt: Any, where: str = "image") -> torch.Tensor:
    """A PIL image (RGB or L) or uint8 tensor as a plain uint8 tensor ``(C, H, W)`` or ``(N, C, H, W)``.

    PIL images are copied once into a contiguous tensor; tensors are returned as they are (no copy).
    """
    if isinstance(inpt, PIL.Image.Image):
        if inpt.mode not in ("RGB", "L"):
            raise UsageError(f"{where}: PIL images must be RGB or L; got mode '{inpt.mode}'. "
                             "Convert it first with img.convert('RGB')")
        array = np.array(inpt)  # a writable copy; np.asarray would be read-only
        tensor = torch.from_numpy(array)
        return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)  # channels-last view: no 2nd copy
    if isinstance(inpt, torch.Tensor):
        if type(inpt) is not torch.Tensor and not isinstance(inpt, tv_tensors.Image):
            raise UsageError(f"{where}: headstart transforms augment images for classification; got a "
                             f"{type(inpt).__name__}, which they cannot transform. Pass images only")
        if inpt.dtype != torch.uint8 or inpt.ndim not in (3, 4):
            raise UsageError(
                f"{where} must be a uint8 tensor shaped (C, H, W) or (N, C, H, W); got {inpt.dtype} with shape "
                f"{tuple(inpt.shape)}. Apply augmentation before ToDtype/Normalize, or convert with "
                "(x * 255).round().to(torch.uint8)"
            )
        return inpt.as_subclass(torch.Tensor)
    raise UsageError(f"{where} must be a PIL image or a uint8 tensor; got {type(inpt).__name__}")


def restore_type(out: torch.Tensor, like: Any) -> Any:
    """Give ``out`` the type of the input ``like``: PIL for PIL, ``tv_tensors.Image`` for one, else tensor."""
    if isinstance(like, PIL.Image.Image):
        array = out[0].numpy() if out.shape[0] == 1 else out.permute(1, 2, 0).contiguous().numpy()
        return PIL.Image.fromarray(array)
    if isinstance(like, tv_tensors.Image):
        return tv_tensors.wrap(out, like=like)
    return out


def image_dims(inpt: Any) -> tuple[int | None, int, int]:
    """``(batch size or None, height, width)`` of an image input, without converting it."""
    if isinstance(inpt, torch.Tensor) and inpt.ndim in (3, 4):
        shape = inpt.shape
        return (shape[0] if len(shape) == 4 else None), shape[-2], shape[-1]
    if isinstance(inpt, PIL.Image.Image):
        return None, inpt.height, inpt.width
    tensor = to_image_tensor(inpt)  # raises a UsageError for anything but an image
    return (tensor.shape[0] if tensor.ndim == 4 else None), tensor.shape[-2], tensor.shape[-1]


# --------------------------------------------------------------------------------------------- argument checks


def check_size(size: Any, name: str = "size") -> tuple[int, int]:
    """``int`` or ``(height, width)`` -> ``(height, width)`` of positive ints."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if (not isinstance(size, Sequence) or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size)):
        raise UsageError(f"{name} must be a positive int or a (height, width) pair of positive ints; got {size!r}")
    return int(size[0]), int(size[1])


def check_range(value: Any, name: str, *, symmetric: bool = True, low: float = -math.inf,
                high: float = math.inf) -> tuple[float, float]:
    """A number ``v`` (-> ``(-v, v)`` when ``symmetric``) or a ``(min, max)`` pair, inside ``[low, high]``."""
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        if symmetric and value < 0:
            raise UsageError(f"{name} must be >= 0 when given as one number; got {value}")
        pair = (-float(value), float(value)) if symmetric else (float(value), float(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        try:
            pair = (float(value[0]), float(value[1]))
        except (TypeError, ValueError):
            raise UsageError(f"{name} must hold numbers; got {value!r}") from None
    else:
        raise UsageError(f"{name} must be a number or a (min, max) pair; got {value!r}")
    if not pair[0] <= pair[1]:
        raise UsageError(f"{name} must be (min, max) with min <= max; got {value!r}")
    if pair[0] < low or pair[1] > high or not all(math.isfinite(v) for v in pair):
        raise UsageError(f"{name} must lie within [{low}, {high}]; got {value!r}")
    return pair


def check_number(value: Any, name: str, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not low <= value <= high:
        raise UsageError(f"{name} must be a number in [{low}, {high}]; got {value!r}")
    return float(value)


def check_fill(fill: Any) -> int | tuple[int, ...]:
    """A grey level 0..255, or one per channel."""
    values = [fill] if isinstance(fill, (int, np.integer)) and not isinstance(fill, bool) else fill
    if (not isinstance(values, Sequence) or not values
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255 for v in values)):
        raise UsageError(f"fill must be a grey level 0..255 or one per channel, e.g. (124, 116, 104); got {fill!r}")
    return int(values[0]) if len(values) == 1 else tuple(int(v) for v in values)


def check_padding_mode(mode: Any) -> str:
    if mode not in PADDING_MODES:
        raise UsageError(f"padding_mode must be one of {', '.join(PADDING_MODES)}; got {mode!r}")
    return mode


def jsonable(value: Any) -> Any:
    """Tuples -> lists, numpy scalars -> Python numbers, recursively (configs are JSON)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------- base class


class AugmentTransform(v2.Transform):
    """A random augmentation: parameters drawn once per image by ``make_params``, work done by a kernel.

    Subclasses implement ``sample(height, width, generator) -> dict`` (one image's draw) and
    ``apply(img, params) -> tensor`` (one ``(C, H, W)`` uint8 image). Geometric subclasses also
    implement ``output_size`` and ``update_plan`` so :class:`~headstart.transforms.AugmentPipeline`
    can fuse them into one resample; colour subclasses implement ``offset`` (grey levels per channel).

    Calling convention: ``t(img, params=None, generator=None)``. A batch ``(N, C, H, W)`` gets one
    draw per image (``params`` is then a list of dicts; a single dict applies to every image).
    All randomness comes from ``generator`` (torch's global RNG when None). Output type follows the
    input: PIL in, PIL out; tensor in, tensor out.
    """

    #: Short name used in configs and in ``build_pipeline(overrides=...)``.
    name: ClassVar[str] = ""
    #: True for transforms that move pixels (fused into one resample by the pipeline).
    geometric: ClassVar[bool] = False

    # ---- subclass hooks
    def sample(self, height: int, width: int, generator: torch.Generator | None) -> Params:
        """Draw the parameters of one image of size ``(height, width)``."""
        return {}

    def apply(self, img: torch.Tensor, params: Params) -> torch.Tensor:
        """Transform one uint8 image ``(C, H, W)`` with drawn ``params``."""
        raise NotImplementedError

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Size of the output for an input of ``size`` (geometric transforms)."""
        return size

    def update_plan(self, plan: WarpPlan, params: Params) -> None:
        """Append this transform's geometry to ``plan`` (geometric transforms)."""
        raise NotImplementedError

    def offset(self, params: Params) -> torch.Tensor:
        """Per-channel additive offset in grey levels (colour transforms)."""
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        """Every hyperparameter, JSON-serialisable, with ``name``; ``type(t)(**cfg minus name)`` rebuilds it."""
        raise NotImplementedError

    # ---- shared machinery
    def make_params(self, flat_inputs: Any, generator: torch.Generator | None = None) -> Params | list[Params]:
        """Draw the parameters for the (first) image in ``flat_inputs``: a dict, or a list for a batch.

        Args:
            flat_inputs: an image, or a list of inputs whose first image is used (torchvision's hook).
            generator: source of all randomness; torch's global RNG when None.
        """
        inpt = flat_inputs
        if isinstance(flat_inputs, (list, tuple)):
            inpt = next((x for x in flat_inputs if is_image(x)), None)
            if inpt is None:
                raise UsageError(f"{type(self).__name__}: no image among the inputs")
        n, height, width = image_dims(inpt)
        if n is None:
            return self.sample(height, width, generator)
        return [self.sample(height, width, generator) for _ in range(n)]

    def forward(self, *inputs: Any, params: Params | list[Params] | None = None,
                generator: torch.Generator | None = None) -> Any:
        """Augment the image input(s); non-image inputs (labels ...) pass through as in torchvision v2."""
        if len(inputs) == 1 and is_image(inputs[0]):  # the common case, without pytree overhead
            if params is None:
                params = self.make_params(inputs[0], generator)
            return self.transform(inputs[0], params)
        flat, spec = tree_flatten(inputs if len(inputs) > 1 else inputs[0])
        needs = self._needs_transform_list(flat)
        chosen = [x for x, need in zip(flat, needs) if need]
        if params is None:
            params = self.make_params(chosen, generator)
        return tree_unflatten([self.transform(x, params) if need else x for x, need in zip(flat, needs)], spec)

    def transform(self, inpt: Any, params: Params | list[Params]) -> Any:
        """torchvision's hook: transform one input with drawn ``params``."""
        if type(inpt) is torch.Tensor and inpt.dtype == torch.uint8 and inpt.ndim == 3 and type(params) is dict:
            return self.apply(inpt, params)  # the hot path: one plain image
        return restore_type(self._apply_any(to_image_tensor(inpt, type(self).__name__), params), inpt)

    def _apply_any(self, img: torch.Tensor, params: Params | list[Params]) -> torch.Tensor:
        if img.ndim == 3:
            if not isinstance(params, dict):
                raise UsageError(f"{type(self).__name__}: params for one image must be a dict; got "
                                 f"{type(params).__name__}. Index the batch's list of params")
            return self.apply(img, params)
        per_image = [params] * img.shape[0] if isinstance(params, dict) else list(params)
        if len(per_image) != img.shape[0]:
            raise UsageError(f"{type(self).__name__}: got {len(per_image)} sets of params for a batch of "
                             f"{img.shape[0]} images")
        return torch.stack([self.apply(x, p) for x, p in zip(img, per_image)])

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k not in ("name", "stats"))


class GeometricTransform(AugmentTransform):
    """A transform that moves pixels; it renders its own map with ``fill``/``padding_mode`` when alone."""

    geometric: ClassVar[bool] = True

    def __init__(self, fill: int | Sequence[int] = 0, padding_mode: str = "constant") -> None:
        super().__init__()
        self.fill = check_fill(fill)
        self.padding_mode = check_padding_mode(padding_mode)

    def apply(self, img: torch.Tensor, params: Params) -> torch.Tensor:
        plan = WarpPlan(img.shape[-2:])
        self.update_plan(plan, params)
        return plan.render(img, fill=self.fill, padding_mode=self.padding_mode)

    def _padding_config(self) -> dict[str, Any]:
        return {"fill": jsonable(self.fill), "padding_mode": self.padding_mode}
