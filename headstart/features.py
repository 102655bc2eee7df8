"""Run a frozen backbone over images once, through the feature cache.

:func:`extract_features` hashes each file, looks the hashes up in the :class:`~headstart.cache.FeatureCache`,
decodes and forwards only the images it lacks (in DataLoader worker processes, batched, bf16 and
channels-last on CPUs with AMX), and flushes new rows to the cache every ``flush_every`` images and on
any interruption, so nothing computed is lost and a re-run resumes where it stopped.
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
from .cache import FeatureCache, MissingShardError, model_key
from .data import BadFile, ImageDecodeError, decode_bytes
from .errors import UsageError
from .preprocess import decoder_id, eval_transform, preprocessing_signature, resolve_precision

CUT_POOLED = "pooled"


@dataclass
class FeatureResult:
    """Features of a list of images.

    Attributes:
        features: float32 ``(n, dim)``; rows of images that failed are zero.
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
    model_key: str = ""
    precision: str = ""


class _ImageFiles(Dataset):
    """Reads each file once: the same bytes are hashed and decoded, so a feature is always filed
    under the hash of the content it was computed from, even if the file changes meanwhile."""

    def __init__(self, paths: Sequence[Path], transform: Any, input_size: Sequence[int]) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.input_size = tuple(input_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str, str, bool]:
        """(index, tensor, content sha256, error reason, error is permanent)"""
        path = self.paths[i]
        blank = torch.zeros(self.input_size)
        try:
            data = path.read_bytes()
        except OSError as exc:
            reason = "file not found" if isinstance(exc, FileNotFoundError) else f"cannot read file ({exc})"
            return i, blank, "", reason, False
        digest = hashlib.sha256(data).hexdigest()
        try:
            return i, self.transform(decode_bytes(data, path)), digest, "", False
        except ImageDecodeError as exc:
            return i, blank, digest, str(exc).removeprefix(f"{path}: "), exc.permanent
        except Exception as exc:  # a transform failure on a strange image must not kill the run
            return i, blank, digest, f"cannot preprocess image ({type(exc).__name__}: {exc})", False


def default_num_workers() -> int:
    """Decoding workers: one per spare core, at least one, at most eight."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


def feature_description(backbone: Backbone, precision: str, cut: str = CUT_POOLED,
                        dtype: str = "float16") -> dict[str, Any]:
    """What, besides the image, determines a cached feature row; hashed into the model key."""
    return {
        "backbone": backbone.name,
        "weights_digest": backbone.weights_digest,
        "cut": cut,
        "preprocessing": preprocessing_signature(backbone.data_config, precision),
        "storage_dtype": dtype,
    }


@contextlib.contextmanager
def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def forward_batches(backbone: Backbone, batch: torch.Tensor, device: torch.device, precision: str) -> np.ndarray:
    """Pooled features of a preprocessed batch as float32 numpy."""
    x = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), _autocast(device, precision):
        out = backbone.model(x)
    return out.float().cpu().numpy()


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
        flush_every: write new rows to the cache after this many images (and on interruption).
        progress: show a progress bar on stderr.

    Returns:
        FeatureResult; ``result.n_computed == 0`` on a warm cache.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise UsageError(f"batch_size must be a positive integer; got {batch_size!r}")
    if num_workers is not None and not (isinstance(num_workers, int) and num_workers >= 0):
        raise UsageError(f"num_workers must be an integer >= 0 (0 decodes in this process); got {num_workers!r}")
    if cache is None:
        with FeatureCache() as own:
            return extract_features(backbone, paths, cache=own, batch_size=batch_size, num_workers=num_workers,
                                    precision=precision, device=device, flush_every=flush_every,
                                    progress=progress, desc=desc)
    start = time.perf_counter()
    paths = [Path(p) for p in paths]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    description = feature_description(backbone, precision, dtype=cache.dtype.name)
    key = model_key(description)
    decoder = decoder_id()
    cache.register_model(key, description, backbone.num_features)

    n = len(paths)
    image_keys, bad = cache.image_keys(paths)
    n_computed = 0
    n_cached: int | None = None
    for _attempt in range(3):  # a missing shard drops its rows; the next pass recomputes them
        valid = [k for k in image_keys if k is not None]
        located = cache.lookup(key, valid)
        if n_cached is None:
            n_cached = sum(1 for k in image_keys if k is not None and k in located)
        known_failures = cache.failures([k for k in valid if k not in located], decoder)
        todo: dict[str, int] = {}  # one forward per distinct content neither cached nor known undecodable
        for i, k in enumerate(image_keys):
            if k is not None and k not in located and k not in known_failures and k not in todo:
                todo[k] = i
        if todo:
            computed, renamed, failed = _compute_missing(
                backbone, paths, todo, cache, key, decoder, device, precision, batch_size, num_workers,
                flush_every, progress, desc)
            n_computed += computed
            for i, k in enumerate(image_keys):
                if k in renamed:  # the file changed after hashing: use what was really decoded
                    image_keys[i] = renamed[k]
                if k in failed:
                    bad[i] = failed[k]
            valid = [k for k in image_keys if k is not None]
            located = cache.lookup(key, valid)
            known_failures = cache.failures([k for k in valid if k not in located], decoder)
        features = np.zeros((n, backbone.num_features), dtype=np.float32)
        ok = np.zeros(n, dtype=bool)
        rows = [(i, located[k]) for i, k in enumerate(image_keys) if k is not None and k in located]
        try:
            if rows:
                index, locations = zip(*rows)
                features[list(index)] = cache.read(locations, backbone.num_features)
                ok[list(index)] = True
        except MissingShardError:
            continue
        break
    else:  # pragma: no cover - only if shards vanish again and again while we run
        raise MissingShardError("several")
    for i, k in enumerate(image_keys):
        if not ok[i] and k is not None and i not in bad:
            bad[i] = known_failures.get(k, "no features (decoding failed in an earlier step)")
    bad_files = [BadFile(str(paths[i]), reason) for i, reason in sorted(bad.items()) if not ok[i]]
    seconds = time.perf_counter() - start
    return FeatureResult(
        features=features, ok=ok, bad_files=bad_files, n_computed=n_computed, n_cached=n_cached or 0,
        seconds=seconds, images_per_second=n / seconds if seconds > 0 else 0.0, model_key=key,
        precision=precision,
    )


def _compute_missing(backbone: Backbone, paths: list[Path], todo: dict[str, int], cache: FeatureCache,
                     key: str, decoder: str, device: torch.device, precision: str, batch_size: int,
                     num_workers: int | None, flush_every: int, progress: bool,
                     desc: str) -> tuple[int, dict[str, str], dict[str, str]]:
    """Decode and forward the ``todo`` images, flushing to the cache as it goes.

    Returns:
        (images forwarded, {expected hash: hash actually decoded}, {expected hash: failure reason}).
    """
    order = list(todo.items())  # (expected image key, path index)
    dataset = _ImageFiles([paths[i] for _, i in order], eval_transform(backbone.data_config),
                          backbone.data_config["input_size"])
    workers = default_num_workers() if num_workers is None else num_workers
    workers = min(workers, max(0, (len(order) + batch_size - 1) // batch_size - 1))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False,
                        pin_memory=device.type == "cuda")
    model = backbone.model.to(device).eval()
    model.to(memory_format=torch.channels_last)
    pending_keys: list[str] = []
    pending_rows: list[np.ndarray] = []
    permanent: dict[str, str] = {}
    renamed: dict[str, str] = {}
    failed: dict[str, str] = {}
    computed = 0

    def flush() -> None:
        if pending_keys:
            cache.write(key, pending_keys, np.concatenate(pending_rows))
            pending_keys.clear()
            pending_rows.clear()
        cache.record_failures(permanent, decoder)
        permanent.clear()

    bar = tqdm(total=len(order), desc=desc, unit="img", file=sys.stderr, disable=not progress, leave=False)
    try:
        for index, batch, digests, errors, is_permanent in loader:
            good = []
            for j, error in enumerate(errors):
                expected, path_index = order[int(index[j])]
                actual = digests[j] or expected
                if actual != expected:
                    renamed[expected] = actual
                    cache.remember_hash(paths[path_index], actual)
                if error:
                    failed[expected] = error
                    if bool(is_permanent[j]):
                        permanent[actual] = error
                else:
                    good.append(j)
            if good:
                out = forward_batches(backbone, batch[good], device, precision)
                finite = np.isfinite(out).all(axis=1)
                for row, j in enumerate(good):
                    expected = order[int(index[j])][0]
                    if finite[row]:
                        pending_keys.append(digests[j] or expected)
                    else:
                        failed[expected] = (f"the backbone gave non-finite features in {precision} "
                                            "(try --precision fp32)")
                pending_rows.append(out[finite])
                computed += int(finite.sum())
            bar.update(len(errors))
            if len(pending_keys) >= flush_every:
                flush()
    finally:
        flush()  # on success and on interruption alike: computed rows are kept
        bar.close()
    return computed, renamed, failed
