"""Recognise a data layout (class folders, train/ + val/ trees, CSV manifest) and load it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError, DataNotFoundError, UsageError
from .images import LAYOUT_HINT, ImageSet, LoadedData, read_csv_manifest, scan_class_folders
from .split import content_groups, stratified_split

TRAIN_FOLDER_NAMES: tuple[str, ...] = ("train", "training")
VAL_FOLDER_NAMES: tuple[str, ...] = ("val", "valid", "validation", "test", "testing")


def _split_folders(root: Path) -> tuple[Path | None, Path | None]:
    """The train and validation folders of ``root``, matched case-insensitively (``Train/``, ``valid/``...)."""
    folders = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    train = next((folders[n] for n in TRAIN_FOLDER_NAMES if n in folders), None)
    val = next((folders[n] for n in VAL_FOLDER_NAMES if n in folders), None)
    return train, val


def _has_class_folders(folder: Path) -> bool:
    return any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())


def _check_classes(images: ImageSet, where: str, min_classes: int) -> None:
    if len(images.class_names) < min_classes:
        found = f"only '{images.class_names[0]}'" if images.class_names else "none"
        raise DataError(
            f"{where} needs at least {min_classes} classes to train a classifier; found {found}. "
            "Give each class its own folder (ROOT/<class>/<image>) or its own label in the CSV"
        )


def _load_train_val(train_dir: Path, val_dir: Path, min_classes: int) -> LoadedData:
    """A ``train/`` + ``val/`` tree; validation labels are mapped onto the training classes."""
    train, bad = scan_class_folders(train_dir)
    val, bad_val = scan_class_folders(val_dir)
    unknown = sorted(set(val.class_names) - set(train.class_names))
    if unknown:
        raise DataError(
            f"validation folder '{val_dir}' has class(es) {unknown} that '{train_dir}' lacks; "
            "every validation class needs training images"
        )
    remap = np.asarray([train.class_names.index(n) for n in val.class_names], dtype=np.int64)
    val = ImageSet(val.paths, remap[val.labels], list(train.class_names))
    _check_classes(train, f"training folder '{train_dir}'", min_classes)
    return LoadedData(train, val, "train-val", bad + bad_val, val_from="folder")


def _training_root(path: Path, train_dir: Path | None, val_dir: Path | None, notes: list[str]) -> Path:
    """The class-folder tree to read when there is no usable ``val/`` tree (notes what is ignored)."""
    if train_dir is not None:
        if val_dir is not None:
            notes.append(f"'{val_dir}' holds no class folders (unlabelled?); it is not used. "
                         f"Validation comes from a split of '{train_dir}'")
        return train_dir
    if val_dir is not None and _has_class_folders(val_dir) and any(
            _has_class_folders(p) for p in path.iterdir() if p.is_dir() and p != val_dir):
        raise DataError(f"'{path}' has a '{val_dir.name}/' folder but no 'train/' folder beside it; "
                        "rename the training folder to 'train' or point at a class-folder tree")
    return path


def load_images(
    source: str | os.PathLike[str], *, val_split: float = 0.2, seed: int = 0, min_classes: int = 2
) -> LoadedData:
    """Find the labelled images of a folder or CSV manifest and hold out a validation set.

    Args:
        source: a class-folder tree, a folder with ``train/`` and ``val/`` trees (also ``Train/``,
            ``training/``, ``valid/``, ``validation/``, ``test/``), or a ``.csv`` manifest.
        val_split: fraction of each class held out (stratified, seeded, byte-identical files on one
            side) when the data has no validation folder; ``0`` keeps every image for training.
        seed: seed of the split.
        min_classes: fewest classes accepted (2 to train; 1 to evaluate or extract).

    Returns:
        LoadedData with ``train``, ``val`` (``None`` when ``val_split == 0``) and ``bad_files``.

    Example:
        >>> data = load_images("photos/", val_split=0.2)  # doctest: +SKIP
        >>> data.train.class_names
        ['ants', 'bees']
    """
    if not 0.0 <= val_split < 1.0:
        raise UsageError(f"val_split must be in [0, 1); got {val_split}. Use e.g. 0.2 to hold out 20%")
    path = Path(source)
    if not path.exists():
        raise DataNotFoundError(f"data path '{path}' does not exist; {LAYOUT_HINT}")
    notes: list[str] = []
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"data path '{path}' is a file but not a .csv manifest; {LAYOUT_HINT}")
        images, bad = read_csv_manifest(path)
        layout = "csv"
    else:
        train_dir, val_dir = _split_folders(path)
        if train_dir is not None and val_dir is not None and _has_class_folders(val_dir):
            return _load_train_val(train_dir, val_dir, min_classes)
        images, bad = scan_class_folders(_training_root(path, train_dir, val_dir, notes))
        layout = "class-folders"
    _check_classes(images, f"'{path}'", min_classes)
    if val_split == 0:
        return LoadedData(images, None, layout, bad, notes=notes)
    train_idx, val_idx = stratified_split(images.labels, val_split, seed, groups=content_groups(images.paths))
    val = images.subset(val_idx) if len(val_idx) else None
    return LoadedData(images.subset(train_idx), val, layout, bad, val_from="split" if val else "none",
                      notes=notes)
