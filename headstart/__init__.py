"""headstart: a folder of images -> a strong classifier, by transfer learning from pre-trained networks."""

__version__ = "0.1.0"

from .api import TrainConfig, evaluate, extract, make_ensemble, predict, sweep, train
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
from .inference import EnsembleRun, load_run
from .runs import Run

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
    "extract",
    "extract_features",
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
