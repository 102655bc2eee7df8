"""The backbone's own preprocessing, shared by extraction, evaluation, prediction and TTA.

Everything comes from the model's data config (timm ``resolve_data_config``): input size,
resize interpolation, crop fraction and mode, mean and std. Nothing is an ImageNet constant.
The exact settings, with the numeric precision the backbone runs in, form the *preprocessing
signature* that is part of every feature-cache key.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

import torch

from ._constants import PRECISIONS

#: Bump when the resize/crop code path changes in a way that changes pixel values.
PREPROCESS_VERSION = "timm-pil-1"


def eval_transform(data_config: dict[str, Any]):
    """PIL RGB image -> normalised float tensor ``(3, H, W)``: resize, centre crop, normalise."""
    import timm.data

    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_config.items()}
    return timm.data.create_transform(**cfg, is_training=False)


def resize_size(data_config: dict[str, Any], scale: float = 1.0) -> tuple[int, int]:
    """``(height, width)`` the eval transform resizes to before its crop: ``floor(S / crop_pct)``.

    In timm's ``center`` mode the shorter side becomes this (the longer one is larger), in ``squash``
    mode the whole image, in ``border`` mode the longer side; so an image at least this large on both
    sides is only ever shrunk. ``scale`` multiplies it (TTA ``multiscale``), never below the crop.
    """
    crop_pct = data_config.get("crop_pct") or 0.875  # timm's default when the config has none
    crop = tuple(int(s) for s in data_config["input_size"][1:])
    size = tuple(math.floor(s / crop_pct) for s in crop)
    if scale != 1.0:
        size = tuple(max(c, round(s * scale)) for s, c in zip(size, crop))
    return size  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU has AMX (or AVX512-BF16) units that make bf16 inference fast."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        capability = ""
    if "AMX" in capability.upper():
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``auto`` into the precision used on ``device``: bf16 on AMX CPUs and CUDA, else fp32."""
    if precision not in PRECISIONS:
        from .errors import UsageError

        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}; got '{precision}'")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Run the block in ``precision`` (a resolved one): bf16/fp16 autocast on ``device``, nothing for fp32."""
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


@functools.lru_cache(maxsize=1)
def decoder_id() -> str:
    """Identity of the image decoder: our decode code's version and Pillow's."""
    import PIL

    from .data import DECODE_VERSION

    return f"{DECODE_VERSION}|pillow {PIL.__version__}"


def preprocessing_signature(data_config: dict[str, Any], precision: str) -> dict[str, Any]:
    """Everything about decoding, preprocessing and arithmetic that changes the feature values."""
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    sig = {k: (list(data_config[k]) if isinstance(data_config.get(k), tuple) else data_config.get(k)) for k in keys}
    sig["precision"] = precision
    sig["version"] = PREPROCESS_VERSION
    sig["decoder"] = decoder_id()
    sig["timm"] = _timm_version()  # its resize/crop transforms produce the pixels
    return sig


@functools.lru_cache(maxsize=1)
def _timm_version() -> str:
    from importlib.metadata import version

    return version("timm")
