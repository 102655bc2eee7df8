"""Find labelled images in a folder or CSV manifest, decode them safely, and split them.

Three layouts are understood (see :func:`load_images`):

* ``ROOT/<class>/<image>`` -- one class folder per class (torchvision's ImageFolder layout);
* ``ROOT/train/<class>/<image>`` plus ``ROOT/val/...`` (or ``valid/``, ``validation/``, ``test/``);
* a CSV manifest with the columns ``path,label`` (paths relative to the CSV's folder).

Files that are not images, cannot be found or cannot be decoded are never dropped silently: they
are collected as :class:`BadFile` records (path + reason) that every command reports.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import DataError, DataNotFoundError, HeadstartError, UsageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)
TRAIN_FOLDER_NAMES: tuple[str, ...] = ("train", "training")
VAL_FOLDER_NAMES: tuple[str, ...] = ("val", "valid", "validation", "test", "testing")

_LAYOUT_HINT = (
    "expected a folder of class folders (ROOT/<class>/<image>), a folder holding train/ and val/ "
    "class trees, or a CSV manifest with the columns path,label"
)


class ImageDecodeError(HeadstartError, OSError):
    """One image file could not be read or decoded.

    ``permanent`` is True when the bytes themselves are not a decodable image (empty, truncated,
    not an image format), so retrying the same bytes with the same decoder cannot succeed.
    """

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


#: Bump when decoding (orientation, mode conversion, compositing) changes pixel values.
DECODE_VERSION = "decode-1"


@dataclass(frozen=True)
class BadFile:
    """A file that was skipped, and why."""

    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class ImageSet:
    """Image paths with integer labels into ``class_names``."""

    paths: list[Path]
    labels: np.ndarray  # int64, one per path
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: Sequence[int] | np.ndarray) -> ImageSet:
        index = np.asarray(index, dtype=np.int64)
        return ImageSet([self.paths[i] for i in index], self.labels[index], list(self.class_names))

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts)}


@dataclass
class LoadedData:
    """What :func:`load_images` found: the training set, an optional validation set, skipped files."""

    train: ImageSet
    val: ImageSet | None
    layout: str  # "class-folders", "train-val", or "csv"
    bad_files: list[BadFile] = field(default_factory=list)
    val_from: str = "none"  # "folder", "split", or "none"
    notes: list[str] = field(default_factory=list)  # things the user should know, e.g. an unused folder


# --------------------------------------------------------------------------------------------- decoding


def decode_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file as an 8-bit RGB PIL image, with its EXIF orientation applied.

    Any mode is converted: palette and alpha images are composited on white, 16-bit and float
    greyscale is rescaled to 8 bits, CMYK is converted by PIL. Only the first frame of an
    animation is used.

    Raises:
        ImageDecodeError: the file is missing, empty, truncated, or not an image PIL can decode.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: file not found") from None
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    return decode_bytes(data, path)


def decode_bytes(data: bytes, path: str | os.PathLike[str] = "<bytes>") -> Image.Image:
    """Decode an encoded image held in memory, as :func:`decode_image` does; ``path`` is for messages."""
    if not data:
        raise ImageDecodeError(f"{path}: empty file (0 bytes)", permanent=True)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{path}: image too large to decode safely ({exc})", permanent=True) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise ImageDecodeError(f"{path}: cannot decode image ({reason})", permanent=True) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.nan_to_num(np.asarray(img, dtype=np.float64))
        low, high = float(array.min()), float(array.max())
        if mode == "F" and low >= 0 and high <= 1:  # float image in [0, 1]
            array = array * 255.0
        elif high > 255 or low < 0:  # a true high-bit-depth image: stretch its range onto 0..255
            scale = 255.0 / (high - low) if high > low else 0.0
            array = (array - low) * scale
        gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------------------------------- finding


def is_image_file(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _walk_files(folder: Path) -> list[Path]:
    """Files below ``folder`` in sorted order; follows symlinked folders but never loops."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / name for name in sorted(filenames) if not name.startswith("."))
    return found


def scan_class_folders(root: Path) -> tuple[ImageSet, list[BadFile]]:
    """Read ``root/<class>/<image>`` (class sub-folders are searched recursively)."""
    if not root.is_dir():
        raise DataNotFoundError(f"data folder '{root}' does not exist; {_LAYOUT_HINT}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    bad: list[BadFile] = [
        BadFile(str(p), "not inside a class folder (images must be in ROOT/<class>/)")
        for p in sorted(root.iterdir())
        if p.is_file() and not p.name.startswith(".") and is_image_file(p)
    ]
    paths: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    other_suffixes: set[str] = set()
    n_other = 0
    for class_dir in class_dirs:
        files = _walk_files(class_dir)
        images = [f for f in files if is_image_file(f)]
        for f in files:
            if not is_image_file(f):
                n_other += 1
                other_suffixes.add(f.suffix.lower() or "(no extension)")
                bad.append(BadFile(str(f), f"not an image extension ({f.suffix or 'none'}); expected one of "
                                           f"{', '.join(sorted(IMAGE_EXTENSIONS))}"))
        if not images:
            continue
        label = len(names)
        names.append(class_dir.name)
        paths.extend(images)
        labels.extend([label] * len(images))
    if not paths:
        if n_other:
            raise DataError(
                f"found {n_other} files under '{root}' but none with an image extension "
                f"(got {', '.join(sorted(other_suffixes))}; expected one of {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        if not class_dirs:
            raise DataError(f"'{root}' holds no class folders; {_LAYOUT_HINT}")
        raise DataError(f"no images found in the class folders of '{root}'; {_LAYOUT_HINT}")
    empty = [d.name for d in class_dirs if d.name not in names]
    if empty:
        raise DataError(
            f"class folder(s) {', '.join(repr(e) for e in empty)} in '{root}' hold no image file; "
            "add images or remove the folder(s)"
        )
    return ImageSet(paths, np.asarray(labels, dtype=np.int64), names), bad


def read_csv_manifest(csv_path: Path) -> tuple[ImageSet, list[BadFile]]:
    """Read a ``path,label`` CSV; paths are relative to the CSV's folder and may not leave it.

    The containment check is lexical (``..`` may not climb out), so a CSV beside a symlinked image
    folder works. Rows without a path or label, with extra fields, naming missing files or repeating
    an earlier row are reported as bad files; one path listed with two labels is an error.
    """
    if not csv_path.is_file():
        raise DataNotFoundError(f"CSV manifest '{csv_path}' does not exist")
    base = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip().lower() for c in (reader.fieldnames or [])]
            missing = [c for c in ("path", "label") if c not in columns]
            if missing:
                raise DataError(
                    f"CSV manifest '{csv_path}' needs the columns 'path' and 'label' in a header row; "
                    f"missing {', '.join(repr(m) for m in missing)}, found {columns or 'no header'}"
                )
            rows = []
            for row in reader:
                extra = row.pop(None, None)  # fields beyond the header, e.g. an unquoted comma
                clean = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
                rows.append((reader.line_num, clean, extra))
    except UnicodeDecodeError as exc:
        raise DataError(f"CSV manifest '{csv_path}' is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                        "save it as UTF-8") from None
    bad: list[BadFile] = []
    entries: dict[str, tuple[Path, str]] = {}
    for line, row, extra in rows:
        rel, label = row.get("path", ""), row.get("label", "")
        where = f"{csv_path}:{line}"
        if extra:
            bad.append(BadFile(where, f"row has {len(extra)} field(s) more than the header; quote paths "
                                      "that contain commas"))
            continue
        if not rel or not label:
            bad.append(BadFile(where, "row without a path or a label"))
            continue
        normal = os.path.normpath(rel)
        if os.path.isabs(rel) or normal == ".." or normal.startswith(".." + os.sep):
            raise DataError(
                f"CSV manifest '{csv_path}' line {line}: path '{rel}' points outside the CSV's folder "
                f"'{base}'; give paths relative to the CSV, below its folder"
            )
        target = base / normal
        if normal in entries:
            if entries[normal][1] != label:
                raise DataError(f"CSV manifest '{csv_path}' line {line}: '{rel}' is listed with two labels, "
                                f"'{entries[normal][1]}' and '{label}'; keep one")
            bad.append(BadFile(where, f"duplicate row for '{rel}' (kept the first)"))
            continue
        if not is_image_file(target):
            bad.append(BadFile(str(target), f"not an image extension ({target.suffix or 'none'})"))
            continue
        if not target.is_file():
            bad.append(BadFile(str(target), "file not found (listed in the CSV)"))
            continue
        entries[normal] = (target, label)
    if not entries:
        raise DataError(f"CSV manifest '{csv_path}' lists no usable image ({len(bad)} rows skipped)")
    names = sorted({label for _, label in entries.values()})
    index = {name: i for i, name in enumerate(names)}
    paths = [p for p, _ in entries.values()]
    labels = np.asarray([index[label] for _, label in entries.values()], dtype=np.int64)
    return ImageSet(paths, labels, names), bad


def _split_folders(root: Path) -> tuple[Path | None, Path | None]:
    """The train and validation folders of ``root``, matched case-insensitively (``Train/``, ``valid/``...)."""
    folders = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    train = next((folders[n] for n in TRAIN_FOLDER_NAMES if n in folders), None)
    val = next((folders[n] for n in VAL_FOLDER_NAMES if n in folders), None)
    return train, val


def _has_class_folders(folder: Path) -> bool:
    return any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())


def stratified_split(labels: np.ndarray, fraction: float, seed: int = 0,
                     groups: Sequence[object] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split indices so each class keeps about ``fraction`` of its images for validation.

    Every class with two or more images (groups) keeps at least one on each side. With ``groups``
    (e.g. content hashes), members of one group always land on the same side, so a duplicated
    image cannot be in both training and validation. The result depends only on the arguments.
    """
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"val_split must be between 0 and 1 (exclusive); got {fraction}")
    labels = np.asarray(labels)
    if groups is None:
        groups = list(range(len(labels)))
    first: dict[object, int] = {}
    for i, g in enumerate(groups):
        first.setdefault(g, i)
    members_of: dict[object, list[int]] = {}
    for i, g in enumerate(groups):
        members_of.setdefault(g, []).append(i)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for label in np.unique(labels):
        heads = np.asarray([i for i in first.values() if labels[i] == label], dtype=np.int64)
        heads = heads[rng.permutation(len(heads))]
        n_val = round(len(heads) * fraction)
        n_val = min(max(n_val, 1), len(heads) - 1) if len(heads) >= 2 else 0
        for rank, head in enumerate(heads):
            (val if rank < n_val else train).extend(members_of[groups[head]])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(val, dtype=np.int64))


def _check_classes(images: ImageSet, where: str, min_classes: int) -> None:
    if len(images.class_names) < min_classes:
        found = f"only '{images.class_names[0]}'" if images.class_names else "none"
        raise DataError(
            f"{where} needs at least {min_classes} classes to train a classifier; found {found}. "
            "Give each class its own folder (ROOT/<class>/<image>) or its own label in the CSV"
        )


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
        raise DataNotFoundError(f"data path '{path}' does not exist; {_LAYOUT_HINT}")
    notes: list[str] = []
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"data path '{path}' is a file but not a .csv manifest; {_LAYOUT_HINT}")
        images, bad = read_csv_manifest(path)
        layout = "csv"
    else:
        train_dir, val_dir = _split_folders(path)
        if train_dir is not None and val_dir is not None and _has_class_folders(val_dir):
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
        if train_dir is not None:
            if val_dir is not None:
                notes.append(f"'{val_dir}' holds no class folders (unlabelled?); it is not used. "
                             f"Validation comes from a split of '{train_dir}'")
            root = train_dir
        else:
            root = path
            if val_dir is not None and _has_class_folders(val_dir) and any(
                    _has_class_folders(p) for p in path.iterdir() if p.is_dir() and p != val_dir):
                raise DataError(f"'{path}' has a '{val_dir.name}/' folder but no 'train/' folder beside it; "
                                "rename the training folder to 'train' or point at a class-folder tree")
        images, bad = scan_class_folders(root)
        layout = "class-folders"
    _check_classes(images, f"'{path}'", min_classes)
    if val_split == 0:
        return LoadedData(images, None, layout, bad, notes=notes)
    train_idx, val_idx = stratified_split(images.labels, val_split, seed, groups=content_groups(images.paths))
    val = images.subset(val_idx) if len(val_idx) else None
    return LoadedData(images.subset(train_idx), val, layout, bad, val_from="split" if val else "none",
                      notes=notes)


def content_groups(paths: Sequence[Path]) -> list[str]:
    """One key per file, equal for byte-identical files (SHA-256 of the bytes; the path if unreadable).

    The split of :func:`load_images` keeps each group on one side, so a duplicated photo cannot be
    both trained on and scored.
    """
    import hashlib

    keys = []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                keys.append(hashlib.sha256(handle.read()).hexdigest())
        except OSError:
            keys.append(f"unreadable:{path}")
    return keys


def list_image_paths(inputs: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[BadFile]]:
    """Expand files and folders (searched recursively) into image paths, for prediction."""
    paths: list[Path] = []
    bad: list[BadFile] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in _walk_files(p):
                if is_image_file(f):
                    paths.append(f)
                else:
                    bad.append(BadFile(str(f), f"not an image extension ({f.suffix or 'none'})"))
        elif p.is_file():
            paths.append(p)
        else:
            raise DataNotFoundError(f"'{p}' does not exist; give image files or folders of images")
    return paths, bad
