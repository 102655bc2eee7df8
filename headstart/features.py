"""Run a frozen backbone over images once, through the feature cache.

:func:`extract_features` hashes each file, looks the hashes up in the :class:`~headstart.cache.FeatureCache`,
decodes and forwards only the images it lacks (in DataLoader worker processes, batched, bf16 and
channels-last on CPUs with AMX), and flushes new rows to the cache every ``flush_every`` images, every
10 seconds and on any interruption, so little computed is lost and a re-run resumes where it stopped.
Processes extracting into one cache claim the images they compute, so each is computed about once.

:func:`extract_views` does the same for several *views* of each image in one decoding pass: the clean
view and K augmented views (an augmented feature cache). Each view has its own cache key (augmentation
config + view index); the views themselves are defined in :mod:`headstart.views`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ._validation import check_batch_size, check_num_workers
from .backbones import Backbone
from .cache import FeatureCache, Locations, model_key
from .cache.index import new_owner
from .cache.pending import FLUSH_BYTES, PendingRows
from .data import BadFile, decode_bytes, draft_description
from .data.decode import max_pixels
from .engines import engine_signature, openvino_forward, resolve_engine
from .errors import UsageError
from .gpu_decode import DEVICE_VIEW, DeviceCleanBatches, device_path_applies
from .preprocess import autocast, decoder_id, preprocessing_signature, resolve_precision
from .views import AugmentedTransform, CleanTransform, View, ViewsOfFiles, augmented_views, clean_view, view_seed

CUT_POOLED = "pooled"
CLAIM_SECONDS = 60.0  # a claim on images not refreshed for this long is taken to be a dead process's
CLAIM_POLL_SECONDS = 0.5  # how often a process waiting for another's images looks again

__all__ = [  # the views are defined in .views and re-exported here, where callers have always found them
    "CUT_POOLED", "FLUSH_BYTES", "AugmentedTransform", "CleanTransform", "Cut", "Decoder", "FeatureResult", "View",
    "augmented_views", "clean_view", "default_num_workers", "extract_features", "extract_views",
    "feature_description", "forward_batch", "view_seed",
]


@dataclass
class FeatureResult:
    """Features of a list of images.

    Attributes:
        features: float32 ``(n, dim)`` (``(n, n_views, dim)`` from :func:`extract_views`); rows of
            images that failed are zero.
        ok: bool ``(n,)``; False where the image could not be read or decoded.
        bad_files: one :class:`BadFile` per failed image.
        n_computed / n_cached: how many rows needed a backbone forward / came from the cache.
    """

    features: np.ndarray
    ok: np.ndarray
    bad_files: list[BadFile] = field(default_factory=list)
    n_computed: int = 0
    n_cached: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    model_key: str = ""  # of the first view
    precision: str = ""
    locations: Locations | None = None  # where each (view, image) row lives in the cache
    dim: int = 0
    engine: str = "torch"  # what ran the forward of the rows computed (headstart.engines)


def default_num_workers() -> int:
    """Decoding workers: one per spare core, at least one, at most eight; under torchrun the node's cores are
    shared by its ``$LOCAL_WORLD_SIZE`` processes (each rank decodes with its part)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    cores = cores // max(1, int(ranks)) if ranks.isdigit() else cores
    return max(1, min(8, cores - 1))


def feature_description(backbone: Backbone, precision: str, cut: str = CUT_POOLED,
                        dtype: str = "float16", view: dict[str, Any] | None = None,
                        min_size: Sequence[int] | None = None, engine: str = "torch") -> dict[str, Any]:
    """What, besides the image, determines a cached feature row; hashed into the model key.

    The clean view's description has no ``view`` entry, so its keys are those of plain extraction.
    A view decoded at reduced scale for ``min_size`` (:attr:`View.min_size`) has a ``draft`` entry:
    its pixels differ from a full decode's for large JPEGs, so the two never share rows. An engine
    other than PyTorch (:mod:`headstart.engines`) has an ``engine`` entry.
    """
    description = {
        "backbone": backbone.name,
        "weights_digest": backbone.weights_digest,
        "cut": cut,
        "preprocessing": preprocessing_signature(backbone.data_config, precision),
        "storage_dtype": dtype,
    }
    if view is not None and view.get("view") != "clean":
        description["view"] = view
    if min_size is not None:
        description["draft"] = draft_description(min_size)
    if (signature := engine_signature(engine)) is not None:
        description["engine"] = signature
    return description


class Cut:
    """Where features are taken: a name for cache keys, ``forward(model, x)``, and the flat row length.

    The default (``None`` in the functions below) is the pooled feature vector, ``model(x)``.
    """

    def __init__(self, name: str, forward: Any, dim: int) -> None:
        self.name = name
        self.forward = forward
        self.dim = dim


def forward_batch(backbone: Backbone, batch: torch.Tensor, device: torch.device, precision: str,
                  cut: Cut | None = None) -> np.ndarray:
    """Features of one preprocessed batch as float32 numpy ``(n, dim)`` (pooled, or flattened at ``cut``)."""
    x = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device, precision):
        out = backbone.model(x) if cut is None else cut.forward(backbone.model, x)
    return out.float().reshape(len(out), -1).cpu().numpy()


@dataclass(frozen=True)
class Decoder:
    """How file bytes become an RGB image, and the name its permanent failures are remembered under in
    the cache (a decoder with a new name tries again the images an older one could not read).

    ``decode(data, path)`` raises :class:`~headstart.data.ImageDecodeError`; it must be picklable (it
    runs in DataLoader workers). A decode that also takes ``min_size`` is given each view's
    :attr:`View.min_size` (see :func:`~headstart.data.decode_bytes`); one that does not decodes in full.
    """

    decode: Callable[..., Any] = decode_bytes
    name: str = field(default_factory=decoder_id)


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def extract_features(
    backbone: Backbone,
    paths: Sequence[str | os.PathLike[str]],
    *,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    precision: str = "auto",
    device: str | torch.device | None = None,
    flush_every: int = 256,
    progress: bool = True,
    desc: str = "features",
    engine: str | None = None,
    load: bool = True,
    full_batches: bool = False,
) -> FeatureResult:
    """Pooled backbone features of every image, computing only what the cache lacks.

    Args:
        backbone: from :func:`~headstart.backbones.create_backbone`.
        paths: image files.
        cache: feature cache; ``None`` opens the default one.
        batch_size: images per forward pass.
        num_workers: decoding processes (``0`` decodes in this process); default one per spare core.
        precision: ``auto`` (bf16 on AMX CPUs and CUDA), ``fp32``, ``bf16`` or ``fp16``.
        device: ``cpu``, ``cuda`` ...; default CUDA when available.
        flush_every: write new rows to the cache after this many images, all their views (and on
            interruption).
        progress: show a progress bar on stderr.
        engine: ``auto``, ``torch`` or ``openvino`` (:mod:`headstart.engines`); default the backbone's own.
        load: read the features back; ``False`` only fills the cache (``features`` is then ``(n, 0)``),
            so memory stays flat however many images there are.
        full_batches: forward every batch at ``batch_size`` rows (a short one padded): the numbers then do
            not depend on how the images fell into batches, so shares computed by several processes
            (``torchrun``) equal one process's bit for bit; at most ``batch_size - 1`` extra rows per call.

    Returns:
        FeatureResult with ``features`` of shape ``(n, dim)``; ``n_computed == 0`` on a warm cache.
    """
    result = extract_views(backbone, paths, [clean_view(backbone.data_config)], cache=cache,
                           batch_size=batch_size, num_workers=num_workers, precision=precision, device=device,
                           flush_every=flush_every, progress=progress, desc=desc, engine=engine, load=load,
                           full_batches=full_batches)
    result.features = result.features[:, 0]
    return result


def extract_views(
    backbone: Backbone,
    paths: Sequence[str | os.PathLike[str]],
    views: Sequence[View],
    *,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    precision: str = "auto",
    device: str | torch.device | None = None,
    flush_every: int = 256,
    progress: bool = True,
    desc: str = "features",
    cut: Cut | None = None,
    load: bool = True,
    decoder: Decoder | None = None,
    engine: str | None = None,
    full_batches: bool = False,
) -> FeatureResult:
    """Features of several views of every image (e.g. clean + K augmented), through the cache.

    With ``cut``, rows are the flattened activations at that cut point instead of pooled features.
    With ``load=False`` nothing is read back: ``result.locations`` says where each image's views
    live (verified: see :meth:`FeatureCache.locate_verified`), for
    :meth:`FeatureCache.read_locations` on demand (memory-mapped, batch by batch).

    Each image is read and decoded once for all of its missing views. Arguments as in
    :func:`extract_features`; ``batch_size`` counts forwarded views; ``decoder`` defaults to
    :func:`~headstart.data.decode_bytes` under :func:`~headstart.preprocess.decoder_id`; ``engine``
    (``auto``, ``torch``, ``openvino``; :mod:`headstart.engines`) defaults to the backbone's own. ``full_batches``
    as in :func:`extract_features`.

    Returns:
        FeatureResult with ``features`` of shape ``(n, len(views), dim)``; ``n_computed`` counts views.
    """
    _check_arguments(batch_size, num_workers, views)
    if cache is None:
        with FeatureCache() as own:
            return extract_views(backbone, paths, views, cache=own, batch_size=batch_size,
                                 num_workers=num_workers, precision=precision, device=device,
                                 flush_every=flush_every, progress=progress, desc=desc, cut=cut, load=load,
                                 decoder=decoder, engine=engine, full_batches=full_batches)
    start = time.perf_counter()
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(precision, device)
    engine = "torch" if cut is not None else resolve_engine(engine or getattr(backbone, "engine", "auto"),
                                                             device, precision)
    if device_path_applies(device, views, backbone.data_config, decoder is None, cut):
        views = [View(CleanTransform(backbone.data_config), dict(DEVICE_VIEW))]  # decoded on the GPU: own key
    job = _Job(backbone, [Path(p) for p in paths], views, cache, decoder or Decoder(), device, precision, engine,
               cut, batch_size, num_workers, flush_every, progress, desc, full_batches)
    image_keys, bad = cache.image_keys(job.paths)
    filled = _fill(job, image_keys, bad)
    ok = filled.located.found.all(axis=0)
    n = len(job.paths)
    features = cache.read_locations(filled.located, job.dim) if load else np.zeros((n, len(views), 0), np.float32)
    features[~ok] = 0.0  # an image with only some of its views cached has none
    seconds = time.perf_counter() - start
    return FeatureResult(
        features=features, ok=ok, bad_files=_bad_files(job.paths, image_keys, bad, ok, filled.failures),
        n_computed=filled.n_computed, n_cached=filled.n_cached, seconds=seconds,
        images_per_second=n / seconds if seconds > 0 else 0.0, model_key=job.keys[0], precision=job.precision,
        locations=filled.located, dim=job.dim, engine=job.engine,
    )


def _check_arguments(batch_size: Any, num_workers: Any, views: Sequence[View]) -> None:
    check_batch_size(batch_size)
    check_num_workers(num_workers)
    max_pixels()  # a bad $HEADSTART_MAX_PIXELS stops here, before any work
    if not views:
        raise UsageError("extract_views needs at least one view")


@dataclass
class _Job:
    """One extraction's settings, shared by its steps; the views' model keys are registered on creation."""

    backbone: Backbone
    paths: list[Path]
    views: Sequence[View]
    cache: FeatureCache
    decoder: Decoder
    device: torch.device
    precision: str
    engine: str  # resolved: "torch" or "openvino"
    cut: Cut | None
    batch_size: int
    num_workers: int | None
    flush_every: int
    progress: bool
    desc: str
    full_batches: bool = False  # every forward gets batch_size rows (padded): numbers independent of batching
    dim: int = field(init=False)
    keys: list[str] = field(init=False)
    forward: Callable[[torch.Tensor], np.ndarray] | None = field(init=False, default=None)
    owner: str = field(init=False, default_factory=new_owner)  # this job's claims
    claim_key: str = field(init=False)
    waited: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.dim = self.backbone.num_features if self.cut is None else self.cut.dim
        cut_name = CUT_POOLED if self.cut is None else self.cut.name
        models = []
        for view in self.views:
            description = feature_description(self.backbone, self.precision, cut=cut_name,
                                              dtype=self.cache.dtype.name, view=view.description,
                                              min_size=view.min_size, engine=self.engine)
            models.append((model_key(description), description, self.dim))
        self.keys = [key for key, _, _ in models]
        self.claim_key = hashlib.sha256(" ".join(self.keys).encode()).hexdigest()[:32]
        self.cache.register_models(models)


@dataclass
class _Filled:
    """What :func:`_fill` leaves: the cache's answer for every image, and the counts."""

    located: Locations  # verified, after computing
    n_cached: int  # rows found before computing
    n_computed: int
    failures: dict[str, str]  # known decode failures among the images still incomplete


def _fill(job: _Job, image_keys: list[str | None], bad: dict[int, str]) -> _Filled:
    """Compute every missing row that can be computed, so the cache holds all it can of these images.

    ``image_keys`` and ``bad`` are updated: a file whose bytes changed since hashing is filed under
    what was decoded, a file that failed gets its reason. Usually one pass; another only for what
    the first could not settle: a duplicate of a file that changed meanwhile still needs the old
    content, or a shard vanished meanwhile (its rows come back missing from ``locate_verified``).
    """
    located = job.cache.locate_verified(job.keys, image_keys, job.dim)  # no Python work per view when warm
    n_cached = int(located.found.sum())
    n_computed = 0
    while True:
        missing = np.flatnonzero(~located.found.all(axis=0)).tolist()
        failures = job.cache.failures([k for i in missing if (k := image_keys[i]) is not None], job.decoder.name)
        todo: dict[str, tuple[int, list[int]]] = {}  # content -> (first path index, missing views)
        for i in missing:
            k = image_keys[i]
            if k is not None and i not in bad and k not in failures and k not in todo:
                todo[k] = (i, np.flatnonzero(~located.found[:, i]).tolist())
        if not todo:  # rows another process computed meanwhile count as cached
            return _Filled(located, max(n_cached, int(located.found.sum()) - n_computed), n_computed, failures)
        mine = _claim(job, todo)
        if mine:
            n_computed += _compute_todo(job, mine, image_keys, bad)
        else:  # another process is computing all of them: look again soon
            time.sleep(CLAIM_POLL_SECONDS)
        located = job.cache.locate_verified(job.keys, image_keys, job.dim)


def _claim(job: _Job, todo: dict[str, tuple[int, list[int]]]) -> dict[str, tuple[int, list[int]]]:
    """The part of ``todo`` this process claims: the images no other live process is computing and none
    has stored since ``todo`` was made (so processes extracting the same images into one cache compute
    each about once)."""
    claimed = job.cache.claim(job.claim_key, list(todo), job.owner, CLAIM_SECONDS)
    stored = job.cache.locate(job.keys, claimed).found.all(axis=0)  # released by a writer meanwhile
    mine = {k: todo[k] for k, done in zip(claimed, stored.tolist()) if not done}
    if len(mine) < len(claimed):
        job.cache.release(job.owner, [k for k in claimed if k not in mine])
    if len(claimed) < len(todo) and job.progress and not job.waited:
        job.waited = True
        print(f"{job.desc}: {len(todo) - len(claimed)} images are being computed by another process on this cache; "
              "waiting for them", file=sys.stderr, flush=True)
    return mine


def _compute_todo(job: _Job, todo: dict[str, tuple[int, list[int]]], image_keys: list[str | None],
                  bad: dict[int, str]) -> int:
    """Compute the ``todo`` images and apply the outcome to ``image_keys``/``bad``; views forwarded."""
    outcome = _compute_missing(job, todo)
    for i, k in enumerate(image_keys):  # a duplicate of a failed file's content fails alike ...
        if k in outcome.failed and (k not in outcome.renamed or i == todo[k][0]):  # ... unless that file changed
            bad[i] = outcome.failed[k]
    for k, actual in outcome.renamed.items():  # the file changed after hashing: use what was really decoded,
        image_keys[todo[k][0]] = actual  # for that path only (a duplicate of the old content keeps it)
    return outcome.computed


def _bad_files(paths: list[Path], image_keys: list[str | None], bad: dict[int, str], ok: np.ndarray,
               failures: dict[str, str]) -> list[BadFile]:
    """One :class:`BadFile` per image without features, with the most specific reason known."""
    for i in np.flatnonzero(~ok).tolist():
        k = image_keys[i]
        if k is not None and i not in bad:
            bad[i] = failures.get(k, "no features (decoding failed in an earlier step)")
    return [BadFile(str(paths[i]), reason) for i, reason in sorted(bad.items()) if not ok[i]]


@dataclass
class _Outcome:
    """What computing the missing views found out, by expected image key."""

    computed: int = 0  # views forwarded and kept
    renamed: dict[str, str] = field(default_factory=dict)  # expected hash -> hash actually decoded
    failed: dict[str, str] = field(default_factory=dict)  # expected hash -> why it has no features


def _compute_missing(job: _Job, todo: dict[str, tuple[int, list[int]]]) -> _Outcome:
    """Decode and forward the missing views of the ``todo`` images, flushing to the cache as it goes
    (every ``flush_every`` images, and on success and interruption alike: computed rows are kept)."""
    order = list(todo.items())  # (expected image key, (path index, missing views))
    loader = _loader(job, order)
    job.forward = _forward_function(job)
    pending = PendingRows(job.cache, job.decoder.name, job.dim * job.cache.dtype.itemsize, job.owner)
    outcome = _Outcome()
    bar = tqdm(total=len(order), desc=job.desc, unit="img", file=sys.stderr, disable=not job.progress, leave=False)
    try:
        for items in loader:
            _forward_items(job, order, items, pending, outcome)
            bar.update(len(items))
            pending.images += len(items)
            if pending.due(job.flush_every):
                pending.flush()
    finally:
        pending.flush()
        job.cache.release(job.owner)  # what is left (failed images) is free for others to try
        bar.close()
    return outcome


def _forward_function(job: _Job) -> Callable[[torch.Tensor], np.ndarray]:
    """``batch -> (n, dim)`` features in the job's engine (the PyTorch model is built only for PyTorch,
    or to convert it the first time for another engine)."""
    if job.engine == "openvino":
        return openvino_forward(job.backbone, job.precision, job.cache.root / "engines")
    model = job.backbone.model.to(job.device).eval()
    model.to(memory_format=torch.channels_last)
    return lambda batch: forward_batch(job.backbone, batch, job.device, job.precision, job.cut)


def _loader(job: _Job, order: list[tuple[str, tuple[int, list[int]]]]) -> Any:
    """Batches of decoded items, as many images per batch as keep ``batch_size`` views."""
    if job.views[0].description == DEVICE_VIEW:  # CUDA: decoded and resized on the device
        return DeviceCleanBatches([job.paths[i] for _, (i, _) in order], job.backbone.data_config, job.batch_size,
                                  job.device)
    dataset = ViewsOfFiles([job.paths[i] for _, (i, _) in order], [m for _, (_, m) in order], job.views,
                            job.decoder.decode)
    per_image = max(len(m) for _, (_, m) in order)
    images_per_batch = max(1, job.batch_size // per_image)
    n_batches = (len(order) + images_per_batch - 1) // images_per_batch
    workers = default_num_workers() if job.num_workers is None else job.num_workers
    workers = min(workers, max(0, n_batches - 1))
    return DataLoader(dataset, batch_size=images_per_batch, num_workers=workers, shuffle=False,
                      collate_fn=_collate, pin_memory=False)


def _forward_items(job: _Job, order: list[tuple[str, tuple[int, list[int]]]], items: list[dict[str, Any]],
                   pending: PendingRows, outcome: _Outcome) -> None:
    """One batch of decoded items through the backbone; rows to ``pending``, findings to ``outcome``."""
    tensors, owners = [], []
    for item in items:
        expected, (path_index, _) = order[item["index"]]
        actual = item["digest"] or expected
        if actual != expected:
            outcome.renamed[expected] = actual
            job.cache.remember_hash(job.paths[path_index], actual)
        if item["error"]:
            outcome.failed[expected] = item["error"]
            if item["permanent"]:
                pending.permanent[actual] = item["error"]
            continue
        tensors.append(item["tensors"])
        owners.extend((expected, actual, v) for v in item["views"])
    if not tensors:
        return
    out = job.forward(_padded(torch.cat(tensors), job.batch_size if job.full_batches else 0))[:len(owners)]
    finite = np.isfinite(out).all(axis=1)
    for row, (expected, actual, v) in enumerate(owners):
        if finite[row]:
            pending.rows.append((job.keys[v], actual, out[row:row + 1]))
            outcome.computed += 1
        else:
            outcome.failed[expected] = (f"the backbone gave non-finite features in {job.precision} "
                                        "(try --precision fp32)")


def _padded(batch: torch.Tensor, size: int) -> torch.Tensor:
    """``batch`` with its last row repeated up to ``size`` rows. A kernel may pick its algorithm by the batch
    size (oneDNN on CPUs does), so rows forwarded in batches of different sizes can differ in the last bits;
    forwarded at one size they do not depend on which images share their batch, or on where a share ends."""
    if len(batch) >= size:
        return batch
    return torch.cat([batch, batch[-1:].expand(size - len(batch), *batch.shape[1:])])
