"""Choices and defaults shared by the library and the command line, in one place.

Standard library only (no torch, numpy or scikit-learn), so ``headstart --help`` and
``headstart --version`` can build the parser without importing the heavy modules. The library
modules re-export these under their historical names (``heads.HEAD_TYPES``, ``tta.TTA_MODES``,
``transforms.PRESETS`` ...); the CLI's ``choices=`` and ``default=`` are these very objects.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------------ choices

HEAD_TYPES: tuple[str, ...] = ("linear", "mlp")  # heads.make_head
SELECT_MODES: tuple[str, ...] = ("cv", "none")  # train(select=...): cross-validated grid or one fixed head
CLASS_WEIGHTS: tuple[str, ...] = ("none", "balanced")  # --class-weight (the library takes None for "none")
AUGMENT_PRESETS: tuple[str, ...] = ("none", "light", "standard", "heavy")  # transforms.build_pipeline
TTA_MODES: tuple[str, ...] = ("none", "flip", "5crop", "10crop", "multiscale")  # tta.tta_crops
TTA_AVERAGES: tuple[str, ...] = ("mean", "geomean")  # inference.average_views
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")  # preprocess.resolve_precision
ENGINES: tuple[str, ...] = ("auto", "torch", "openvino")  # engines.resolve_engine: what runs the forward
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")  # finetune.FinetuneConfig.optimizer
FREEZE_MODES: tuple[str, ...] = ("all", "none", "auto", "probe")  # finetune.parse_freeze (or a number of stages)
FEATURE_SOURCES: tuple[str, ...] = ("pooled", "logits", "pooled+logits")  # sources.check_source

# ----------------------------------------------------------------------------------------- defaults

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
DEFAULT_WEIGHTS = "default"  # packaged offline weights, else a timm download
DEFAULT_BATCH_SIZE = 32  # images per backbone forward
DEFAULT_FOLDS = 5  # folds of the head selection (fewer when a class is smaller)
DEFAULT_CS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # scikit-learn's C: weight decay 1/(C n)
DEFAULT_MLP_WIDTHS: tuple[int, ...] = (64, 256)  # hidden widths of the selection's MLP candidates ...
MLP_MIN_IMAGES = 500  # ... tried from this many training images up (unless asked for)
SELECT_MAX_IMAGES = 3000  # the selection ranks settings on a stratified sample of at most this many images
DEFAULT_MLP_HIDDEN = 512  # hidden width of a fixed MLP head (--select none)
DEFAULT_AUG_VIEWS = 8  # augmented views cached per training image when an augmentation preset is set
DEFAULT_SWEEP_AUGMENT = "standard"  # the sweep's preset when a view count > 0 is asked for without --augment
DEFAULT_BUDGET_MINUTES = 10.0  # --freeze auto: time for the comparison and the retraining
