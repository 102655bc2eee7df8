"""What the training branches share: the data split, augmentation setup, skipped-file messages, run info.

:func:`~headstart.training.train` splits the data (:func:`split_train_val`) and hands a
:class:`TrainData` to the frozen (:mod:`headstart.train_frozen`) or fine-tuning
(:mod:`headstart.train_finetuned`) branch; both describe their run with :func:`run_info` and return
their validation probabilities as :class:`HeldOut`, which an ensemble averages.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .augmented import build_training_pipeline
from .backbones import Backbone
from .cache import FeatureCache
from .data import BadFile, ImageSet, LoadedData, stratified_split
from .features import View, augmented_views, clean_view
from .preprocess import preprocessing_signature

if TYPE_CHECKING:
    from .training import TrainConfig


def log(progress: bool, message: str) -> None:
    """A progress message on stderr (nothing with ``progress=False``)."""
    if progress:
        print(message, file=sys.stderr, flush=True)


@dataclass
class TrainData:
    """The images of one run: what ``train`` was given, what was found, and the training/validation split."""

    source: Any  # the ``data`` argument of ``train``: folder or CSV manifest
    loaded: LoadedData
    train: ImageSet
    val: ImageSet | None
    val_from: str  # "folder", "split" or "none"
    leaks: list[tuple[str, str]] = field(default_factory=list)  # byte-identical (train, val) files of given splits


@dataclass
class HeldOut:
    """A run's class probabilities on its validation images (what an ensemble averages for its own metrics)."""

    proba: np.ndarray  # (n_val, n_classes), columns in the run's class order; rows not in ``ok`` are 0
    ok: np.ndarray  # (n_val,) bool: images that could be used
    labels: np.ndarray  # (n_val,) int labels into the run's class names


def content_keys(cache: FeatureCache, paths: list[Path]) -> list[str]:
    """One key per image, equal for byte-identical files (an unreadable file gets a key of its own)."""
    keys, _ = cache.image_keys(paths)
    return [k if k is not None else f"unreadable:{i}" for i, k in enumerate(keys)]


def split_train_val(loaded: LoadedData, config: TrainConfig, cache: FeatureCache,
                    progress: bool) -> tuple[ImageSet, ImageSet | None, str, list[tuple[str, str]]]:
    """Training and validation sets; a split is stratified and keeps identical files on one side.

    With a given ``val/`` folder, files found byte for byte on both sides are returned as (train, val)
    pairs and warned about: they make the validation score optimistic.
    """
    groups = content_keys(cache, loaded.train.paths)
    labels_of: dict[str, set[int]] = {}
    for g, label in zip(groups, loaded.train.labels):
        labels_of.setdefault(g, set()).add(int(label))
    clashes = [g for g, labels in labels_of.items() if len(labels) > 1]
    if clashes:
        example = [str(p) for p, g in zip(loaded.train.paths, groups) if g == clashes[0]]
        log(progress, f"warning: {len(clashes)} image(s) appear, byte for byte, in more than one class, "
                      f"e.g. {example}")
    if loaded.val is not None:
        return loaded.train, loaded.val, loaded.val_from, _leaks(loaded, groups, cache, progress)
    if config.val_split == 0:
        return loaded.train, None, "none", []
    train_idx, val_idx = stratified_split(loaded.train.labels, config.val_split, config.seed, groups=groups)
    if not len(val_idx):
        return loaded.train, None, "none", []
    return loaded.train.subset(train_idx), loaded.train.subset(val_idx), "split", []


def _leaks(loaded: LoadedData, train_keys: list[str], cache: FeatureCache, progress: bool) -> list[tuple[str, str]]:
    """(train, val) pairs of byte-identical files across the given splits, with one warning line."""
    first = {}
    for path, key in zip(loaded.train.paths, train_keys):
        first.setdefault(key, str(path))
    assert loaded.val is not None
    pairs = [(first[key], str(path)) for path, key in zip(loaded.val.paths, content_keys(cache, loaded.val.paths))
             if key in first]
    if pairs:
        log(progress, f"warning: {len(pairs)} of {len(loaded.val)} validation image(s) are byte-identical copies of "
                      f"training images (the validation score is optimistic), e.g. {pairs[0][1]} = {pairs[0][0]}")
    return pairs


def training_pipeline(config: TrainConfig, bb: Backbone, train_set: ImageSet, cache: FeatureCache,
                      progress: bool) -> Any | None:
    """The augmentation pipeline of ``config.augment`` for ``bb``'s input size (None without augmentation)."""
    if config.augment == "none":
        return None
    return build_training_pipeline(config.augment, bb.data_config["input_size"][1:], config.aug_params,
                                   train_set.paths, cache, seed=config.seed, progress=progress)


def cached_views(config: TrainConfig, bb: Backbone, pipeline: Any | None) -> list[View]:
    """The views cached per training image: the clean one, then ``config.aug_views`` augmented ones."""
    views = [clean_view(bb.data_config)]
    if pipeline is not None:
        views += augmented_views(pipeline, bb.data_config, config.aug_views, seed=config.seed)
    return views


def report_bad_files(progress: bool, bad_files: list[BadFile]) -> list[dict[str, str]]:
    """Say which files were skipped and why; returns them as ``bad_files.json`` lists them."""
    bad = [b.to_dict() for b in bad_files]
    for item in bad:
        log(progress, f"skipped {item['path']}: {item['reason']}")
    return bad


def run_info(config: TrainConfig, data: TrainData, bb: Backbone, metrics: dict[str, Any], n_bad: int, *,
             backbone: dict[str, Any], precision: str, engine: str, pipeline: Any | None,
             **sections: Any) -> dict[str, Any]:
    """The ``run.json`` of a single run (less its format number): classes, backbone, preprocessing, data.

    Args:
        backbone: the ``backbone`` entry (name, weights and their digest, freeze ...).
        precision: the resolved arithmetic of the backbone, part of the preprocessing signature.
        engine: what ran the backbone's forward (``torch`` or ``openvino``); predictions use the same.
        pipeline: the augmentation pipeline, or None.
        sections: more entries, e.g. ``head`` or ``finetune``.
    """
    augmentation = None if pipeline is None else {"pipeline": pipeline.get_config(), "views": config.aug_views,
                                                  "seed": config.seed}
    return {
        "headstart_version": __version__,
        "class_names": list(data.train.class_names),
        "backbone": backbone,
        "preprocessing": {**preprocessing_signature(bb.data_config, precision), "engine": engine},
        "data_config": bb.data_config,
        "config": asdict(config),
        "augmentation": augmentation,
        **sections,
        "data": {"source": str(data.source), "layout": data.loaded.layout, "val_from": data.val_from,
                 "n_train": metrics["n_train"], "n_val": int(metrics.get("val", {}).get("n_images", 0)),
                 "class_counts": data.train.class_counts(), "n_bad_files": n_bad,
                 "identical_in_train_and_val": [list(pair) for pair in data.leaks]},
    }
