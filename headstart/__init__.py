"""headstart: a folder of images -> a strong classifier, by transfer learning from pre-trained networks.

The public names below are imported on first use (PEP 562), so ``import headstart`` and the
``headstart --help`` / ``--version`` commands do not pay for torch, timm and scikit-learn.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("TrainConfig", "evaluate", "export", "extract", "make_ensemble", "predict", "sweep", "train"),
                    "api"),
    **dict.fromkeys(("Backbone", "create_backbone", "list_backbones"), "backbones"),
    "FeatureCache": "cache",
    **dict.fromkeys(("BadFile", "ImageSet", "decode_image", "load_images"), "data"),
    **dict.fromkeys(("DataError", "DataNotFoundError", "HeadstartError", "NotFittedError", "RunError",
                     "UnknownBackboneError", "UsageError", "WeightsError"), "errors"),
    **dict.fromkeys(("FeatureResult", "extract_features"), "features"),
    **dict.fromkeys(("LinearHead", "MLPHead", "load_head", "make_head"), "heads"),
    **dict.fromkeys(("EnsembleRun", "load_run", "Run"), "runs"),
    "inspect": "inspection",
}

__all__ = [
    "Backbone",
    "BadFile",
    "DataError",
    "DataNotFoundError",
    "EnsembleRun",
    "FeatureCache",
    "FeatureResult",
    "HeadstartError",
    "ImageSet",
    "LinearHead",
    "MLPHead",
    "NotFittedError",
    "Run",
    "RunError",
    "TrainConfig",
    "UnknownBackboneError",
    "UsageError",
    "WeightsError",
    "__version__",
    "create_backbone",
    "decode_image",
    "evaluate",
    "export",
    "extract",
    "extract_features",
    "inspect",
    "list_backbones",
    "load_head",
    "load_images",
    "load_run",
    "make_ensemble",
    "make_head",
    "predict",
    "sweep",
    "train",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these on first use
    from .api import TrainConfig, evaluate, export, extract, make_ensemble, predict, sweep, train
    from .backbones import Backbone, create_backbone, list_backbones
    from .cache import FeatureCache
    from .data import BadFile, ImageSet, decode_image, load_images
    from .errors import (
        DataError,
        DataNotFoundError,
        HeadstartError,
        NotFittedError,
        RunError,
        UnknownBackboneError,
        UsageError,
        WeightsError,
    )
    from .features import FeatureResult, extract_features
    from .heads import LinearHead, MLPHead, load_head, make_head
    from .runs import EnsembleRun, Run, load_run


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use; ``headstart.heads`` etc. import that submodule."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Keeps ``headstart.sweep`` the function when the submodule of that name is imported.

    Importing a submodule sets it as an attribute of its package; for ``headstart.sweep`` that would
    hide the API function ``headstart.sweep(...)``. The module stays in ``sys.modules``, so
    ``from headstart.sweep import rank_rows`` works as before.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
