"""Saved files that must be what they claim: a run's file digests, and the checked reading of a head.

A run's ``run.json`` records, under ``artifacts``, the sha256 and size of every other file of the run
(computed when the run is written), so :meth:`~headstart.runs.Run.load` can refuse a file that was
damaged (zeroed, truncated, bit-flipped), deleted or taken from another run. A head's two files
(safetensors tensors + JSON settings) are read here with every way they can disagree turned into one
:class:`~headstart.errors.HeadFileError` line naming the file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from ._constants import HEAD_TYPES
from ._io import sha256_file
from .errors import HeadFileError, RunError

DIGESTS = "artifacts"  # the key of run.json that holds the digests


def refusal(folder: Path, problem: str) -> RunError:
    """The one-line error of a run folder whose parts do not agree."""
    return RunError(f"run folder '{folder}': {problem}; train it again")


# ------------------------------------------------------------------------------------------ digests


def file_digest(path: Path) -> dict[str, Any]:
    """``{"sha256": hex digest, "bytes": size}`` of the file at ``path``."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def record_digests(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The digest of each file in ``names`` (paths relative to ``folder``, with ``/``), for ``run.json``."""
    return {name: file_digest(folder / name) for name in sorted(names)}


def recorded_digests(folder: Path, info: dict[str, Any], required: Sequence[str]) -> dict[str, Any] | None:
    """The digests ``run.json`` records, or None for a run written before digests were recorded.

    Checks that each digest entry is well-formed, that every file in ``required`` has one and that every
    file recorded exists (missing files are named before anything is read).

    Raises:
        RunError: naming the file and saying "train it again".
    """
    digests = info.get(DIGESTS)
    if digests is None:
        return None
    if not isinstance(digests, dict) or not all(_well_formed(name, entry) for name, entry in digests.items()):
        raise refusal(folder, f"run.json's '{DIGESTS}' entry is malformed (edited by hand?)")
    for name in required:
        if name not in digests:
            raise refusal(folder, f"run.json records no digest for {name} (edited, or parts of another run)")
    for name in digests:
        if not (folder / name).is_file():
            raise refusal(folder, f"{name} is missing (run.json records it)")
    return digests


def _well_formed(name: object, entry: object) -> bool:
    """A relative path inside the run and ``{"sha256": str, "bytes": int}``."""
    if not isinstance(name, str) or not isinstance(entry, dict):
        return False
    parts = PurePosixPath(name).parts
    return (bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts
            and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int))


def check_digests(folder: Path, digests: dict[str, Any]) -> None:
    """Refuse the first file of ``folder`` whose size or sha256 differs from its recorded digest."""
    for name, expected in digests.items():
        actual = file_digest(folder / name)
        if actual["bytes"] != expected["bytes"]:
            raise refusal(folder, f"{name} does not match the digest recorded in run.json: it has {actual['bytes']} "
                                  f"bytes, not {expected['bytes']} (truncated, damaged or from another run)")
        if actual["sha256"] != expected["sha256"]:
            raise refusal(folder, f"{name} does not match the digest recorded in run.json "
                                  "(damaged or from another run)")


def warn_unverified(folder: Path) -> None:
    """One line on stderr: a run written before digests loads, but its files cannot be checked."""
    print(f"warning: run folder '{folder}' was written by an older headstart without file digests, so its "
          "files cannot be verified; train it again to add them", file=sys.stderr)


# ------------------------------------------------------------------------------------------ heads


def read_head_settings(path: Path) -> dict[str, Any]:
    """The JSON settings of a head (``head.safetensors.json``): type, params, classes, n_features_in.

    Raises:
        HeadFileError: missing, not JSON, or a field missing or of the wrong kind.
    """
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HeadFileError(path, "is missing") from None
    except UnicodeDecodeError:
        raise HeadFileError(path, "is not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise HeadFileError(path, f"is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise HeadFileError(path, f"cannot be read ({exc.strerror or exc})") from None
    problem = _settings_problem(meta)
    if problem:
        raise HeadFileError(path, problem)
    return meta


def _settings_problem(meta: Any) -> str | None:
    """What is wrong with a head's settings, or None."""
    if not isinstance(meta, dict):
        return "does not hold a JSON object"
    if meta.get("type") not in HEAD_TYPES:
        return f"has head type {meta.get('type')!r}; expected one of {list(HEAD_TYPES)}"
    if not isinstance(meta.get("params"), dict):
        return "lacks its 'params' object"
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or len({str(c) for c in classes}) != len(classes):
        return "lacks a list of at least 2 distinct 'classes'"
    n = meta.get("n_features_in")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"has 'n_features_in' {n!r}; expected a positive integer"
    return None


def read_head_tensors(path: Path, expected: dict[str, tuple[int, ...]], settings: str) -> dict[str, Any]:
    """The tensors of ``path``, checked against the names and shapes the head's settings need.

    Args:
        expected: name -> shape, from the module the settings build.
        settings: how the settings are named in messages, e.g. ``head.safetensors.json (2 classes, 1280 features)``.

    Raises:
        HeadFileError: missing, not a safetensors file (truncated, zeroed, garbage), other tensors or shapes,
            or values that are not finite.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise HeadFileError(path, "is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())
        raise HeadFileError(path, f"cannot be read as safetensors (truncated or not a head file: {detail})") from None
    if set(tensors) != set(expected):
        raise HeadFileError(path, f"holds tensors {sorted(tensors)} but {settings} needs {sorted(expected)}")
    for name, shape in sorted(expected.items(), key=lambda item: -len(item[1])):  # weight matrices first
        if tuple(tensors[name].shape) != shape:
            raise HeadFileError(path, f"holds '{name}' of shape {tuple(tensors[name].shape)} but {settings} "
                                      f"needs {shape}")
        if tensors[name].is_floating_point() and not bool(torch.isfinite(tensors[name]).all()):
            raise HeadFileError(path, f"holds values that are not finite in '{name}'")
    return tensors
