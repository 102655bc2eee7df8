"""A saved run: the folder ``train`` writes and ``evaluate``/``predict`` read.

::

    RUN_DIR/
      run.json               class names, backbone + weights digest, preprocessing, config, data summary
      head.safetensors       head tensors (no pickle)
      head.safetensors.json  head type, parameters, classes
      metrics.json           validation / cross-validation metrics
      bad_files.json         files skipped during training, with reasons

The folder is written under a temporary name and renamed into place, so a crash never leaves a
half-written run where a complete one was expected.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RunError
from .heads import LinearHead, MLPHead, load_head

RUN_FORMAT = 1
RUN_FILE = "run.json"
HEAD_FILE = "head.safetensors"


@dataclass
class Run:
    """What a trained run holds. Load one with :meth:`Run.load`."""

    path: Path
    info: dict[str, Any]
    head: LinearHead | MLPHead
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    @property
    def backbone_name(self) -> str:
        return self.info["backbone"]["name"]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Run:
        path = Path(path)
        if not path.is_dir():
            raise RunError(f"run folder '{path}' does not exist; create one with 'headstart train DATA --out {path}'")
        info_path = path / RUN_FILE
        if not info_path.is_file():
            raise RunError(f"'{path}' is not a headstart run: it has no {RUN_FILE}")
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            if info.get("format") != RUN_FORMAT:
                raise RunError(f"run '{path}' has format {info.get('format')}; this headstart reads format "
                               f"{RUN_FORMAT}")
            for key in ("class_names", "backbone", "data_config", "preprocessing"):
                if key not in info:
                    raise RunError(f"run '{path}' is incomplete: {RUN_FILE} lacks '{key}'")
            head = load_head(path / HEAD_FILE)
            metrics_path = path / "metrics.json"
            metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            if isinstance(exc, RunError):
                raise
            raise RunError(f"run '{path}' is damaged ({type(exc).__name__}: {exc}); train it again") from None
        return cls(path, info, head, metrics)


def swap_into_place(staging: Path, out: Path) -> None:
    """Put the complete folder ``staging`` at ``out`` by renames, replacing a previous ``out`` last."""
    if out.exists():
        old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def check_out_folder(out: Path) -> None:
    """Refuse an output folder that exists and holds something other than a headstart run."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RUN_FILE).is_file())):
        raise RunError(f"--out '{out}' exists and is not a headstart run; choose a new folder or remove it")


def write_run(out: Path, info: dict[str, Any], head: LinearHead | MLPHead, metrics: dict[str, Any],
              bad_files: list[dict[str, str]], extra: dict[str, Callable[[Path], Any]] | None = None) -> Path:
    """Write a complete run folder to ``out`` atomically (build aside, then rename into place).

    An existing run at ``out`` is replaced; an existing folder that is not a run and not empty is
    refused, so a typo cannot wipe unrelated files.
    """
    out = Path(out)
    check_out_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    staging.mkdir()
    try:
        head.save(staging / HEAD_FILE)
        for name, writer in (extra or {}).items():  # e.g. fine-tuned backbone weights, per-epoch metrics
            writer(staging / name)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        (staging / "bad_files.json").write_text(json.dumps(bad_files, indent=2), encoding="utf-8")
        (staging / RUN_FILE).write_text(json.dumps({"format": RUN_FORMAT, **info}, indent=2), encoding="utf-8")
        swap_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out
