"""Verification of an exported file: it must compute what the run computes, on real images.

Each check image is prepared once by :func:`~headstart.onnx_input.prepare_image`; its pixels, then its
probabilities, are compared:

* the prepared pixels against headstart's own preprocessing of the same file (its decoder and the
  run's clean view, :func:`pixel_check`): they must be the same, to half a grey level (measured: 0);
* the file (in ONNX Runtime, CPU provider; or the TorchScript module) against the same torch module
  in fp32 on the same uint8 input: ``max |p_file - p_torch| <= 1e-4`` (:data:`TORCH_TOLERANCE`;
  measured on lite0: below 1e-6);
* the file against ``headstart predict`` (:func:`~headstart.inference.run_probabilities`: features from
  the feature cache, computed with the engine and precision the run was trained with, stored as
  float16), within :data:`PREDICT_TOLERANCE` of the run's precision. Measured with
  ``tf_efficientnet_lite0`` on the ants/bees photos: fp32 features (float16 storage) 1.4e-5 at most
  over 245 photos with PyTorch, 1.3e-5 with OpenVINO, 8e-6 over 62 photos with 10 crops: the tolerance
  is 1e-4. bf16 features (OpenVINO on AMX): 5.0e-3 at most over 245 photos for a linear head (median
  5e-5), 4.8e-5 for an MLP head, 7.7e-3 over 62 photos with 10 crops and 1.5e-2 on one of 8 others.
  bf16 keeps 8 bits of mantissa: features move by ~0.4% and a confident logit by up to ~0.1, so
  ``|dp|`` up to ~0.025 near p = 0.5; the tolerance for bf16/fp16 runs is 5e-2 (over 3x the worst
  seen). The pixel check holds whatever the precision: on 8 ants/bees photos a bilinear resize in
  place of bicubic moves the probabilities by 2.3e-3 only, BGR for RGB by 7.3e-2, no crop by 8.8e-2;
* top-1: the same class, except where the reference's two best classes are within twice the
  tolerance of each other (a tie at the stated precision; counted as ``near_ties``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import BadFile, list_image_paths, load_images
from .errors import ExportError
from .inference import run_probabilities
from .onnx_input import prepare_image
from .runs import AnyRun, members_of

#: grey levels by which the prepared pixels may differ from headstart's own preprocessing
PIXEL_TOLERANCE = 0.5
#: ``max |p_file - p_torch|`` on the same uint8 input, both fp32
TORCH_TOLERANCE = 1e-4
#: ``max |p_file - p_headstart_predict|`` by the precision the run's features were computed in
PREDICT_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2}
#: a head gain (:func:`head_gain`) above which a failed check blames the head's conditioning
GAIN_WARNING = 1000.0
N_CHECK_IMAGES = 8  # images of the run's own data checked by default, spread over its classes

Runner = Callable[[np.ndarray], np.ndarray]  # uint8 (n, 3, H, W) -> probabilities (n, k)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporters' and quantizer's progress lines, warnings and log records (below errors) kept off
    stdout/stderr, so ``--json`` stays one object and the CLI's lines stay its own."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def onnx_session(path: str | os.PathLike[str]) -> Any:
    """An ONNX Runtime session on the CPU provider, without its console log."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_runner(path: str | os.PathLike[str]) -> Runner:
    """uint8 batch -> probabilities, by the ONNX file at ``path`` in ONNX Runtime."""
    session = onnx_session(path)
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(x, dtype=np.uint8)})[0]
    return run


def torchscript_runner(path: str | os.PathLike[str]) -> Runner:
    """uint8 batch -> probabilities, by the TorchScript file at ``path``."""
    with quiet():
        traced = torch.jit.load(str(path), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return traced(torch.from_numpy(x)).numpy()
    return run


def check_paths(run: AnyRun, check_images: Sequence[str] | None, n: int = N_CHECK_IMAGES) -> list[Path]:
    """The images to verify on: ``check_images`` (files and folders), or ``n`` of the run's own data.

    Raises:
        ExportError: none given and the run's data is not where it was trained from.
    """
    if check_images:
        paths, _ = list_image_paths(check_images)
        if not paths:
            raise ExportError(f"--check-images {' '.join(map(str, check_images))} holds no image file; give images "
                              "or folders of images")
        return paths
    source = run_data_source(run)
    loaded = load_images(source, val_split=0, min_classes=1)
    images = loaded.val if loaded.val is not None else loaded.train
    by_class = [np.flatnonzero(images.labels == c) for c in range(len(images.class_names))]
    picked = [int(idx[i]) for i in range(max(map(len, by_class), default=0)) for idx in by_class if i < len(idx)][:n]
    return [images.paths[i] for i in sorted(picked)]


def run_data_source(run: AnyRun) -> str:
    """The data folder or CSV the run was trained on, checked to exist."""
    source = members_of(run)[0].info.get("data", {}).get("source")
    if not source or not Path(source).exists():
        raise ExportError(f"run '{run.path}' was trained on '{source}', which is not there any more; pass images "
                          "to check the export on with --check-images PATH (and labelled data with --data)")
    return str(source)


def prepare_all(paths: Sequence[Path], spec: dict[str, Any]) -> tuple[list[np.ndarray], list[Path], list[BadFile]]:
    """Every image prepared as the exported graph takes it; those that cannot be read are skipped."""
    arrays, kept, bad = [], [], []
    for path in paths:
        try:
            arrays.append(prepare_image(path, spec))
            kept.append(Path(path))
        except Exception as exc:  # a bad file is data, not the end of the export
            bad.append(BadFile(str(path), f"cannot prepare image ({type(exc).__name__}: {exc})"))
    return arrays, kept, bad


def run_batches(runner: Runner, arrays: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """``runner`` over the images in batches of one shape (10crop inputs differ in width), in order."""
    out: list[np.ndarray | None] = [None] * len(arrays)
    shapes: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(arrays):
        shapes.setdefault(a.shape, []).append(i)
    for indices in shapes.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            for i, row in zip(chunk, runner(np.stack([arrays[i] for i in chunk]))):
                out[i] = row
    return np.stack(out) if out else np.zeros((0, 0))  # type: ignore[arg-type]


def torch_runner(module: torch.nn.Module) -> Runner:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()
    return run


def compare(p: np.ndarray, ref: np.ndarray, tolerance: float, paths: Sequence[Path]) -> dict[str, Any]:
    """Max absolute difference and top-1 agreement of ``p`` with ``ref``; ``ok`` when both hold."""
    diff = np.abs(np.asarray(p, np.float64) - np.asarray(ref, np.float64))
    top, ref_top = p.argmax(1), ref.argmax(1)
    ranked = np.sort(ref, axis=1)
    tie = (ranked[:, -1] - ranked[:, -2] < 2 * tolerance) if ref.shape[1] > 1 else np.zeros(len(ref), bool)
    differ = np.flatnonzero((top != ref_top) & ~tie)
    worst = int(diff.max(1).argmax()) if len(diff) else 0
    return {"n": len(p), "max_abs_diff": float(diff.max()) if diff.size else 0.0, "tolerance": tolerance,
            "top1_agree": int((top == ref_top).sum()), "near_ties": int(((top != ref_top) & tie).sum()),
            "top1_differs": [str(paths[i]) for i in differ], "worst_image": str(paths[worst]) if len(paths) else "",
            "ok": bool(diff.size == 0 or diff.max() <= tolerance) and not len(differ)}


def pixel_check(paths: Sequence[Path], arrays: Sequence[np.ndarray], spec: dict[str, Any],
                data_config: dict[str, Any]) -> dict[str, Any]:
    """How far the prepared pixels are from headstart's own decode + clean view of the same files, in grey
    levels (0-255; for a 10-crop input, its centre crop); a file headstart cannot decode is left out."""
    from .data import ImageDecodeError, decode_image
    from .tta import crop_box
    from .views import clean_view

    view = clean_view(data_config)
    mean, std = (torch.tensor(data_config[k], dtype=torch.float32).view(3, 1, 1) for k in ("mean", "std"))
    (h, w), worst, n, where = spec["size"], 0.0, 0, ""
    for path, pixels in zip(paths, arrays):
        try:
            expected = view.transform(decode_image(path, min_size=view.min_size), "")
        except ImageDecodeError:
            continue
        top, left = crop_box(pixels.shape[1:], (h, w), "center")
        ours = (torch.from_numpy(pixels[:, top:top + h, left:left + w]).float() / 255.0 - mean) / std
        diff = float(((ours - expected).abs() * std * 255.0).max())
        n, worst, where = n + 1, max(worst, diff), str(path) if diff > worst else where
    return {"n": n, "max_abs_diff": worst, "tolerance": PIXEL_TOLERANCE, "worst_image": where,
            "ok": worst <= PIXEL_TOLERANCE}


def predict_tolerance(run: AnyRun) -> tuple[float, str]:
    """The tolerance against ``headstart predict`` and the loosest precision among the run's members."""
    precisions = [m.info["preprocessing"].get("precision", "fp32") for m in members_of(run)]
    worst = max(precisions, key=lambda p: PREDICT_TOLERANCE.get(p, max(PREDICT_TOLERANCE.values())))
    return PREDICT_TOLERANCE.get(worst, max(PREDICT_TOLERANCE.values())), worst


def verify(run: AnyRun, runner: Runner, module: torch.nn.Module, spec: dict[str, Any], paths: Sequence[Path],
           cache: Any, *, tta: str = "none", batch_size: int = 32, num_workers: int | None = None,
           progress: bool = True) -> dict[str, Any]:
    """Compare the exported file (``runner``) with the torch module and with ``headstart predict`` on ``paths``.

    Returns:
        ``{"n_images", "pixels": pixel_check(...), "torch": compare(...), "predict": compare(...), "precision",
        "skipped", "ok"}``.

    Raises:
        ExportError: none of ``paths`` could be prepared.
    """
    arrays, kept, bad = prepare_all(paths, spec)
    if not arrays:
        raise ExportError(f"none of the {len(paths)} check images could be read (e.g. {bad[0].path}: "
                          f"{bad[0].reason}); pass readable images with --check-images")
    pixels = pixel_check(kept, arrays, spec, members_of(run)[0].info["data_config"])
    p_file = run_batches(runner, arrays, batch_size)
    p_torch = run_batches(torch_runner(module), arrays, batch_size)
    reference = run_probabilities(run, kept, cache, tta=tta, batch_size=batch_size, num_workers=num_workers,
                                  progress=progress)
    ok_paths = [p for p, ok in zip(kept, reference.ok) if ok]
    tolerance, precision = predict_tolerance(run)
    result = {"n_images": len(kept), "precision": precision, "pixels": pixels,
              "torch": compare(p_file, p_torch, TORCH_TOLERANCE, kept),
              "predict": compare(p_file[reference.ok], reference.proba, tolerance, ok_paths),
              "skipped": [b.to_dict() for b in bad + reference.bad_files]}
    result["ok"] = pixels["ok"] and result["torch"]["ok"] and result["predict"]["ok"]
    return result


def head_gain(run: AnyRun) -> float:
    """The largest factor by which a member's head multiplies a pooled feature (first layer / standardisation).

    A feature that was constant on the training images (e.g. 0 in bf16 on a few similar images) gets a
    scale of 1e-6, so a difference of 1e-7 in it, between two fp32 forwards, moves a logit by 0.1.
    """
    with torch.no_grad():
        return max(float((m.head.module_[1].weight / m.head.module_[0].scale).abs().max()) for m in members_of(run))


def mismatch_message(path: Path, check: dict[str, Any], engine: str, gain: float = 0.0) -> str:
    """One line: which comparison failed, by how much, on which image, and what to do."""
    pixels = check["pixels"]
    if not pixels["ok"]:
        return (f"prepare_image's pixels differ from headstart's own preprocessing by up to "
                f"{pixels['max_abs_diff']:.1f} grey levels (on {pixels['worst_image']}); the file '{path}' is kept, "
                "but its input would not be the run's: report it with the image")
    for key, other, fix in (
            ("torch", "the same graph in torch fp32",
             "try another --opset, or --format torchscript"),
            ("predict", f"headstart predict ({check['precision']} features)",
             "re-run 'headstart predict' with a new --cache-dir; if it persists, report it")):
        c = check[key]
        if not c["ok"]:
            differs = c["top1_differs"]
            top = f", top-1 differs on {len(differs)} (e.g. {differs[0]})" if differs else ""
            if gain > GAIN_WARNING:
                fix = (f"the head multiplies some features by up to {gain:.0f} (features that were constant on the "
                       "training images), so tiny differences in them are amplified: train on more varied images, or "
                       "with --precision fp32")
            return (f"the exported file '{path}' ({engine}) disagrees with {other} on {c['n']} check images: "
                    f"max |dp| {c['max_abs_diff']:.2e} (allowed {c['tolerance']:.0e}, worst on {c['worst_image']})"
                    f"{top}; the file is kept for inspection; {fix}")
    return ""
