"""What fine-tuning trains on: cached activations at the cut, or images decoded and augmented each epoch.

:func:`cut_data` computes (or reads) the frozen stages' output once per view and image and serves
batches from the memory-mapped cache; :func:`image_data` drops unusable images and serves a fresh
augmented view per image per epoch from worker processes. Both give the loop the same interface.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .backbones import Backbone
from .cache import FeatureCache, Locations
from .data import ImageSet
from .features import Cut, View, default_num_workers, extract_views
from .stages import StagePlan, stage_plan

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class CutBatches:
    """Batches of cached cut activations: a random view per image per epoch, read memory-mapped."""

    def __init__(self, cache: FeatureCache, locations: Locations, shape: Sequence[int],
                 labels: np.ndarray) -> None:
        self.cache = cache
        self.locations = locations  # (n_views, n_images)
        self.shape = tuple(shape)
        self.labels = labels
        self.dim = int(np.prod(shape))

    def epoch(self, order: np.ndarray, views: np.ndarray, batch_size: int, skip: int = 0,
              part: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``batch_size`` images in ``order`` from batch ``skip`` on; of each, rank ``part[0]`` of
        ``part[1]`` gets every ``part[1]``-th image (:func:`rank_batches`), possibly none."""
        for b, start in enumerate(range(0, len(order), batch_size)):
            if b < skip:
                continue
            idx = order[start:start + batch_size][part[0]::part[1]]
            if not len(idx):  # a last batch smaller than the number of ranks: this rank's part is empty
                yield torch.zeros((0, *self.shape)), torch.zeros(0, dtype=torch.int64)
                continue
            rows = self.cache.read_locations(self.locations.pick(idx, views[idx]), self.dim)
            x = torch.from_numpy(rows).view(len(idx), *self.shape)
            yield x, torch.from_numpy(self.labels[idx])

    def in_order(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every image once, in order, from its clean view (view 0)."""
        n = len(self.labels)
        return self.epoch(np.arange(n), np.zeros(n, dtype=int), batch_size)


class AugmentedImages(torch.utils.data.Dataset):
    """Training images decoded and augmented in worker processes.

    Items are addressed as ``(epoch_tag, index)``: the augmentation of an image is seeded by both, so
    persistent workers (which keep their own copy of this object) still produce each epoch's own views.
    """

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, transform: Any) -> None:
        self.paths, self.labels, self.transform = list(paths), labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int] | int) -> tuple[torch.Tensor, int]:
        from .data import decode_image

        tag, i = item if isinstance(item, tuple) else (0, item)
        image = decode_image(self.paths[i])
        return self.transform(image, f"{tag}|{i}"), int(self.labels[i])


def rank_batches(order: Sequence[int], batch_size: int, skip: int = 0,
                 part: tuple[int, int] = (0, 1)) -> list[list[int]]:
    """The batches of ``order`` from batch ``skip`` on, each cut to rank ``part[0]`` of ``part[1]``'s share:
    every ``part[1]``-th image from its ``part[0]``-th, as ``DistributedSampler`` deals them; the ranks'
    shares of a batch make up the one batch a single process trains on."""
    return [[int(i) for i in order[start:start + batch_size][part[0]::part[1]]]
            for start in range(skip * batch_size, len(order), batch_size)]


class EpochSampler(torch.utils.data.Sampler):
    """A batch sampler: yields batches of ``(epoch_tag, index)`` set before each epoch (lives in the main
    process); a batch may be empty (this rank's share of a small last batch)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def set(self, tag: int, batches: Sequence[Sequence[int]]) -> None:
        self.batches = [[(tag, int(i)) for i in batch] for batch in batches]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stacked images and labels; None for an empty batch (the loop makes it a zero-size batch)."""
    if not items:
        return None
    return torch.utils.data.default_collate(items)


@dataclass
class CutData:
    """Training and validation batches from the cut cache (``n_frozen >= 1`` with ``cache_cut``)."""

    train: CutBatches
    val: CutBatches | None  # None: no validation set, or no usable validation image
    val_index: np.ndarray | None  # which images of the validation set ``val`` holds
    n_views: int
    bad_files: list[Any]
    train_paths: list[Path]  # hashed into the checkpoint's settings
    cut_seconds: float  # time spent computing the cut cache (0 when it was warm)
    from_cut = True

    @property
    def labels(self) -> np.ndarray:
        return self.train.labels

    def epoch(self, order: np.ndarray, views: np.ndarray, batch_size: int, skip: int, tag: int,
              part: tuple[int, int] = (0, 1)) -> Batches:
        """One epoch's batches in ``order`` (view ``views[i]`` of image i), from batch ``skip`` on; this rank's
        share of each (``part``: rank, ranks)."""
        return self.train.epoch(order, views, batch_size, skip=skip, part=part)

    def validation(self, batch_size: int) -> Batches | None:
        return self.val.in_order(batch_size) if self.val is not None else None

    def scored_validation(self, batch_size: int) -> Batches | None:
        """Validation batches whose probabilities the result returns (with :attr:`val_index`)."""
        return self.validation(batch_size)


@dataclass
class ImageData:
    """Training images augmented afresh each epoch, and the clean validation images (full-image path)."""

    labels: np.ndarray
    loader: torch.utils.data.DataLoader
    sampler: EpochSampler
    val: AugmentedImages | None
    bad_files: list[Any]
    train_paths: list[Path]  # the usable ones, hashed into the checkpoint's settings
    n_views = 1
    cut_seconds = 0.0
    val_index = None
    from_cut = False

    def epoch(self, order: np.ndarray, views: np.ndarray, batch_size: int, skip: int, tag: int,
              part: tuple[int, int] = (0, 1)) -> Batches:
        """One epoch's batches in ``order``, from batch ``skip`` on, this rank's share of each (``part``:
        rank, ranks); ``tag`` seeds the augmentations. An empty share comes as None."""
        self.sampler.set(tag, rank_batches(order, batch_size, skip, part))
        return iter(self.loader)

    def validation(self, batch_size: int) -> Batches | None:
        if self.val is None:
            return None
        return torch.utils.data.DataLoader(self.val, batch_size=batch_size, num_workers=0)

    def scored_validation(self, batch_size: int) -> Batches | None:
        return None


def cut_data(backbone: Backbone, plan: StagePlan, n_frozen: int, train_set: ImageSet, val_set: ImageSet | None,
             cache: FeatureCache, train_views: Sequence[View], val_view: View, *, precision: str,
             num_workers: int | None, progress: bool) -> CutData:
    """The frozen stages' output for every training view and the validation view, cached at the cut."""
    with torch.no_grad():
        shape = tuple(plan.run(torch.zeros(1, *backbone.data_config["input_size"]), 0, n_frozen).shape[1:])
    cut = Cut(f"stage{n_frozen}:{plan.names[n_frozen - 1]}",
              lambda m, x: stage_plan(m).run(x, 0, n_frozen), int(np.prod(shape)))
    common = {"cache": cache, "cut": cut, "load": False, "precision": precision, "num_workers": num_workers,
              "progress": progress, "full_batches": True}
    t0 = time.perf_counter()
    shared = _fill_shares(backbone, train_set, val_set, train_views, val_view, common)
    res = extract_views(backbone, train_set.paths, train_views, desc="cut cache", **common)
    val_res = extract_views(backbone, val_set.paths, [val_view], desc="val cut cache", **common) \
        if val_set is not None else None
    computed = shared or res.n_computed or (val_res and val_res.n_computed)
    cut_seconds = time.perf_counter() - t0 if computed else 0.0
    bad_files = list(res.bad_files) + (list(val_res.bad_files) if val_res is not None else [])
    keep = np.flatnonzero(res.ok)
    labels = train_set.labels.astype(np.int64)
    train = CutBatches(cache, res.locations.take(keep), shape, labels[keep])
    val, vkeep = None, None
    if val_res is not None and val_res.ok.any():
        vkeep = np.flatnonzero(val_res.ok)
        val = CutBatches(cache, val_res.locations.take(vkeep), shape, val_set.labels.astype(np.int64)[vkeep])
    return CutData(train, val, vkeep, len(train_views), bad_files, list(train_set.paths), cut_seconds)


def _fill_shares(backbone: Backbone, train_set: ImageSet, val_set: ImageSet | None, train_views: Sequence[View],
                 val_view: View, common: dict[str, Any]) -> bool:
    """Under torchrun: each rank computes the cut cache of its share of the images (by content hash) and
    waits for the others; every rank then finds all of it cached. Whether any rank computed anything."""
    if not distributed.active():
        return False
    cache = common["cache"]
    parts = [(train_set.paths, train_views, "cut cache")]
    if val_set is not None:
        parts.append((val_set.paths, [val_view], "val cut cache"))
    computed = 0
    for paths, views, desc in parts:
        mine = [paths[i] for i in distributed.my_share(cache, paths)]
        computed += extract_views(backbone, mine, views, desc=desc, **common).n_computed
    return distributed.all_reduce_sum([computed])[0] > 0  # (a collective: every rank waits for the others)


def image_data(train_set: ImageSet, val_set: ImageSet | None, cache: FeatureCache,
               transform: Callable[[Any, str], torch.Tensor], val_view: View, *, batch_size: int,
               num_workers: int | None) -> ImageData:
    """The usable training images, augmented by ``transform`` in workers, and the clean validation images."""
    train_set, val_set, bad_files = usable_only(train_set, val_set, cache)
    labels = train_set.labels.astype(np.int64)
    sampler = EpochSampler()
    workers = default_num_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(AugmentedImages(train_set.paths, labels, transform), batch_sampler=sampler,
                                         collate_fn=_collate, num_workers=workers, persistent_workers=workers > 0)
    val = AugmentedImages(val_set.paths, val_set.labels.astype(np.int64), val_view.transform) \
        if val_set is not None else None
    return ImageData(labels, loader, sampler, val, bad_files, list(train_set.paths))


def usable_only(train_set: ImageSet, val_set: ImageSet | None,
                cache: FeatureCache) -> tuple[ImageSet, ImageSet | None, list[Any]]:
    """Drop images that cannot be read or decoded (checked once, remembered by the cache), listing them."""
    bad: list[Any] = []
    return _usable(train_set, cache, bad), _usable(val_set, cache, bad) if val_set is not None else None, bad


def _usable(images: ImageSet, cache: FeatureCache, bad: list[Any]) -> ImageSet:
    from .data import BadFile, ImageDecodeError, decode_image
    from .preprocess import decoder_id

    keys, errors = cache.image_keys(images.paths)
    known = cache.failures([k for k in keys if k is not None], decoder_id())
    good = []
    for i, (path, key) in enumerate(zip(images.paths, keys)):
        reason = errors.get(i) or (known.get(key) if key else None)
        if reason is None:
            try:
                decode_image(path)
            except ImageDecodeError as exc:
                reason = str(exc).removeprefix(f"{path}: ")
                if exc.permanent and key:
                    cache.record_failures({key: reason}, decoder_id())
        if reason is None:
            good.append(i)
        else:
            bad.append(BadFile(str(path), reason))
    return images.subset(good)
