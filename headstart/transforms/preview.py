"""A contact sheet of augmented views, to check by eye what a pipeline does to your images."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import PIL.Image
import PIL.ImageOps
import torch

from ..errors import UsageError
from ._base import restore_type, to_image_tensor

_BACKGROUND = (235, 235, 235)


def _tile(image: PIL.Image.Image, tile: int) -> PIL.Image.Image:
    """``image`` shrunk (or grown) to fit a ``tile x tile`` square, centred on the background."""
    fitted = PIL.ImageOps.contain(image.convert("RGB"), (tile, tile), method=PIL.Image.Resampling.BICUBIC)
    canvas = PIL.Image.new("RGB", (tile, tile), _BACKGROUND)
    canvas.paste(fitted, ((tile - fitted.width) // 2, (tile - fitted.height) // 2))
    return canvas


def preview_grid(images: Sequence[PIL.Image.Image | torch.Tensor], pipeline: Callable[..., torch.Tensor],
                 n_views: int = 7, seed: int = 0, tile: int = 160) -> PIL.Image.Image:
    """Show each image next to augmented views of it: two rows of ``n_views`` tiles per image.

    Row 1 holds the original image (fitted into the first tile; the rest of the row is blank), row 2
    holds ``n_views`` views drawn by ``pipeline``. The sheet is ``n_views * tile`` pixels wide and
    ``2 * len(images) * tile`` high. Views are drawn from one generator seeded with ``seed``, so the
    same call gives the same sheet.

    Args:
        images: decoded RGB images (PIL, or uint8 ``(3, H, W)`` tensors).
        pipeline: an :class:`~headstart.transforms.AugmentPipeline` (any callable taking
            ``(img, generator=...)`` and returning a uint8 ``(3, H, W)`` tensor or a PIL image).
        n_views: augmented views per image.
        seed: seed of the views.
        tile: side of each square tile in pixels.

    Returns:
        An RGB PIL image; save it with ``.save("preview.png")``.

    Example:
        >>> from headstart.transforms import build_pipeline
        >>> sheet = preview_grid([PIL.Image.new("RGB", (300, 200))], build_pipeline("heavy"), n_views=4, tile=64)
        >>> sheet.size
        (256, 128)
    """
    images = list(images)
    if not images:
        raise UsageError("preview_grid needs at least one image; got none")
    if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
        raise UsageError(f"n_views must be a positive int; got {n_views!r}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 8:
        raise UsageError(f"tile must be an int of at least 8 pixels; got {tile!r}")
    generator = torch.Generator().manual_seed(int(seed))
    sheet = PIL.Image.new("RGB", (n_views * tile, 2 * len(images) * tile), _BACKGROUND)
    for row, image in enumerate(images):
        tensor = to_image_tensor(image, f"preview image {row}")
        if tensor.ndim != 3:
            raise UsageError(f"preview image {row} must be one image, not a batch of shape {tuple(tensor.shape)}")
        original = image if isinstance(image, PIL.Image.Image) else restore_type(tensor, PIL.Image.new("RGB", (1, 1)))
        sheet.paste(_tile(original, tile), (0, 2 * row * tile))
        for v in range(n_views):
            view = pipeline(tensor, generator=generator)
            if isinstance(view, torch.Tensor):
                view = restore_type(view, original)
            sheet.paste(_tile(view, tile), (v * tile, (2 * row + 1) * tile))
    return sheet
