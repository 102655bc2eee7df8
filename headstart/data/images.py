"""Find labelled images: class folders, CSV manifests, and files or folders given for prediction.

Files that are not images, cannot be found or are listed twice are never dropped silently: they
are collected as :class:`BadFile` records (path + reason) that every command reports.
"""

from __future__ import annotations

import csv
import errno
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, DataNotFoundError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)

LAYOUT_HINT = (
    "expected a folder of class folders (ROOT/<class>/<image>), a folder holding train/ and val/ "
    "class trees, or a CSV manifest with the columns path,label"
)


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


def in_class_order(images: ImageSet, names: Sequence[str], source: str, known_by: str, fix: str) -> ImageSet:
    """``images`` with labels re-numbered into ``names`` (e.g. a run's class order).

    Raises:
        DataError: ``images`` has classes ``names`` lacks, naming ``source``, ``known_by`` and ``fix``.
    """
    unknown = sorted(set(images.class_names) - set(names))
    if unknown:
        raise DataError(f"'{source}' has class(es) {unknown} that {known_by} was not trained on (it knows "
                        f"{list(names)}); {fix}")
    remap = np.asarray([list(names).index(n) for n in images.class_names], dtype=np.int64)
    return ImageSet(list(images.paths), remap[images.labels], list(names))


def require_every_class(labels: np.ndarray, class_names: Sequence[str], bad_files: Sequence[Any]) -> None:
    """Raise :class:`DataError` when a class has no usable training image left, naming a few bad files.

    ``labels`` are those of the usable training images; ``bad_files`` the skipped ones (``BadFile`` records
    or their ``to_dict()``).
    """
    missing = [c for c in range(len(class_names)) if not (labels == c).any()]
    if missing:
        names = [class_names[c] for c in missing]
        pairs = [(b["path"], b["reason"]) if isinstance(b, dict) else (b.path, b.reason) for b in bad_files[:3]]
        examples = "; ".join(f"{path}: {reason}" for path, reason in pairs)
        raise DataError(f"class(es) {names} have no usable training image after skipping {len(bad_files)} bad "
                        f"file(s){', e.g. ' + examples if examples else ''}")


def is_image_file(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "$RECYCLE.BIN", "System Volume Information"})


def ignored(name: str) -> bool:
    """Files and folders skipped by rule: hidden ones (``.DS_Store``, ``._photo.jpg``, ``.git``) and what
    operating systems and zip tools leave behind (``__MACOSX``, ``Thumbs.db``, ``desktop.ini``, ...)."""
    return name.startswith(".") or name in IGNORED_NAMES


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
        dirnames[:] = sorted(d for d in dirnames if not ignored(d))
        found.extend(Path(dirpath) / name for name in sorted(filenames) if not ignored(name))
    return found


def scan_class_folders(root: Path) -> tuple[ImageSet, list[BadFile]]:
    """Read ``root/<class>/<image>`` (class sub-folders are searched recursively)."""
    if not root.is_dir():
        raise DataNotFoundError(f"data folder '{root}' does not exist; {LAYOUT_HINT}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not ignored(p.name))
    runs = [p for p in folders if (p / "run.json").is_file()]  # a headstart run written inside the data
    class_dirs = [p for p in folders if p not in runs]
    bad: list[BadFile] = [
        BadFile(str(p), "not inside a class folder (images must be in ROOT/<class>/)")
        for p in sorted(root.iterdir())
        if p.is_file() and not ignored(p.name) and is_image_file(p)
    ] + [BadFile(str(p), "a headstart run folder, not a class: skipped (keep runs outside the data)") for p in runs]
    paths: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    other_suffixes: set[str] = set()
    n_other = 0
    for class_dir in class_dirs:
        files, dangling = _readable(_walk_files(class_dir))
        bad += dangling
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
            raise DataError(f"'{root}' holds no class folders; {LAYOUT_HINT}")
        raise DataError(f"no images found in the class folders of '{root}'; {LAYOUT_HINT}")
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
        raise DataNotFoundError(f"CSV manifest '{csv_path}' does not exist; {LAYOUT_HINT}")
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
        example = f", e.g. {bad[0].path}: {bad[0].reason}" if bad else ""
        raise DataError(f"CSV manifest '{csv_path}' lists no usable image ({len(bad)} rows skipped{example}); give "
                        "rows path,label with paths relative to the CSV's folder")
    names = sorted({label for _, label in entries.values()})
    index = {name: i for i, name in enumerate(names)}
    paths = [p for p, _ in entries.values()]
    labels = np.asarray([index[label] for _, label in entries.values()], dtype=np.int64)
    return ImageSet(paths, labels, names), bad


def list_image_paths(inputs: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[BadFile]]:
    """Expand files and folders (searched recursively) into image paths, for prediction."""
    paths: list[Path] = []
    bad: list[BadFile] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files, dangling = _readable(_walk_files(p))
            bad += dangling
            for f in files:
                if is_image_file(f):
                    paths.append(f)
                else:
                    bad.append(BadFile(str(f), f"not an image extension ({f.suffix or 'none'})"))
        elif p.is_file():
            paths.append(p)
        else:
            bad.append(BadFile(str(p), _missing_reason(p)))
    if not paths and bad and all(b.reason.startswith(("does not exist", "broken", "a symbolic link loop"))
                                 for b in bad):
        raise DataNotFoundError(f"'{bad[0].path}' {bad[0].reason}; give image files or folders of images")
    return paths, bad


def _readable(files: list[Path]) -> tuple[list[Path], list[BadFile]]:
    """``files`` less the symbolic links that lead nowhere (broken, or a loop): bad files, with their reason."""
    kept: list[Path] = []
    bad: list[BadFile] = []
    for f in files:
        if f.is_symlink() and not f.exists():
            bad.append(BadFile(str(f), _missing_reason(f)))
        else:
            kept.append(f)
    return kept, bad


def _missing_reason(path: Path) -> str:
    """Why a path given on the command line is neither a file nor a folder."""
    if not path.is_symlink():
        return "does not exist"
    try:
        path.resolve(strict=True)
    except RuntimeError:
        return "a symbolic link loop"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        return f"broken symbolic link (to '{os.readlink(path)}', which does not exist)"
    return "not a file or folder"
