"""``headstart export --quantize int8``: ONNX Runtime static quantization, compared with fp32 on labelled images.

The int8 file (``<name>.int8.onnx`` beside the fp32 one) is ONNX Runtime's QDQ format: weights int8 per
output channel, activations uint8 with min/max ranges calibrated on up to :data:`CALIBRATION_IMAGES` of
the run's training images. Only ``Conv``, ``MatMul`` and ``Gemm`` are quantized, and not each member's
first convolution nor its head (:func:`float_nodes`): the stem sees the colours themselves (quantized,
it flipped half the predictions on a synthetic red/blue set and quadrupled the largest probability
change on ants/bees photos, 0.41 against 0.10, at the same speed); the head is a tiny part of the work,
and its first layer, with the standardisation folded in, can hold large weights that int8 would
flatten. Keeping the depthwise convolutions in float as well cut the mean probability change on intel
scenes by 4x but made the model slower than fp32, so they are quantized. The normalisation, softmax
and averaging stay in float.

Both files then score the same labelled images (``--data``, or the run's validation images: its
``val/`` folder or its own validation split, else its training images, said so): size, ms per image
(same machine, same batches, after a warm-up batch), accuracy, and top-1 agreement with fp32.
Agreement below :data:`MIN_AGREEMENT` is not called fine: the file is kept and the export fails with
the figures.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write_bytes
from .data import ImageSet, in_class_order, load_images, stratified_split
from .errors import DataError
from .export_check import Runner, onnx_runner, prepare_all, quiet, run_batches, run_data_source
from .export_graph import INPUT_NAME
from .runs import AnyRun, members_of
from .train_common import content_keys, log

#: training images the activation ranges are measured on, spread over the classes (on intel scenes, 64, 200
#: and 256 gave 94.4%, 97.8% and 94.4% top-1 agreement with fp32 on 90 validation images: min/max ranges
#: move with the images chosen, not steadily with their number)
CALIBRATION_IMAGES = 256
MAX_EVAL_IMAGES = 1000  # labelled images fp32 and int8 are compared on (spread evenly when more)
MIN_AGREEMENT = 0.99  # top-1 agreement with fp32 below which the int8 file is refused
BATCH = 16


def quantize_int8(run: AnyRun, fp32_path: Path, spec: dict[str, Any], cache: Any, *,
                  data: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Write ``<fp32_path stem>.int8.onnx`` and compare it with ``fp32_path`` (see the module docstring).

    Returns:
        ``{"path", "bytes", "fp32_bytes", "ms_per_image", "fp32_ms_per_image", "accuracy", "fp32_accuracy",
        "agreement", "n_images", "n_calibration", "evaluated_on", "ok", "message"}``.
    """
    calibration, labelled, where = labelled_sets(run, data, cache)
    out = fp32_path.with_name(fp32_path.name.removesuffix(".onnx") + ".int8.onnx")
    arrays, _, _ = prepare_all(spread(calibration.paths, CALIBRATION_IMAGES), spec)
    if not arrays:
        raise DataError(f"no training image of run '{run.path}' could be read to calibrate the int8 model; "
                        "pass readable labelled data with --data")
    log(progress, f"quantizing to int8, calibrated on {len(arrays)} training images")
    quantize_file(fp32_path, out, arrays)
    index = spread(list(range(len(labelled))), MAX_EVAL_IMAGES)
    eval_arrays, kept, _ = prepare_all([labelled.paths[i] for i in index], spec)
    keep = {str(p) for p in kept}
    y = np.asarray([labelled.labels[i] for i in index if str(labelled.paths[i]) in keep])
    log(progress, f"comparing int8 with fp32 on {len(eval_arrays)} labelled images ({where})")
    p32, ms32 = timed(onnx_runner(fp32_path), eval_arrays)
    p8, ms8 = timed(onnx_runner(out), eval_arrays)
    agreement = float((p8.argmax(1) == p32.argmax(1)).mean()) if len(y) else float("nan")
    result = {"path": str(out), "bytes": out.stat().st_size, "fp32_bytes": fp32_path.stat().st_size,
              "ms_per_image": ms8, "fp32_ms_per_image": ms32,
              "accuracy": float((p8.argmax(1) == y).mean()) if len(y) else float("nan"),
              "fp32_accuracy": float((p32.argmax(1) == y).mean()) if len(y) else float("nan"),
              "max_abs_diff": float(np.abs(p8 - p32).max()) if len(y) else float("nan"),
              "agreement": agreement, "n_images": len(y), "n_calibration": len(arrays), "evaluated_on": where}
    result["ok"] = bool(agreement >= MIN_AGREEMENT)
    result["message"] = "" if result["ok"] else (
        f"the int8 model '{out}' agrees with fp32 on only {agreement:.1%} of {len(y)} images (below "
        f"{MIN_AGREEMENT:.0%}; accuracy {result['accuracy']:.3f} against {result['fp32_accuracy']:.3f}): it is kept "
        "for inspection, but use the fp32 model, or calibrate on more varied training images")
    return result


def labelled_sets(run: AnyRun, data: str | Path | None, cache: Any) -> tuple[ImageSet, ImageSet, str]:
    """(training images to calibrate on, labelled images to compare on with labels in the run's class
    order, where the latter come from)."""
    if data is not None:
        loaded = load_images(data, val_split=0, min_classes=1)
        images = loaded.val if loaded.val is not None else loaded.train
        where = f"'{Path(data).name}'" + (" val/" if loaded.val is not None else "")
        train = _run_training_images(run, cache)[0] if _has_run_data(run) else loaded.train
        return train, _in_run_order(run, images, str(data)), where
    train, val, where = _run_training_images(run, cache)
    return train, _in_run_order(run, val if val is not None else train, run_data_source(run)), where


def _has_run_data(run: AnyRun) -> bool:
    source = members_of(run)[0].info.get("data", {}).get("source")
    return bool(source) and Path(source).exists()


def _run_training_images(run: AnyRun, cache: Any) -> tuple[ImageSet, ImageSet | None, str]:
    """The run's training images and validation images (None without), split as training split them."""
    info = members_of(run)[0].info
    loaded = load_images(run_data_source(run), val_split=0, min_classes=1)
    if loaded.val is not None:
        return loaded.train, loaded.val, "the run's val/ images"
    config = info.get("config", {})
    if info.get("data", {}).get("val_from") == "split" and config.get("val_split"):
        groups = content_keys(cache, loaded.train.paths)
        train_idx, val_idx = stratified_split(loaded.train.labels, float(config["val_split"]),
                                              int(config.get("seed", 0)), groups=groups)
        return loaded.train.subset(train_idx), loaded.train.subset(val_idx), "the run's validation split"
    return loaded.train, None, "the run's training images: it has no validation images, so accuracy is optimistic"


def _in_run_order(run: AnyRun, images: ImageSet, source: str) -> ImageSet:
    """``images`` with labels re-numbered in the run's class order; refused when it has other classes."""
    return in_class_order(images, run.class_names, source, f"run '{run.path}'",
                          "pass labelled data of those classes with --data")


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """At most ``n`` of ``items``, evenly spaced (all of them when there are fewer)."""
    if len(items) <= n:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def quantize_file(fp32_path: Path, out: Path, arrays: Sequence[np.ndarray]) -> None:
    """ONNX Runtime static QDQ quantization of ``fp32_path`` into ``out``, calibrated on ``arrays``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(list(_batches(arrays)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp, quiet():
        source = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_path), str(source), skip_symbolic_shape=True)
        except Exception:  # the optimisation pass is optional: quantize the file as it is
            source = fp32_path
        target = Path(tmp) / "int8.onnx"
        quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"], nodes_to_exclude=float_nodes(source))
        atomic_write_bytes(out, target.read_bytes())


def float_nodes(path: Path) -> list[str]:
    """The nodes kept in float: each member's first convolution (its stem, on the normalised pixels) and the
    nodes that take a head's tensors (``members.N.head.*``)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    after_conv: set[str] = set()
    keep = []
    for node in graph.node:  # in topological order
        below = any(name in after_conv for name in node.input)
        if (node.op_type == "Conv" and not below) or any(".head." in name for name in node.input):
            keep.append(node.name)
        if node.op_type == "Conv" or below:
            after_conv.update(node.output)
    return keep


def _batches(arrays: Sequence[np.ndarray], size: int = BATCH) -> Iterator[dict[str, np.ndarray]]:
    """Calibration batches of one input shape each, under the graph's input name."""
    shapes: dict[tuple[int, ...], list[np.ndarray]] = {}
    for a in arrays:
        shapes.setdefault(a.shape, []).append(a)
    for group in shapes.values():
        for start in range(0, len(group), size):
            yield {INPUT_NAME: np.stack(group[start:start + size])}


def timed(runner: Runner, arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
    """Probabilities of ``arrays`` and the milliseconds per image, after one warm-up batch."""
    if not arrays:
        return np.zeros((0, 0)), float("nan")
    with contextlib.suppress(Exception):
        runner(np.stack(arrays[:1]))
    start = time.perf_counter()
    proba = run_batches(runner, arrays, BATCH)
    return proba, round(1000 * (time.perf_counter() - start) / len(arrays), 3)
