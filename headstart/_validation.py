"""Checks of parameters that several entry points share; each raises :class:`~headstart.errors.UsageError`.

Messages name the parameter (``name``; callers that mirror a CLI flag pass e.g.
``"batch_size (--batch-size)"``), say what was expected and what was got, so the fix is plain.
Integers are Python or NumPy integers, never booleans.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._constants import AUGMENT_PRESETS, HEAD_TYPES, PRECISIONS, TTA_AVERAGES, TTA_MODES
from .errors import UsageError


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_choice(value: Any, choices: Sequence[str], name: str) -> None:
    """``value`` must be one of ``choices``: ``"{name} must be one of a, b; got 'x'"``."""
    if not isinstance(value, str) or value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_head_type(kind: Any, name: str = "head") -> None:
    check_choice(kind, HEAD_TYPES, name)


def check_preset(preset: Any, name: str = "augment") -> None:
    """An augmentation preset name (``none``, ``light``, ``standard``, ``heavy``)."""
    check_choice(preset, AUGMENT_PRESETS, name)


def check_tta_mode(mode: Any, name: str = "tta") -> None:
    check_choice(mode, TTA_MODES, name)


def check_tta_average(method: Any, name: str = "tta_average") -> None:
    check_choice(method, TTA_AVERAGES, name)


def check_precision(precision: Any, name: str = "precision") -> None:
    check_choice(precision, PRECISIONS, name)


def check_positive_int(value: Any, name: str) -> None:
    if not (is_int(value) and value >= 1):
        raise UsageError(f"{name} must be a positive integer; got {value!r}")


def check_batch_size(batch_size: Any, name: str = "batch_size") -> None:
    check_positive_int(batch_size, name)


def check_num_workers(num_workers: Any, name: str = "num_workers") -> None:
    """``None`` (one per spare core) or an integer >= 0 (0 decodes in this process)."""
    if num_workers is not None and not (is_int(num_workers) and num_workers >= 0):
        raise UsageError(f"{name} must be an integer >= 0 (0 decodes in this process); got {num_workers!r}")


def check_seed(seed: Any, name: str = "seed") -> None:
    if not (is_int(seed) and seed >= 0):
        raise UsageError(f"{name} must be an integer >= 0; got {seed!r}")


def check_folds(folds: Any, name: str = "folds") -> None:
    """A number of cross-validation folds: an integer >= 2."""
    if not (is_int(folds) and folds >= 2):
        raise UsageError(f"{name} must be an integer >= 2 (folds of cross-validation); got {folds!r}")


def check_weights(weights: Any, name: str = "weights (--weights)") -> None:
    """``default``, ``random`` or an existing weights file (a .safetensors or .pth state dict)."""
    if isinstance(weights, str) and weights in ("default", "random"):
        return
    if not isinstance(weights, (str, os.PathLike)):
        raise UsageError(f"{name} must be 'default', 'random' or the path of a weights file; got {weights!r}")
    path = Path(weights)
    if path.is_dir():
        raise UsageError(f"{name} '{weights}' is a folder; give a .safetensors or .pth weights file, 'default' or "
                         "'random'")
    if not path.is_file():
        raise UsageError(f"{name} '{weights}' is neither 'default', 'random' nor an existing file; give a "
                         ".safetensors or .pth state dict")


def check_out_outside_data(data: Any, out: Path, what: str = "run") -> None:
    """Refuse an output folder inside the data folder: every later command would read it as a class."""
    if isinstance(data, (str, os.PathLike)) and Path(data).is_dir():
        root, target = Path(data).resolve(), Path(out).resolve()
        if target == root or root in target.parents:
            raise UsageError(f"--out '{out}' is inside the data folder '{data}', where the {what} would be read as a "
                             f"class by every later command; write the {what} outside the data folder")
