"""Run a frozen backbone over images once, through the feature cache.

:func:`extract_features` hashes each file, looks the hashes up in the :class:`~headstart.cache.FeatureCache`,
decodes and forwards only the images it lacks (in DataLoader worker processes, batched, bf16 and
channels-last on CPUs with AMX), and flushes new rows to the cache every ``flush_every`` images and on
any interruption, so nothing computed is lost and a re-run resumes where it stopped.

:func:`extract_views` does the same for several *views* of each image in one decoding pass: the clean
view and K augmented views (an augmented feature cache). Each view has its own cache key (augmentation
config + view index), and an augmented view's randomness is seeded from (seed, image content, view
index) alone, so the same view is reproduced whatever the number of workers or the image order.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .backbones import Backbone
from .cache import FeatureCache, Locations, MissingShardError, model_key
from .data import BadFile, ImageDecodeError, decode_bytes
from .errors import UsageError
from .preprocess import decoder_id, eval_transform, preprocessing_signature, resolve_precision

CUT_POOLED = "pooled"
FLUSH_BYTES = 256 << 20  # flush pending rows at this size even before ``flush_every`` images


class View:
    """How one view of an image is made: decoded RGB image (+ its content key) -> normalised tensor.

    Args:
        transform: ``transform(image, image_key) -> float tensor (3, H, W)``; must be picklable
            (it runs in DataLoader workers).
        description: what, besides backbone and preprocessing, identifies this view in cache keys.
    """

    def __init__(self, transform: Any, description: dict[str, Any]) -> None:
        self.transform = transform
        self.description = description


class CleanTransform:
    """The backbone's own evaluation preprocessing (resize, centre crop, normalise)."""

    def __init__(self, data_config: dict[str, Any]) -> None:
        self.data_config = data_config
        self._transform = None

    def __call__(self, image: Any, image_key: str) -> torch.Tensor:
        if self._transform is None:
            self._transform = eval_transform(self.data_config)
        return self._transform(image)

    def __getstate__(self) -> dict[str, Any]:
        return {"data_config": self.data_config, "_transform": None}


class AugmentedTransform:
    """One augmented view: ``pipeline(image, generator)`` -> uint8 (3, H, W), then the backbone's mean/std.

    The generator is seeded from ``(seed, image content hash, view index)``.
    """

    def __init__(self, pipeline: Any, data_config: dict[str, Any], seed: int, view: int) -> None:
        self.pipeline = pipeline
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(data_config["std"], dtype=torch.float32).view(3, 1, 1)
        self.seed = seed
        self.view = view

    def __call__(self, image: Any, image_key: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(view_seed(self.seed, image_key, self.view))
        out = self.pipeline(image, generator=generator)
        return (out.float() / 255.0 - self.mean) / self.std


def view_seed(seed: int, image_key: str, view: int) -> int:
    """A 63-bit seed that depends only on the run seed, the image's content and the view index."""
    return int(hashlib.sha256(f"{seed}|{image_key}|{view}".encode()).hexdigest()[:15], 16)


def clean_view(data_config: dict[str, Any]) -> View:
    return View(CleanTransform(data_config), {"view": "clean"})


def augmented_views(pipeline: Any, data_config: dict[str, Any], n_views: int, seed: int = 0) -> list[View]:
    """``n_views`` augmented views; view ``v`` has the same cache key in any run with the same pipeline and seed."""
    config = pipeline.config()
    return [View(AugmentedTransform(pipeline, data_config, seed, v),
                 {"view": "augmented", "augment": config, "seed": seed, "index": v}) for v in range(n_views)]


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


def default_num_workers() -> int:
    """Decoding workers: one per spare core, at least one, at most eight."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


def feature_description(backbone: Backbone, precision: str, cut: str = CUT_POOLED,
                        dtype: str = "float16", view: dict[str, Any] | None = None) -> dict[str, Any]:
    """What, besides the image, determines a cached feature row; hashed into the model key.

    The clean view's description has no ``view`` entry, so its keys are those of plain extraction.
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
    return description


@contextlib.contextmanager
def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


class Cut:
    """Where features are taken: a name for cache keys, ``forward(model, x)``, and the flat row length.

    The default (``None`` in the functions below) is the pooled feature vector, ``model(x)``.
    """

    def __init__(self, name: str, forward: Any, dim: int) -> None:
        self.name = name
        self.forward = forward
        self.dim = dim


def forward_batches(backbone: Backbone, batch: torch.Tensor, device: torch.device, precision: str,
                    cut: Cut | None = None) -> np.ndarray:
    """Features of a preprocessed batch as float32 numpy ``(n, dim)`` (pooled, or flattened at ``cut``)."""
    x = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), _autocast(device, precision):
        out = backbone.model(x) if cut is None else cut.forward(backbone.model, x)
    return out.float().reshape(len(out), -1).cpu().numpy()


class _ViewsOfFiles(Dataset):
    """Item ``i``: every requested view of file ``i``, from one read and one decode.

    The same bytes are hashed and decoded, so a feature is always filed under the hash of the content
    it was computed from, even if the file changes meanwhile.
    """

    def __init__(self, paths: Sequence[Path], wanted: Sequence[Sequence[int]], views: Sequence[View],
                 input_size: Sequence[int]) -> None:
        self.paths = list(paths)
        self.wanted = [list(w) for w in wanted]
        self.transforms = [v.transform for v in views]
        self.input_size = tuple(input_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        item: dict[str, Any] = {"index": i, "digest": "", "error": "", "permanent": False,
                                "views": self.wanted[i], "tensors": None}
        try:
            data = path.read_bytes()
        except OSError as exc:
            item["error"] = "file not found" if isinstance(exc, FileNotFoundError) else f"cannot read file ({exc})"
            return item
        item["digest"] = hashlib.sha256(data).hexdigest()
        try:
            image = decode_bytes(data, path)
            item["tensors"] = torch.stack([self.transforms[v](image, item["digest"]) for v in self.wanted[i]])
        except ImageDecodeError as exc:
            item["error"], item["permanent"] = str(exc).removeprefix(f"{path}: "), exc.permanent
        except Exception as exc:  # a transform failure on a strange image must not kill the run
            item["error"] = f"cannot preprocess image ({type(exc).__name__}: {exc})"
        return item


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

    Returns:
        FeatureResult with ``features`` of shape ``(n, dim)``; ``n_computed == 0`` on a warm cache.
    """
    result = extract_views(backbone, paths, [clean_view(backbone.data_config)], cache=cache,
                           batch_size=batch_size, num_workers=num_workers, precision=precision, device=device,
                           flush_every=flush_every, progress=progress, desc=desc)
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
) -> FeatureResult:
    """Features of several views of every image (e.g. clean + K augmented), through the cache.

    With ``cut``, rows are the flattened activations at that cut point instead of pooled features.
    With ``load=False`` nothing is read back: ``result.locations`` says where each image's views
    live, for :meth:`FeatureCache.read_locations` on demand (memory-mapped, batch by batch).

    Each image is read and decoded once for all of its missing views. Arguments as in
    :func:`extract_features`; ``batch_size`` counts forwarded views.

    Returns:
        FeatureResult with ``features`` of shape ``(n, len(views), dim)``; ``n_computed`` counts views.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise UsageError(f"batch_size must be a positive integer; got {batch_size!r}")
    if num_workers is not None and not (isinstance(num_workers, int) and num_workers >= 0):
        raise UsageError(f"num_workers must be an integer >= 0 (0 decodes in this process); got {num_workers!r}")
    if not views:
        raise UsageError("extract_views needs at least one view")
    if cache is None:
        with FeatureCache() as own:
            return extract_views(backbone, paths, views, cache=own, batch_size=batch_size,
                                 num_workers=num_workers, precision=precision, device=device,
                                 flush_every=flush_every, progress=progress, desc=desc, cut=cut, load=load)
    start = time.perf_counter()
    paths = [Path(p) for p in paths]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    dim = backbone.num_features if cut is None else cut.dim
    keys = []
    models = []
    for view in views:
        description = feature_description(backbone, precision, cut=CUT_POOLED if cut is None else cut.name,
                                          dtype=cache.dtype.name, view=view.description)
        keys.append(model_key(description))
        models.append((keys[-1], description, dim))
    cache.register_models(models)
    decoder = decoder_id()
    n, n_views = len(paths), len(views)
    image_keys, bad = cache.image_keys(paths)
    n_computed = 0
    n_cached: int | None = None
    for _attempt in range(3):  # a missing shard drops its rows; the next pass recomputes them
        located = cache.locate(keys, image_keys)  # arrays (n_views, n): no Python work per view on a warm cache
        if not cache.verify(located, dim):  # every vanished shard is forgotten at once; recompute its rows
            located = cache.locate(keys, image_keys)
        if n_cached is None:
            n_cached = int(located.found.sum())
        ok = located.found.all(axis=0)
        known_failures = cache.failures([image_keys[i] for i in np.flatnonzero(~ok)
                                         if image_keys[i] is not None], decoder)
        todo: dict[str, tuple[int, list[int]]] = {}  # content -> (first path index, missing views)
        for i in np.flatnonzero(~ok).tolist():
            k = image_keys[i]
            if k is None or k in known_failures or k in todo:
                continue
            todo[k] = (i, np.flatnonzero(~located.found[:, i]).tolist())
        if todo:
            computed, renamed, failed = _compute_missing(
                backbone, paths, todo, views, keys, cache, decoder, device, precision, batch_size, num_workers,
                flush_every, progress, desc, cut)
            n_computed += computed
            for i, k in enumerate(image_keys):  # a duplicate of a failed file's content fails alike ...
                if k in failed and (k not in renamed or i == todo[k][0]):  # ... unless that file had changed
                    bad[i] = failed[k]
            for k, actual in renamed.items():  # the file changed after hashing: use what was really decoded,
                image_keys[todo[k][0]] = actual  # for that path only (a duplicate of the old content keeps it)
            if any(k in renamed and i not in bad for i, k in enumerate(image_keys)):
                continue  # those duplicates still need the old content's features: one more pass
            located = cache.locate(keys, image_keys)
            if not cache.verify(located, dim):  # pragma: no cover - a shard vanished while we computed
                continue
            ok = located.found.all(axis=0)
            known_failures = cache.failures([image_keys[i] for i in np.flatnonzero(~ok)
                                             if image_keys[i] is not None], decoder)
        if not load:
            features = np.zeros((n, n_views, 0), dtype=np.float32)
            break
        try:
            features = cache.read_locations(located, dim)
        except MissingShardError:
            continue
        break
    else:  # pragma: no cover - only if shards vanish again and again while we run
        raise MissingShardError("several")
    if not ok.all():
        features[~ok] = 0.0  # an image with only some of its views cached has none
    for i in np.flatnonzero(~ok).tolist():
        k = image_keys[i]
        if k is not None and i not in bad:
            bad[i] = known_failures.get(k, "no features (decoding failed in an earlier step)")
    bad_files = [BadFile(str(paths[i]), reason) for i, reason in sorted(bad.items()) if not ok[i]]
    seconds = time.perf_counter() - start
    return FeatureResult(
        features=features, ok=ok, bad_files=bad_files, n_computed=n_computed, n_cached=n_cached or 0,
        seconds=seconds, images_per_second=n / seconds if seconds > 0 else 0.0, model_key=keys[0],
        precision=precision, locations=located, dim=dim,
    )


def _compute_missing(backbone: Backbone, paths: list[Path], todo: dict[str, tuple[int, list[int]]],
                     views: Sequence[View], keys: Sequence[str], cache: FeatureCache, decoder: str,
                     device: torch.device, precision: str, batch_size: int, num_workers: int | None,
                     flush_every: int, progress: bool, desc: str,
                     cut: Cut | None = None) -> tuple[int, dict[str, str], dict[str, str]]:
    """Decode and forward the missing views of the ``todo`` images, flushing to the cache as it goes.

    Returns:
        (views forwarded, {expected hash: hash actually decoded}, {expected hash: failure reason}).
    """
    order = list(todo.items())  # (expected image key, (path index, missing views))
    dataset = _ViewsOfFiles([paths[i] for _, (i, _) in order], [m for _, (_, m) in order], views,
                            backbone.data_config["input_size"])
    per_image = max(len(m) for _, (_, m) in order)
    images_per_batch = max(1, batch_size // per_image)
    n_batches = (len(order) + images_per_batch - 1) // images_per_batch
    workers = default_num_workers() if num_workers is None else num_workers
    workers = min(workers, max(0, n_batches - 1))
    loader = DataLoader(dataset, batch_size=images_per_batch, num_workers=workers, shuffle=False,
                        collate_fn=_collate, pin_memory=False)
    model = backbone.model.to(device).eval()
    model.to(memory_format=torch.channels_last)
    pending: list[tuple[str, str, np.ndarray]] = []  # (model key, image key, row), image by image
    permanent: dict[str, str] = {}
    renamed: dict[str, str] = {}
    failed: dict[str, str] = {}
    computed = 0
    pending_images = 0
    dim = backbone.num_features if cut is None else cut.dim

    def flush() -> None:  # one shard holds every view of these images, so reading them back is one slice
        if pending:
            cache.write([k for k, _, _ in pending], [name for _, name, _ in pending],
                        np.concatenate([row for _, _, row in pending]))
            pending.clear()
        cache.record_failures(permanent, decoder)
        permanent.clear()

    bar = tqdm(total=len(order), desc=desc, unit="img", file=sys.stderr, disable=not progress, leave=False)
    try:
        for items in loader:
            tensors, owners = [], []
            for item in items:
                expected, (path_index, _) = order[item["index"]]
                actual = item["digest"] or expected
                if actual != expected:
                    renamed[expected] = actual
                    cache.remember_hash(paths[path_index], actual)
                if item["error"]:
                    failed[expected] = item["error"]
                    if item["permanent"]:
                        permanent[actual] = item["error"]
                    continue
                tensors.append(item["tensors"])
                owners.extend((expected, actual, v) for v in item["views"])
            if tensors:
                out = forward_batches(backbone, torch.cat(tensors), device, precision, cut)
                finite = np.isfinite(out).all(axis=1)
                for row, (expected, actual, v) in enumerate(owners):
                    if finite[row]:
                        pending.append((keys[v], actual, out[row:row + 1]))
                        computed += 1
                    else:
                        failed[expected] = (f"the backbone gave non-finite features in {precision} "
                                            "(try --precision fp32)")
            bar.update(len(items))
            pending_images += len(items)
            pending_bytes = len(pending) * dim * cache.dtype.itemsize
            if pending_images >= flush_every or pending_bytes >= FLUSH_BYTES:  # big shards read fast
                flush()
                pending_images = 0
    finally:
        flush()  # on success and on interruption alike: computed rows are kept
        bar.close()
    return computed, renamed, failed
