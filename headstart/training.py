"""Training orchestration: ``headstart train`` with a frozen backbone, fine-tuning or an ensemble.

:func:`train` checks the configuration, loads and splits the data and creates the backbone, then
hands over to one branch: a head on cached (optionally augmented) pooled features
(:mod:`headstart.train_frozen`), fine-tuning of the top stages (:mod:`headstart.train_finetuned`),
or several members assembled into one ensemble run (:mod:`headstart.train_ensemble`).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import distributed
from ._constants import ENGINES, SELECT_MODES
from ._validation import (
    check_batch_size,
    check_choice,
    check_head_type,
    check_num_workers,
    check_out_outside_data,
    check_positive_int,
    check_precision,
    check_preset,
    check_seed,
    check_weights,
)
from .augmented import DEFAULT_AUG_VIEWS, check_overrides
from .backbones import DEFAULT_BACKBONE, Backbone, check_backbone_name, create_backbone
from .cache import FeatureCache
from .data import LoadedData, load_images, max_pixels
from .errors import UsageError
from .finetune import parse_freeze
from .heads import make_head
from .runs import EnsembleRun, Run
from .selection import Grid
from .train_common import HeldOut, TrainData, log, split_train_val
from .train_ensemble import train_ensemble
from .train_finetuned import train_finetuned
from .train_frozen import train_frozen


@dataclass
class TrainConfig:
    """Everything that configures ``headstart train``; the CLI fills the same fields."""

    backbone: str = DEFAULT_BACKBONE  # timm model name
    weights: str = "default"  # "default" (packaged or timm download), "random", or a file path
    select: str = "cv"  # "cv": choose the head by k-fold CV over a grid, refit on all; "none": one fixed head
    head: str | None = None  # "linear" or "mlp"; None = both (select cv) or linear (select none)
    head_params: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the head (select none)
    grid: dict[str, Any] = field(default_factory=dict)  # narrow the selection grid, e.g. {"C": [0.1, 1]}
    val_split: float = 0.0  # fraction held out per class when the data has no val/ folder (scored, never selects)
    cv: int | None = None  # folds: of the selection (None = 5), or with select none a CV report (None = off)
    seed: int = 0  # seed of the split, the folds and the head
    precision: str = "auto"  # backbone arithmetic: auto, fp32, bf16, fp16
    engine: str = "auto"  # what runs the frozen backbone's forward: auto, torch, openvino (headstart.engines)
    batch_size: int = 32  # images per backbone forward
    num_workers: int | None = None  # decoding processes; None = one per spare core
    cache_dir: str | None = None  # feature cache; None = $HEADSTART_CACHE_DIR or the user cache
    augment: str = "none"  # augmentation preset for the augmented feature cache: none, light, standard, heavy
    aug_views: int | None = None  # augmented views cached per training image; None = 8 when augment is set
    aug_params: dict[str, Any] = field(default_factory=dict)  # overrides, e.g. {"affine": {"degrees": 20}}
    freeze: str = "all"  # "all" (head only), "none", "auto", "probe", or N = freeze the first N stages
    budget: float | None = None  # minutes for --freeze auto's comparison and retraining (None: 10)
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields (epochs, lr, ...)
    resume: bool = False  # continue an interrupted fine-tuning run from its last checkpoint
    ensemble: int = 1  # members per backbone (they differ in bootstrap sample and seed); backbone may be "a,b,c"
    bootstrap: int | None = None  # train on a stratified bootstrap sample of the training split, with this seed


def train(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
    **overrides: Any,
) -> Run | EnsembleRun | None:
    """Train a classifier head on a frozen pre-trained backbone and save the run to ``out``.

    Args:
        data: class-folder tree, ``train/``+``val/`` tree, or CSV manifest (see :func:`load_images`).
        out: run folder to write (replaced if it holds a previous run).
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields.
        progress: progress bars and messages on stderr.

    Returns:
        The saved :class:`Run` (an :class:`EnsembleRun` with several members); ``run.metrics`` holds
        validation (and CV) metrics. Under ``torchrun`` (:mod:`headstart.distributed`) the ranks share the
        features and the fine-tuning; rank 0 writes and returns the run, the others return None.
    """
    config = config or TrainConfig()
    unknown = set(overrides) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        known = sorted(TrainConfig.__dataclass_fields__)
        raise UsageError(f"unknown train option(s) {sorted(unknown)}; known: {known}")
    config = TrainConfig(**{**asdict(config), **overrides})
    config.weights = _absolute_weights(config.weights)  # a run must find its weights from any folder
    config.cache_dir = None if config.cache_dir is None else str(config.cache_dir)
    check_out_outside_data(data, Path(out))
    with distributed.session():  # under torchrun (the CLI has joined already; from Python it joins here)
        progress = progress and distributed.is_main()  # rank 0 alone reports
        _check_distributed(config)
        if "," in config.backbone or config.ensemble > 1:
            _validate_train_config(config, Path(out))  # fail on bad settings before any heavy work
            return train_ensemble(config, data, Path(out), progress, train_member=_train_single)
        return _train_single(config, data, Path(out), progress)[0]


def _check_distributed(config: TrainConfig) -> None:
    """Under torchrun: a head (``--freeze all``) or one fine-tuned model (``--freeze none`` or N)."""
    if not distributed.active():
        return
    if "," in config.backbone or config.ensemble > 1 or str(config.freeze) in ("auto", "probe"):
        raise UsageError(f"under torchrun, train takes --freeze all, none or N with one backbone; got --freeze "
                         f"{config.freeze}, backbone '{config.backbone}', --ensemble {config.ensemble}. Run "
                         "ensembles, --freeze auto and probe as one process (headstart train ...)")


def _train_single(config: TrainConfig, data: Any, out: Path, progress: bool) -> tuple[Run | None, HeldOut | None]:
    """One run (not an ensemble) saved to ``out``, and its probabilities on the validation images."""
    _validate_train_config(config, out)  # fail on bad settings before any heavy work
    start = time.perf_counter()
    loaded: LoadedData = load_images(data, val_split=0, seed=config.seed)
    for note in loaded.notes:
        log(progress, f"note: {note}")
    _check_cv_fits(config, loaded.train.labels)  # the split can only take images away: refused from the listing
    with FeatureCache(config.cache_dir) as cache:
        bb = _backbone(config, cache, progress)  # before the files are read: a bad name, file or depth fails here
        train_set, val_set, val_from, leaks = split_train_val(loaded, config, cache, progress)
        if config.bootstrap is not None:
            from .ensemble import bootstrap_indices

            train_set = train_set.subset(bootstrap_indices(train_set.labels, config.bootstrap))
        sets = TrainData(data, loaded, train_set, val_set, val_from, leaks)
        _check_cv_fits(config, train_set.labels)
        freeze, config, auto = _choose_freeze(config, bb, sets, cache, out, progress)
        if freeze != "all":
            return train_finetuned(config, sets, bb, cache, 0 if freeze == "none" else int(freeze), out, progress,
                                   start, auto)
        return train_frozen(config, sets, bb, cache, out, progress, start, auto)


def _backbone(config: TrainConfig, cache: FeatureCache, progress: bool) -> Backbone:
    """The backbone of ``config``, checked against the settings that need it: ``--freeze N`` (its stages) and
    ``--aug-param`` (the pipeline at its input size). Cached weights are not loaded until a forward needs them."""
    bb = create_backbone(config.backbone, config.weights, memo=cache)
    bb.engine = config.engine
    log(progress, f"backbone {bb.name} ({bb.weights_source}), features {bb.num_features}-d, "
                  f"input {bb.data_config['input_size'][1]}px")
    freeze = parse_freeze(config.freeze)
    if isinstance(freeze, int):
        from .finetune import check_freeze_depth

        check_freeze_depth(bb, freeze)
    check_overrides(config.augment, config.aug_params, bb.data_config["input_size"][1:])  # at the real size
    return bb


def _choose_freeze(config: TrainConfig, bb: Backbone, data: TrainData, cache: FeatureCache, out: Path,
                   progress: bool) -> tuple[str | int, TrainConfig, dict[str, Any] | None]:
    """The depth to freeze (``all``, ``none`` or N stages), resolving ``auto`` and ``probe``; the config to train."""
    freeze = parse_freeze(config.freeze)
    auto = None
    if freeze == "auto":
        freeze, config, auto = _auto_freeze(config, bb, data, cache, out, progress)
    if freeze == "probe":
        from .probe import format_probe_table, probe

        freeze, reason, probe_rows = probe(bb, data.train, data.val, cache, precision=config.precision,
                                           num_workers=config.num_workers, progress=progress)
        log(progress, "probe: a linear head on each stage's pooled output\n" + format_probe_table(probe_rows))
        log(progress, f"--freeze probe: {reason}")
    return freeze, config, auto


def _auto_freeze(config: TrainConfig, bb: Backbone, data: TrainData, cache: FeatureCache, out: Path,
                 progress: bool) -> tuple[str | int, TrainConfig, dict[str, Any]]:
    """``--freeze auto``: the depth chosen on a held-out fold, and the config to retrain it on every image."""
    from .finetune import cleanup
    from .freeze_auto import auto_freeze, format_table

    work_dir = out.parent / f".{out.name}.auto"
    try:
        choice = auto_freeze(bb, data.train, data.val, cache, config=config, work_dir=work_dir,
                             budget_minutes=config.budget, progress=progress, log=lambda m: log(progress, m))
    finally:
        cleanup(work_dir)
    chosen = next(t for t in choice.trials if t.freeze == choice.freeze and not t.skipped)
    log(progress, "--freeze auto: held-out comparison (* = chosen)\n" + format_table(choice.trials, chosen))
    for note in choice.notes:
        log(progress, f"note: {note}")
    log(progress, f"--freeze auto: {choice.reason}; retraining it on all {len(data.train)} training images")
    if choice.freeze == "all":
        return "all", config, choice.report()
    finetune = {**config.finetune, "epochs": choice.epochs}
    config = replace(config, augment=choice.augment, aug_views=choice.aug_views, finetune=finetune)
    return choice.freeze, config, choice.report()


def _absolute_weights(weights: Any) -> str:
    weights = str(weights)
    if weights in ("default", "random"):
        return weights
    return str(Path(weights).resolve())


def _check_cv_fits(config: TrainConfig, labels: np.ndarray) -> None:
    """``--select none --cv K`` on a class of fewer than K images: refused before any feature is computed
    (first from the listing, then from the training split)."""
    counts = np.bincount(labels) if len(labels) else np.zeros(1, dtype=np.int64)
    smallest = int(counts[counts > 0].min()) if (counts > 0).any() else 0
    if config.select == "none" and config.cv and smallest < config.cv:
        raise UsageError(f"--cv {config.cv} needs at least {config.cv} images in every class (the smallest has "
                         f"{smallest}); lower --cv to {max(2, smallest)} or less, or add images")


def _validate_train_config(config: TrainConfig, out: Path) -> None:
    """Refuse bad or contradictory settings (and an ``out`` that is not a run) before any heavy work."""
    from .runs import check_out_folder

    _check_head_options(config)
    _check_input_options(config)
    _check_freeze_options(config)
    check_positive_int(config.ensemble, "ensemble (members per backbone)")
    check_choice(config.engine, ENGINES, "engine")
    check_precision(config.precision, "precision (--precision)")
    check_weights(config.weights)
    max_pixels()  # $HEADSTART_MAX_PIXELS, read by every decode
    check_seed(config.seed)
    if config.select == "none" and config.cv and ("," in config.backbone or config.ensemble > 1):
        raise UsageError("--cv reports one model's cross-validated accuracy; drop it for ensembles "
                         "(they report validation accuracy)")
    if "," in config.backbone:
        for name in (b.strip() for b in config.backbone.split(",")):
            if name:
                check_backbone_name(name)
    if config.cv is not None and not (isinstance(config.cv, int) and (config.cv == 0 or config.cv >= 2)):
        raise UsageError(f"cv (--cv) must be at least 2 folds (or 0 = off with --select none); got {config.cv!r}")
    if config.select == "cv" and config.cv == 0:
        raise UsageError("--cv 0 turns cross-validation off, which the selection needs; use --select none "
                         "to train one fixed head")
    check_out_folder(out)


def _check_head_options(config: TrainConfig) -> None:
    if config.select not in SELECT_MODES:
        raise UsageError(f"select must be 'cv' (choose the head by cross-validation) or 'none' (one fixed head); "
                         f"got '{config.select}'")
    if config.head is not None:
        check_head_type(config.head)
    make_head(config.head or "linear", **config.head_params).validate_params()
    if config.select == "cv":
        _check_selection_options(config)
    elif config.grid:
        raise UsageError(f"grid options {sorted(config.grid)} need --select cv; drop them or --select none")


def _check_input_options(config: TrainConfig) -> None:
    """Batches, workers, the validation split and augmentation (sets the default ``aug_views``)."""
    check_batch_size(config.batch_size)
    check_num_workers(config.num_workers)
    if not 0.0 <= config.val_split < 1.0:
        raise UsageError(f"val_split must be in [0, 1); got {config.val_split}. Use e.g. 0.2 to hold out 20%")
    if config.augment == "none" and config.aug_views:
        raise UsageError(f"aug_views={config.aug_views} needs an augmentation preset; add e.g. --augment standard")
    if config.augment == "none" and config.aug_params and config.freeze != "auto":
        raise UsageError(f"aug_params (--aug-param) {sorted(config.aug_params)} change an augmentation preset, but "
                         "there is none; add e.g. --augment standard or drop them")
    if config.augment != "none":
        check_preset(config.augment)
        if config.aug_views is None:
            config.aug_views = DEFAULT_AUG_VIEWS
        check_positive_int(config.aug_views, "aug_views")
        check_overrides(config.augment, config.aug_params)  # at a nominal size, before the data is listed


def _check_freeze_options(config: TrainConfig) -> None:
    freeze = parse_freeze(config.freeze)
    if freeze != "all":
        from .finetune import FinetuneConfig

        unknown = set(config.finetune) - set(FinetuneConfig.__dataclass_fields__)
        if unknown:
            raise UsageError(f"unknown fine-tuning option(s) {sorted(unknown)}; known: "
                             f"{sorted(FinetuneConfig.__dataclass_fields__)}")
        FinetuneConfig(**config.finetune).validate()
        if config.cv and freeze != "auto":
            raise UsageError("--cv works with --freeze all or auto (a head on frozen features); fine-tuning "
                             "reports validation accuracy")
        if config.grid and freeze != "auto":
            raise UsageError("--grid-* options choose a head on frozen features; they do not apply to fine-tuning")
    if config.budget is not None and (freeze != "auto" or not isinstance(config.budget, (int, float))
                                      or not config.budget > 0):
        raise UsageError(f"budget (minutes > 0) limits --freeze auto's comparison; got {config.budget!r} with "
                         f"--freeze {config.freeze}")


def _check_selection_options(config: TrainConfig) -> None:
    """With ``select='cv'`` the grid sets the head's parameters; a fixed one is a contradiction."""
    fixed = sorted(set(config.head_params) - {"class_weight", "seed"})
    if fixed:
        flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
        raise UsageError(f"{flags} fix(es) the head, but the head is chosen by cross-validation (--select cv); "
                         "use --select none to train exactly that head, or narrow the search with --grid-C / "
                         "--grid-mlp")
    if config.head_params.get("class_weight") not in (None, "balanced"):
        raise UsageError("a class_weight dict fixes the head; with selection only 'balanced' narrows the grid. "
                         "Use select='none' to train with those weights")
    if config.head_params.get("seed", config.seed) != config.seed:
        raise UsageError(f"head_params seed {config.head_params['seed']} differs from seed {config.seed}, which "
                         "seeds the selection's heads; set seed= instead")
    options = dict(config.grid)
    if config.head is not None:
        options.setdefault("head", [config.head])
    Grid.from_options(options)
