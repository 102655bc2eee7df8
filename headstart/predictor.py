"""A run held in memory: encoded image bytes -> class probabilities, batched, without the feature cache.

What ``headstart serve`` runs (:mod:`headstart.serve`). Two steps, so that a server can decode many
uploads in threads and send their tensors through the network together:

* :meth:`Predictor.prepare` -- one upload's bytes -> the tensor(s) its backbone(s) take: decoded as
  ``headstart predict`` decodes (:func:`~headstart.data.decode_bytes`: EXIF orientation, the
  max-pixels refusal of decompression bombs, a large JPEG decoded at reduced scale for the resize),
  then the run's own clean view (:func:`~headstart.views.clean_view`: resize, centre crop, normalise).
  Bad bytes raise :class:`~headstart.data.ImageDecodeError`.
* :meth:`Predictor.probabilities` -- a batch of prepared images -> ``(n, k)`` probabilities in the
  run's class order: each member's backbone forward (the engine and precision its features were
  computed with, as ``headstart predict`` scores them), its head, its probabilities aligned to the
  run's classes, the members averaged with their weights.

Engine ``torch`` is headstart's own computation: the features are rounded to float16 before the head,
as the feature cache stores them, so the head sees the rows it was trained on and ``headstart
predict`` reads. Served probabilities agree with ``headstart predict`` on the same files: top-1
identical and ``max |p_serve - p_predict|`` 6e-8 on 245 photos (OpenVINO bf16, batches of 32 and
of 1 alike; 3e-8 with PyTorch fp32); without the rounding it was 3e-5. :data:`PREDICT_TOLERANCE` is
the bound the tests hold it to. Engine ``onnx`` runs the exported graph (``headstart export``) in ONNX
Runtime on :func:`headstart.onnx_input.prepare_image`'s uint8 input: 2e-5 from ``headstart predict``
on a run whose features were fp32, up to 3e-2 on one whose features were bf16 (the graph is fp32).

Example:
    >>> predictor = Predictor.load("runs/photos")                          # doctest: +SKIP
    >>> predictor.predict_bytes([Path("ant.jpg").read_bytes()]).round(3)   # doctest: +SKIP
    array([[0.981, 0.019]])
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import ImageDecodeError, decode_bytes
from .ensemble import align_classes
from .errors import UsageError
from .runs import AnyRun, EnsembleRun, Run, load_run, members_of
from .views import View, clean_view

ENGINES = ("torch", "onnx")
#: what the feature cache stores features as; ``headstart predict``'s head reads them so
STORAGE_DTYPE = np.float16
#: ``max |p_serve - p_predict|`` the tests allow (measured: 6e-8; a batch of another size may move a bf16
#: feature across a float16 rounding step)
PREDICT_TOLERANCE = 1e-4
DEFAULT_BATCH = 32  # images per backbone forward inside one call
INPUT_KEY, CLASSES_KEY = "headstart.input", "headstart.classes"  # ONNX metadata of an exported graph


@dataclass(frozen=True)
class Prepared:
    """One decoded image as each distinct preprocessing of the run's members makes it (usually one)."""

    tensors: tuple[Any, ...]  # torch float (3, H, W) for the torch engine; uint8 numpy (3, H, W) for onnx
    name: str = "<upload>"


@dataclass
class _Member:
    """One single run, ready to score: which prepared tensor it takes, its forward and head."""

    view: int  # index into Predictor.views
    forward: Callable[[torch.Tensor], np.ndarray]  # batch -> float32 pooled features (n, dim)
    logits: Callable[[torch.Tensor], torch.Tensor]  # float32 features -> logits, the head's classes' order
    classes: list[Any]
    weight: float
    description: str = ""  # e.g. "tf_efficientnet_lite0: openvino bf16 on cpu"


class Predictor:
    """Class probabilities of encoded images for one run (single or ensemble), with no feature cache.

    Build one with :meth:`load`. Thread use: :meth:`prepare` may run in many threads at once;
    :meth:`probabilities` must run in one thread at a time (a server gives it one worker thread).
    """

    def __init__(self, run: AnyRun, engine: str, views: list[View], members: list[_Member] | None = None,
                 onnx: Any = None) -> None:
        self.run = run
        self.engine = engine
        self.views = views
        self.members = members or []
        self.onnx = onnx  # the ONNX Runtime session (engine onnx)

    @property
    def class_names(self) -> list[str]:
        return self.run.class_names

    @property
    def forward(self) -> str:
        """What computes the probabilities, e.g. ``tf_efficientnet_lite0: openvino bf16 on cpu``."""
        if self.engine == "onnx":
            return f"onnxruntime {self.onnx.version} (CPU, fp32 graph) on {self.onnx.path.name}"
        return "; ".join(m.description for m in self.members)

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str] | AnyRun, *, engine: str = "torch", device: str | None = None,
             cache_dir: str | os.PathLike[str] | None = None,
             onnx_path: str | os.PathLike[str] | None = None) -> Predictor:
        """The predictor of the run at ``run_dir`` (checked as :func:`~headstart.runs.load_run` checks it).

        Args:
            engine: ``torch`` (headstart's own computation, PyTorch or OpenVINO as the run was trained)
                or ``onnx`` (the exported graph in ONNX Runtime, CPU).
            device: ``cpu``, ``cuda`` ...; default CUDA when available (engine ``torch``).
            cache_dir: where the backbone's digest memo and OpenVINO's converted network are kept
                (default: the feature cache folder); no feature is read or written there.
            onnx_path: the exported graph (engine ``onnx``); default ``RUN/model.onnx``.
        """
        if engine not in ENGINES:
            raise UsageError(f"engine must be one of {', '.join(ENGINES)}; got '{engine}'")
        run = run_dir if isinstance(run_dir, (Run, EnsembleRun)) else load_run(run_dir)
        if engine == "onnx":
            return _onnx_predictor(run, Path(onnx_path) if onnx_path else run.path / "model.onnx")
        return _torch_predictor(run, device, cache_dir)

    # ------------------------------------------------------------------------------ preparing

    def prepare(self, data: bytes, name: str = "<upload>") -> Prepared:
        """Decode ``data`` and preprocess it for every member; ``name`` is for messages.

        Raises:
            ImageDecodeError: the bytes are empty, not an image, truncated, or larger than the pixel limit
                (``$HEADSTART_MAX_PIXELS``; "image too large" in the message), or preprocessing failed.
        """
        if self.engine == "onnx":
            return Prepared((self._prepare_onnx(data, name),), name)
        tensors = []
        for view in self.views:
            image = decode_bytes(data, name, min_size=view.min_size)
            try:
                tensors.append(view.transform(image, ""))
            except Exception as exc:  # a transform failure on a strange image is that image's fault
                raise ImageDecodeError(f"{name}: cannot preprocess image ({type(exc).__name__}: {exc})",
                                       permanent=True) from None
        return Prepared(tuple(tensors), name)

    def _prepare_onnx(self, data: bytes, name: str) -> np.ndarray:
        """The graph's uint8 ``(3, H, W)`` input: headstart's decoder (the same refusals and reduced-scale JPEG
        decoding as the torch engine), then the model card's reference preprocessing on the decoded image."""
        from .onnx_input import prepare_image

        spec = self.onnx.input_spec
        image = decode_bytes(data, name, min_size=tuple(spec["resize"]))
        try:
            return prepare_image(image, spec)
        except Exception as exc:
            raise ImageDecodeError(f"{name}: cannot preprocess image ({type(exc).__name__}: {exc})",
                                   permanent=True) from None

    # ------------------------------------------------------------------------------ scoring

    def probabilities(self, batch: Sequence[Prepared], batch_size: int = DEFAULT_BATCH) -> np.ndarray:
        """``(len(batch), k)`` float64 probabilities, columns in :attr:`class_names` order.

        The images go through the network in forwards of power-of-two sizes, at most ``batch_size``
        (13 images: 8 + 4 + 1), so that a server sees a handful of input shapes, all met in
        :meth:`warm_up`: OpenVINO and oneDNN prepare their kernels for each new shape (measured on lite0,
        2 cores: batches of sizes never seen before ran at 49 images/s, the same sizes again at 81).
        A row is NaN where a member's features were not finite (the image cannot be scored; ``headstart
        predict`` lists such a file as bad).
        """
        if not batch:
            return np.zeros((0, len(self.class_names)))
        parts, start = [], 0
        for size in forward_sizes(len(batch), batch_size):
            parts.append(self._score(batch[start:start + size]))
            start += size
        return np.concatenate(parts)

    def predict_bytes(self, images: Sequence[bytes], names: Sequence[str] | None = None) -> np.ndarray:
        """:meth:`prepare` each of ``images``, then :meth:`probabilities` of them all."""
        names = list(names) if names is not None else [f"<image {i}>" for i in range(len(images))]
        return self.probabilities([self.prepare(data, name) for data, name in zip(images, names)])

    def warm_up(self, max_batch: int = 1) -> None:
        """Score a blank image in a forward of every size :meth:`probabilities` uses up to ``max_batch``, so
        that no request pays for loading, compiling or preparing a shape."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (128, 128, 128)).save(buffer, "PNG")
        blank = self.prepare(buffer.getvalue(), "<warm-up image>")
        sizes = {min(max_batch, 1 << k) for k in range(max_batch.bit_length() + 1)}  # every one forward_sizes gives
        for size in sorted(sizes):
            self.probabilities([blank] * size, batch_size=max_batch)

    def _score(self, batch: Sequence[Prepared]) -> np.ndarray:
        if self.engine == "onnx":
            return self.onnx.run(np.stack([p.tensors[0] for p in batch]))
        names = self.class_names
        probas, ok = [], np.ones(len(batch), dtype=bool)
        for member in self.members:
            x = torch.stack([p.tensors[member.view] for p in batch])
            rows = member.forward(x).astype(STORAGE_DTYPE)  # as the cache stores them
            ok &= np.isfinite(rows).all(axis=1)
            logits = member.logits(torch.from_numpy(rows).float())
            proba = torch.softmax(logits.double(), dim=1).numpy()  # as head.predict_proba does
            probas.append(align_classes(proba, member.classes, names))
        weights = np.asarray([m.weight for m in self.members], dtype=np.float64)
        out = np.tensordot(weights / weights.sum(), np.stack(probas), axes=1)
        out[~ok] = np.nan
        return out


def forward_sizes(n: int, batch_size: int) -> list[int]:
    """``n`` images as forwards of power-of-two sizes, largest first, none above ``batch_size`` (which may
    itself not be a power of two): ``forward_sizes(13, 32) == [8, 4, 1]``, ``forward_sizes(70, 32) ==
    [32, 32, 4, 2]``, ``forward_sizes(40, 24) == [24, 16]``."""
    sizes = []
    while n > 0:
        size = min(batch_size, 1 << (n.bit_length() - 1))
        sizes.append(size)
        n -= size
    return sizes


# ------------------------------------------------------------------------------------------ engines


def _torch_predictor(run: AnyRun, device: str | None, cache_dir: str | os.PathLike[str] | None) -> Predictor:
    """Each member's backbone as ``headstart predict`` builds it (weights checked against the run)."""
    from .cache import FeatureCache
    from .inference import load_run_backbone

    target = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    views: list[View] = []
    keys: list[str] = []
    members = []
    runs = members_of(run)
    weights = run.member_weights if isinstance(run, EnsembleRun) else [1.0]
    with FeatureCache(cache_dir) as cache:
        for member, weight in zip(runs, weights):
            bb = load_run_backbone(member, None, cache)
            key = repr(sorted(bb.data_config.items()))
            if key not in keys:
                keys.append(key)
                views.append(clean_view(bb.data_config))  # the clean view predict computes, JPEG draft included
            forward, how = _forward(bb, member.info["preprocessing"]["precision"], target, cache.root / "engines")
            members.append(_Member(keys.index(key), forward, member.head.logit_function(),
                                   list(member.head.classes_), float(weight), f"{bb.name}: {how}"))
    return Predictor(run, "torch", views, members)


def _forward(backbone: Any, precision: str, device: torch.device,
             engine_dir: Path) -> tuple[Callable[..., np.ndarray], str]:
    """``batch -> (n, dim)`` float32 features in the run's engine and precision (as extraction runs them),
    and what runs them, e.g. ``openvino bf16 on cpu``."""
    from .engines import openvino_forward, resolve_engine
    from .features import forward_batch
    from .preprocess import resolve_precision

    precision = resolve_precision(precision, device)
    if resolve_engine(backbone.engine, device, precision) == "openvino":
        return openvino_forward(backbone, precision, engine_dir), f"openvino {precision} on cpu"
    model = backbone.model.to(device).eval()
    model.to(memory_format=torch.channels_last)
    return (lambda batch: forward_batch(backbone, batch, device, precision)), f"torch {precision} on {device}"


class _OnnxSession:
    """The exported graph in ONNX Runtime (CPU): uint8 ``(n, 3, H, W)`` -> probabilities."""

    def __init__(self, path: Path, run: AnyRun) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings about the graph are not the user's
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # decoding threads need the cores
        self.path, self.version = path, ort.__version__
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.input_spec = _input_spec(path, self.session, members_of(run)[0])
        classes = self.session.get_modelmeta().custom_metadata_map.get(CLASSES_KEY)
        if classes is not None and json.loads(classes) != run.class_names:
            raise UsageError(f"'{path}' predicts the classes {json.loads(classes)}, not run '{run.path}''s "
                             f"{run.class_names}; export this run again with 'headstart export {run.path}'")

    def run(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.uint8)})[0]
        out = np.asarray(out, dtype=np.float64)
        out[~np.isfinite(out).all(axis=1)] = np.nan
        return out


def _input_spec(path: Path, session: Any, member: Run) -> dict[str, Any]:
    """The input spec the graph records (``headstart.input``), else the one of the run's preprocessing."""
    from .onnx_input import input_spec

    recorded = session.get_modelmeta().custom_metadata_map.get(INPUT_KEY)
    spec = json.loads(recorded) if recorded else input_spec(member.info["data_config"])
    if not spec.get("crop", True):
        raise UsageError(f"'{path}' was exported with test-time crops inside the graph (its input is the whole "
                         "resized image, of any shape); serve one exported without --tta, or use --engine torch")
    return spec


def _onnx_predictor(run: AnyRun, path: Path) -> Predictor:
    """The ONNX engine: the graph at ``path`` must exist (``headstart export RUN --format onnx``)."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise UsageError("engine 'onnx' needs ONNX Runtime: pip install 'headstart[export]' (or use --engine torch)")
    if not path.is_file():
        raise UsageError(f"engine 'onnx' needs the exported graph '{path}', which does not exist; "
                         f"export it with 'headstart export {run.path} --format onnx' (or use --engine torch)")
    session = _OnnxSession(path, run)
    return Predictor(run, "onnx", [], onnx=session)
