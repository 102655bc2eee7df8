"""A saved run: the folder ``train`` writes and ``evaluate``/``predict`` read.

::

    RUN_DIR/
      run.json               class names (the head's, in its order), backbone + weights digest, preprocessing,
                             config, data summary, and ``artifacts``: the sha256 and size of every other file
      head.safetensors       head tensors (no pickle)
      head.safetensors.json  head type, parameters, classes
      metrics.json           validation / cross-validation metrics
      bad_files.json         files skipped during training, with reasons
      backbone.safetensors   fine-tuned runs: the tuned backbone's weights
      metrics.jsonl          fine-tuned runs: one line of metrics per epoch

An *ensemble run* is a folder whose ``run.json`` says ``"type": "ensemble"`` and lists member runs
stored inside it (``members/0``, ``members/1`` ...); every member is a complete single run, so
evaluating an ensemble reuses everything a single run does. :func:`load_run` reads either kind.

Both kinds are written by one writer: each file it writes goes through
:func:`~headstart.cache.atomic_write_bytes` (fsync) into a folder with a temporary name (an ensemble's
members are moved or copied in), which is then renamed into place, so a crash never leaves a
half-written run where a complete one was expected.

Loading checks once that the parts agree (:mod:`headstart.artifacts`): the recorded files exist with
their recorded digests (an ensemble records its members' ``run.json``), the head predicts ``run.json``'s
classes in the same order on the backbone's features, and its tensors fit its settings. A run that
disagrees is refused with one :class:`~headstart.errors.RunError` line naming the file; a run written
before digests loads with a warning that it cannot be verified.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import atomic_write_bytes, copy_tree_durable, fsync_dir
from .artifacts import DIGESTS, check_digests, record_digests, recorded_digests, refusal, warn_unverified
from .ensemble import check_compatible
from .errors import HeadFileError, RunError, UsageError
from .heads import LinearHead, MLPHead, load_head

RUN_FORMAT = 1
RUN_FILE = "run.json"
HEAD_FILE = "head.safetensors"
HEAD_SETTINGS = HEAD_FILE + ".json"


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
        """Load the run at ``path``, checking once that its parts agree.

        Every file ``run.json`` records must exist with its recorded size and sha256; the head's classes
        must be ``run.json``'s, in the same order; its tensors must fit its settings and the backbone's
        feature width. A run written before digests were recorded loads with one warning line on stderr
        (the other checks still apply).

        Raises:
            RunError: one line naming the run folder and the file at fault, what was expected and the fix.
        """
        run, verified = cls._load(Path(path))
        if not verified:
            warn_unverified(run.path)
        return run

    @classmethod
    def _load(cls, path: Path, info: dict[str, Any] | None = None) -> tuple[Run, bool]:
        """The run at ``path`` (its ``run.json`` already read: ``info``) and whether its digests were checked."""
        info = _read_info(path) if info is None else info
        _check_single_info(path, info)
        digests = recorded_digests(path, info, _required_files(info))
        head = _checked_head(path, info)
        if digests is not None:
            check_digests(path, digests)
        metrics = _read_json(path, "metrics.json") if (path / "metrics.json").is_file() else {}
        return cls(path, info, head, metrics), digests is not None


def _read_json(folder: Path, name: str) -> Any:
    """The JSON file ``name`` of the run folder ``folder``; a refusal naming it if it cannot be read."""
    try:
        return json.loads((folder / name).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise refusal(folder, f"{name} is damaged (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise refusal(folder, f"{name} is damaged (not valid JSON: {exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise refusal(folder, f"{name} cannot be read ({exc.strerror or exc})") from None


def _read_info(path: Path) -> dict[str, Any]:
    """``run.json`` of the folder ``path``, of this headstart's format."""
    if not path.is_dir():
        raise RunError(f"run folder '{path}' does not exist; create one with 'headstart train DATA --out {path}'")
    if not (path / RUN_FILE).is_file():
        raise RunError(f"'{path}' is not a headstart run: it has no {RUN_FILE}")
    info = _read_json(path, RUN_FILE)
    if not isinstance(info, dict):
        raise refusal(path, f"{RUN_FILE} is damaged (not a JSON object)")
    if info.get("format") != RUN_FORMAT:
        raise RunError(f"run '{path}' has format {info.get('format')}; this headstart reads format {RUN_FORMAT}")
    return info


def _check_single_info(path: Path, info: dict[str, Any]) -> None:
    """Refuse a single run's ``run.json`` that lacks an entry or whose class list is not one."""
    for key in ("class_names", "backbone", "data_config", "preprocessing"):
        if key not in info:
            raise refusal(path, f"{RUN_FILE} is incomplete: it lacks '{key}'")
    names = info["class_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise refusal(path, f"{RUN_FILE}'s 'class_names' is not a list of distinct class names")
    if not isinstance(info["backbone"], dict) or not isinstance(info["backbone"].get("weights"), str):
        raise refusal(path, f"{RUN_FILE}'s 'backbone' lacks its 'weights'")


def _required_files(info: dict[str, Any]) -> list[str]:
    """The files a single run cannot be used without: the head, and fine-tuned weights kept in the run."""
    weights = info["backbone"]["weights"]
    return [HEAD_FILE, HEAD_SETTINGS] + ([weights.removeprefix("run:")] if weights.startswith("run:") else [])


def _checked_head(path: Path, info: dict[str, Any]) -> LinearHead | MLPHead:
    """The run's head, refused unless it predicts the run's classes in order on the backbone's features."""
    try:
        head = load_head(path / HEAD_FILE)
    except HeadFileError as exc:
        raise refusal(path, f"{Path(exc.file).name} {exc.problem}") from None
    classes, names = [str(c) for c in head.classes_], info["class_names"]
    if classes != names:
        how = "in another order" if sorted(classes) == sorted(names) else "other classes"
        raise refusal(path, f"{HEAD_SETTINGS} lists the classes {classes} but {RUN_FILE} lists {names} ({how}: "
                            "the head is from another run, or a file was edited)")
    width = info["backbone"].get("num_features")
    if isinstance(width, int) and head.n_features_in_ != width:
        raise refusal(path, f"{HEAD_FILE} takes {head.n_features_in_} features but {RUN_FILE}'s backbone "
                            f"'{info['backbone'].get('name')}' gives {width} (the head is from another run)")
    return head


def swap_into_place(staging: Path, out: Path) -> None:
    """Put the complete folder ``staging`` at ``out`` by renames, replacing a previous ``out`` last."""
    if out.exists():
        old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(out, old)
        os.replace(staging, out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
        fsync_dir(out.parent)


def check_out_folder(out: Path) -> None:
    """Refuse an output folder that exists and holds something other than a headstart run."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RUN_FILE).is_file())):
        raise RunError(f"--out '{out}' exists and is not a headstart run; choose a new folder or remove it")


@dataclass
class EnsembleRun:
    """Members (complete single runs inside the folder) whose probabilities are averaged."""

    path: Path
    info: dict[str, Any]
    members: list[Run]
    member_weights: list[float]  # one per member, as given (averaging normalises them)

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    @property
    def metrics(self) -> dict[str, Any]:
        return self.info.get("metrics", {})


AnyRun = Run | EnsembleRun


def load_run(path: str | os.PathLike[str]) -> AnyRun:
    """Load a single or an ensemble run, checked as :meth:`Run.load` says.

    An ensemble's ``run.json`` records the digest of each member's ``run.json`` (which records the
    member's files); every member is checked, and must predict the ensemble's classes in its order.
    """
    path = Path(path)
    info = _read_info(path)
    if info.get("type") != "ensemble":
        run, verified = Run._load(path, info)
        if not verified:
            warn_unverified(path)
        return run
    return _load_ensemble(path, info)


def _load_ensemble(path: Path, info: dict[str, Any]) -> EnsembleRun:
    entries = info.get("members")
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and isinstance(e.get("path"), str) for e in entries):
        raise refusal(path, f"{RUN_FILE} lists no members")
    digests = recorded_digests(path, info, [f"{e['path']}/{RUN_FILE}" for e in entries])
    if digests is not None:
        check_digests(path, digests)
    loaded = [Run._load(path / e["path"]) for e in entries]
    for entry, (member, _) in zip(entries, loaded):
        if member.class_names != info.get("class_names"):
            raise refusal(path, f"{entry['path']} predicts the classes {member.class_names} but {RUN_FILE} lists "
                                f"{info.get('class_names')} (a member from another run, or a file was edited)")
    if digests is None or not all(verified for _, verified in loaded):
        warn_unverified(path)
    try:
        weights = [float(e.get("weight", 1.0)) for e in entries]
    except (TypeError, ValueError):
        raise refusal(path, f"{RUN_FILE} gives a member a weight that is not a number") from None
    return EnsembleRun(path, info, [member for member, _ in loaded], weights)


def members_of(run: AnyRun) -> list[Run]:
    """The single runs of ``run``: its members, or the run itself."""
    return run.members if isinstance(run, EnsembleRun) else [run]


# ------------------------------------------------------------------------------------------ writing


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` to fill; on success it replaces ``out`` (renames), on failure it is removed.

    An existing run at ``out`` is replaced; an existing folder that is not a run and not empty is
    refused, so a typo cannot wipe unrelated files.
    """
    check_out_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    staging.mkdir()
    try:
        yield staging
        swap_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2).encode("utf-8"))


def write_run(out: Path, info: dict[str, Any], head: LinearHead | MLPHead, metrics: dict[str, Any],
              bad_files: list[dict[str, str]], extra: dict[str, bytes] | None = None) -> Path:
    """Write a complete single run folder to ``out`` atomically (built aside, then renamed into place).

    ``run.json`` records the sha256 and size of every other file (:func:`~headstart.artifacts.record_digests`).

    Args:
        info: the run's description; its ``class_names`` must be the head's classes, in the head's order.
        extra: more files of the run by name, e.g. fine-tuned backbone weights or per-epoch metrics.
    """
    out = Path(out)
    classes = [str(c) for c in head.classes_]
    if classes != list(info["class_names"]):
        raise RunError(f"cannot write the run '{out}': the head's classes {classes} are not its class_names "
                       f"{info['class_names']} in the same order")
    with _staged(out) as staging:
        head.save(staging / HEAD_FILE)
        for name, data in (extra or {}).items():
            atomic_write_bytes(staging / name, data)
        _write_json(staging / "metrics.json", metrics)
        _write_json(staging / "bad_files.json", bad_files)
        files = [HEAD_FILE, HEAD_SETTINGS, "metrics.json", "bad_files.json", *(extra or {})]
        _write_json(staging / RUN_FILE, {"format": RUN_FORMAT, **info, DIGESTS: record_digests(staging, files)})
    return out


def write_ensemble(out: Path, member_dirs: Sequence[Path], *, member_weights: Sequence[float] | None = None,
                   move: bool = False, extra: dict[str, Any] | None = None) -> EnsembleRun:
    """Assemble the runs in ``member_dirs`` into one ensemble run folder at ``out``.

    An ensemble among them is flattened into its members, which share its weight.
    """
    flat: list[tuple[Run, float]] = []
    for run, w in zip([load_run(d) for d in member_dirs], member_weights or [1.0] * len(member_dirs)):
        if isinstance(run, EnsembleRun):
            total = sum(run.member_weights)  # the inner ensemble as a whole gets weight w
            flat.extend((m, w * mw / total) for m, mw in zip(run.members, run.member_weights))
        else:
            flat.append((run, float(w)))
    return write_ensemble_run(Path(out), [m for m, _ in flat], [w for _, w in flat], move=move, extra=extra)


def write_ensemble_run(out: Path, members: Sequence[Run], member_weights: Sequence[float], *, move: bool = False,
                       extra: dict[str, Any] | None = None) -> EnsembleRun:
    """Write an ensemble run of single runs ``members`` (copied, or moved with ``move``) to ``out``.

    Args:
        extra: more entries of the ensemble's ``run.json``, e.g. ``config`` or ``metrics``.

    Returns:
        The ensemble as written, its members at their new place.
    """
    out = Path(out)
    check_compatible([m.class_names for m in members], [str(m.path) for m in members])
    if any(w < 0 for w in member_weights) or not sum(member_weights) > 0:
        raise UsageError(f"member weights {list(member_weights)} must be >= 0 and not all zero (--member-weights "
                         "or member_weights); e.g. --member-weights=1,1 for an equal average")
    entries = []
    with _staged(out) as staging:
        (staging / "members").mkdir()
        for i, (member, weight) in enumerate(zip(members, member_weights)):
            target = staging / "members" / str(i)
            if move:
                shutil.move(str(member.path), target)
            else:
                copy_tree_durable(member.path, target)
            entries.append({"path": f"members/{i}", "weight": float(weight), "backbone": member.backbone_name,
                            "freeze": member.info["backbone"].get("freeze", "all"),
                            "source": None if move else str(member.path)})
        fsync_dir(staging / "members")  # the moves (renames) and copies are durable before the folder is placed
        digests = record_digests(staging, [f"{e['path']}/{RUN_FILE}" for e in entries])
        info = {"format": RUN_FORMAT, "type": "ensemble", "class_names": members[0].class_names,
                "members": entries, **(extra or {}), DIGESTS: digests}
        _write_json(staging / RUN_FILE, info)
    placed = [Run(out / e["path"], m.info, m.head, m.metrics) for e, m in zip(entries, members)]
    return EnsembleRun(out, json.loads(json.dumps(info)), placed, [e["weight"] for e in entries])


def combine_runs(run_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                 member_weights: Sequence[float] | None = None) -> EnsembleRun:
    """``headstart ensemble RUN_A RUN_B ... --out RUN``: copy existing runs with the same classes into one."""
    if len(run_dirs) < 2:
        raise UsageError("an ensemble needs at least 2 runs")
    if member_weights is not None and len(member_weights) != len(run_dirs):
        raise UsageError(f"{len(member_weights)} member weights for {len(run_dirs)} runs; give one weight per run")
    return write_ensemble(Path(out), [Path(d) for d in run_dirs], member_weights=member_weights)
