"""``headstart export``: a run as one file, uint8 images -> class probabilities, verified before it is kept.

The graph (:mod:`headstart.export_graph`) holds the normalisation, every member's backbone and head,
the test-time views and the averaging; resizing and cropping stay outside, done by
:func:`headstart.onnx_input.prepare_image` (Pillow and numpy). ONNX files are written by
``torch.onnx.export``: the dynamo exporter (``torch.export`` + onnxscript) first, the TorchScript-based
exporter when it fails; the batch axis is dynamic (for ``--tta 10crop`` height and width too), the
graph passes ``onnx.checker``, and its metadata holds the classes and the input spec
(:func:`export_metadata`). ``--format torchscript`` traces the same module with ``torch.jit.trace``.

The file is then checked on real images (:mod:`headstart.export_check`) and, with ``--quantize int8``,
quantized and compared with fp32 (:mod:`headstart.quantize`). A file that fails a check is kept for
inspection and the export raises :class:`~headstart.errors.ExportError` with the figures.

Example:
    >>> result = headstart.export("runs/photos", tta="flip")          # doctest: +SKIP
    >>> result["path"], result["verification"]["predict"]["max_abs_diff"]
    ('runs/photos/model.onnx', 0.0012)
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from ._io import atomic_write_bytes
from ._validation import check_batch_size, check_choice, check_num_workers, is_int
from .backbones import sha256_file
from .cache import FeatureCache
from .errors import ExportError, UsageError
from .export_check import check_paths, head_gain, mismatch_message, onnx_runner, quiet, torchscript_runner, verify
from .export_graph import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportedModel,
    build_module,
    check_graph_tta,
    graph_input_spec,
    member_summary,
)
from .runs import AnyRun, load_run
from .train_common import log

FORMATS = ("onnx", "torchscript")
QUANTIZE = ("none", "int8")
EXPORTERS = ("auto", "dynamo", "torchscript")
#: the packages each format needs, with what they are for
NEEDS = {"onnx": ("onnx", "onnxruntime"), "int8": ("onnx", "onnxruntime")}


def export(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    format: str = "onnx",
    tta: str = "none",
    opset: int | None = None,
    exporter: str = "auto",
    quantize: str = "none",
    check_images: Sequence[str | os.PathLike[str]] | None = None,
    data: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Export a run (single or ensemble) to one verified file (``headstart export``).

    Args:
        out: the file to write (default ``RUN/model.onnx``, or ``RUN/model.pt`` for TorchScript).
        format: ``onnx`` or ``torchscript``.
        tta: views averaged inside the graph: ``none``, ``flip``, ``10crop`` (ONNX only; the input is then
            the whole resized image, see :mod:`headstart.onnx_input`).
        opset: ONNX opset (default: the exporter's).
        exporter: ``auto`` (the dynamo exporter, the TorchScript-based one if it fails), ``dynamo`` or
            ``torchscript`` (the older exporter: a few times faster to run, the same graph).
        quantize: ``int8`` also writes ``<out stem>.int8.onnx`` (static quantization calibrated on the
            run's training images) and compares it with fp32 (:func:`headstart.quantize.quantize_int8`).
        check_images: images or folders to verify on (default: a few of the run's own data).
        data: labelled data for the int8 comparison (default: the run's data, its validation part).

    Returns:
        ``{"path", "format", "exporter", "opset", "bytes", "tta", "input", "class_names", "members",
        "verification", "int8" (with ``quantize``), "model_card", "notes", "seconds"}``; the model card
        (:func:`headstart.model_card.write_model_card`) is written next to the file.

    Raises:
        ExportError: a package is missing, the run cannot be one graph, or the file fails a check
            (it is kept; ``error.result`` holds the figures).
    """
    start = time.perf_counter()
    _check_options(format, tta, opset, quantize, batch_size, num_workers)
    check_choice(exporter, EXPORTERS, "exporter")
    run = load_run(run_dir)
    path = Path(out) if out is not None else run.path / ("model.onnx" if format == "onnx" else "model.pt")
    spec = graph_input_spec(run, tta)
    paths = check_paths(run, [str(p) for p in check_images] if check_images else None)
    with FeatureCache(cache_dir) as cache:
        module = build_module(run, tta, cache)
        log(progress, f"exporting {_describe(run)} to {path} ({format}, tta {tta})")
        if format == "onnx":
            written = write_onnx(module, spec, export_metadata(run, spec, tta), path, opset, exporter)
            runner = onnx_runner(path)
        else:
            written = write_torchscript(module, spec, export_metadata(run, spec, tta), path)
            runner = torchscript_runner(path)
        result = {"path": str(path), "format": format, **written, "tta": tta, "input": spec,
                  "class_names": run.class_names, "members": member_summary(run)}
        log(progress, f"checking {path.name} on {len(paths)} images")
        result["verification"] = check = verify(run, runner, module, spec, paths, cache, tta=tta,
                                                batch_size=batch_size, num_workers=num_workers, progress=progress)
        if not check["ok"]:
            raise ExportError(mismatch_message(path, check, written["exporter"], head_gain(run)), result)
        if quantize == "int8":
            from .quantize import quantize_int8

            result["int8"] = quantize_int8(run, path, spec, cache, data=data, progress=progress)
    result["model_card"] = [str(p) for p in write_card(run, path, result)]
    result["seconds"] = round(time.perf_counter() - start, 3)
    if quantize == "int8" and not result["int8"]["ok"]:
        raise ExportError(result["int8"]["message"], result)
    return result


def write_card(run: AnyRun, path: Path, result: dict[str, Any]) -> tuple[Path, Path]:
    """``model_card.md`` and ``model_card.json`` next to the exported file (:mod:`headstart.model_card`), with
    the export's figures (file names and numbers only: no path of this machine)."""
    from .model_card import write_model_card

    check = result["verification"]
    figures = ("n", "max_abs_diff", "tolerance", "top1_agree", "near_ties")
    info = {"file": path.name, "sha256": sha256_file(path), **{k: result[k] for k in (
                "format", "exporter", "opset", "bytes", "tta", "input")},
            "output": f"{OUTPUT_NAME}: float32 N x {len(run.class_names)}, columns in the classes' order",
            "verification": {"n_images": check["n_images"], "precision": check["precision"],
                             "pixels": {f: check["pixels"][f] for f in ("n", "max_abs_diff", "tolerance")},
                             **{k: {f: check[k][f] for f in figures} for k in ("torch", "predict")}}}
    if "int8" in result:
        q = result["int8"]
        info["int8"] = {"file": Path(q["path"]).name, **{k: v for k, v in q.items() if k not in ("path", "message")}}
    return write_model_card(run, path.parent, info)


def _check_options(format: str, tta: str, opset: Any, quantize: str, batch_size: Any, num_workers: Any) -> None:
    """Every option, before the run is read; the packages the format needs."""
    check_choice(format, FORMATS, "format (--format)")
    check_graph_tta(tta)
    check_choice(quantize, QUANTIZE, "quantize (--quantize)")
    check_batch_size(batch_size, "batch_size (--batch-size)")
    check_num_workers(num_workers, "num_workers (--workers)")
    if opset is not None and not (is_int(opset) and 7 <= opset <= 30):
        raise UsageError(f"opset (--opset) must be an ONNX opset number such as 17 or 18; got {opset!r}")
    if format == "torchscript":
        for flag, value, default in (("--opset", opset, None), ("--quantize", quantize, "none"),
                                     ("--tta 10crop", tta if tta == "10crop" else None, None)):
            if value != default:
                raise UsageError(f"{flag} applies to --format onnx only; drop it or use --format onnx")
    missing = [name for name in NEEDS.get(format, ()) + NEEDS.get(quantize, ())
               if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"--format {format}{' --quantize int8' if quantize == 'int8' else ''} needs the "
                          f"package(s) {', '.join(dict.fromkeys(missing))}, which are not installed; "
                          "run: pip install 'headstart[export]'")


def _describe(run: AnyRun) -> str:
    members = member_summary(run)
    names = ", ".join(m["backbone"] + ("" if m["freeze"] == "all" else f" (fine-tuned, freeze {m['freeze']})")
                      for m in members)
    return f"'{run.path}' ({len(members)} members: {names})" if len(members) > 1 else f"'{run.path}' ({names})"


# ------------------------------------------------------------------------------------------ metadata


def export_metadata(run: AnyRun, spec: dict[str, Any], tta: str) -> dict[str, str]:
    """The metadata stored in the file (ONNX ``metadata_props``; TorchScript ``headstart.json``), as strings.

    ``headstart.classes`` (JSON list, the output's columns), ``headstart.input`` (JSON input spec,
    :func:`~headstart.onnx_input.input_spec`), ``headstart.tta``, ``headstart.members`` (JSON: backbone,
    weights and digest, freeze, head, weight), ``headstart.output``, ``headstart.version``,
    ``headstart.run`` (the run folder's name).
    """
    n = len(run.class_names)
    return {"headstart.classes": json.dumps(run.class_names), "headstart.input": json.dumps(spec),
            "headstart.tta": tta, "headstart.members": json.dumps(member_summary(run)),
            "headstart.output": f"{OUTPUT_NAME}: float32 N x {n}, columns in headstart.classes order, rows sum to 1",
            "headstart.version": __version__, "headstart.run": run.path.name}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The headstart metadata of an exported ONNX file, JSON values decoded (``classes``, ``input`` ...)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        if prop.key.startswith("headstart."):
            key = prop.key.removeprefix("headstart.")
            with contextlib.suppress(json.JSONDecodeError):
                out[key] = json.loads(prop.value)
                continue
            out[key] = prop.value
    return out


# ------------------------------------------------------------------------------------------ writing


def example_input(spec: dict[str, Any], batch: int = 2) -> torch.Tensor:
    """A random uint8 batch of the graph's input shape (10crop: a landscape resized image)."""
    h, w = spec["size"] if spec["crop"] else (spec["resize"][0], spec["resize"][1] + 37)
    return torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def write_onnx(module: ExportedModel, spec: dict[str, Any], metadata: dict[str, str], out: Path,
               opset: int | None = None, exporter: str = "auto") -> dict[str, Any]:
    """Export ``module`` to ONNX at ``out`` (one file, atomically), checked by ``onnx.checker``.

    Args:
        exporter: ``auto`` (dynamo, then the TorchScript-based exporter if it fails), ``dynamo``, ``torchscript``.

    Returns:
        ``{"exporter": "dynamo" | "torchscript", "opset", "bytes", "notes"}``.
    """
    import onnx

    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "model.onnx"
        used = "torchscript" if exporter == "torchscript" else "dynamo"
        if used == "dynamo":
            try:
                _export_dynamo(module, spec, target, opset)
            except Exception as exc:  # the exporter's own failure: the older exporter usually copes
                if exporter == "dynamo":
                    raise ExportError(f"the dynamo exporter failed on '{out.name}' ({_first_line(exc)}); "
                                      "try exporter='torchscript'") from exc
                notes.append(f"the dynamo exporter failed ({_first_line(exc)}); used the TorchScript-based exporter")
                used = "torchscript"
                for leftover in Path(tmp).iterdir():
                    leftover.unlink()
        if used == "torchscript":
            _export_torchscript_onnx(module, spec, target, opset)
        model = onnx.load(str(target))  # external data, if the exporter split it off, is read back in
    model.doc_string = (f"headstart {__version__}: uint8 {INPUT_NAME} N x 3 x H x W (RGB) -> {OUTPUT_NAME} "
                        f"N x {len(json.loads(metadata['headstart.classes']))}; see metadata headstart.input")
    del model.metadata_props[:]
    for key, value in {**metadata, "headstart.exporter": used}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString()
    atomic_write_bytes(out, data)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return {"exporter": used, "opset": opsets.get("ai.onnx"), "bytes": len(data), "notes": notes}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _dynamic_axes(spec: dict[str, Any]) -> dict[int, str]:
    return {0: "batch"} if spec["crop"] else {0: "batch", 2: "height", 3: "width"}


def _export_dynamo(module: ExportedModel, spec: dict[str, Any], target: Path, opset: int | None) -> None:
    from torch.export import Dim

    h, w = spec["size"]
    dims = {0: Dim("batch", min=1, max=4096)}
    if not spec["crop"]:
        dims.update({2: Dim("height", min=h, max=16384), 3: Dim("width", min=w, max=16384)})
    with quiet():
        torch.onnx.export(module, (example_input(spec),), str(target), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamo=True, dynamic_shapes=(dims,), opset_version=opset,
                          verbose=False, external_data=False)


def _export_torchscript_onnx(module: ExportedModel, spec: dict[str, Any], target: Path, opset: int | None) -> None:
    axes = _dynamic_axes(spec)
    with quiet():
        torch.onnx.export(module, (example_input(spec),), str(target), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamo=False, opset_version=opset or 17,
                          dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "batch"}})


def write_torchscript(module: ExportedModel, spec: dict[str, Any], metadata: dict[str, str],
                      out: Path) -> dict[str, Any]:
    """``torch.jit.trace`` of ``module`` at ``out`` (atomically), the metadata as the extra file ``headstart.json``."""
    buffer = io.BytesIO()
    with quiet(), torch.no_grad():  # quiet: PyTorch calls TorchScript deprecated, in favour of torch.export
        traced = torch.jit.trace(module, (example_input(spec),), check_trace=False)
        torch.jit.save(traced, buffer, _extra_files={"headstart.json": json.dumps(metadata)})
    data = buffer.getvalue()
    atomic_write_bytes(out, data)
    return {"exporter": "torch.jit.trace", "opset": None, "bytes": len(data), "notes": []}
