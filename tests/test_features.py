"""Feature extraction through the cache: hits, misses, invalidation, resume, bad files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import make_image, make_tree, truncated_jpeg

from headstart.backbones import create_backbone
from headstart.cache import CacheWarning, FeatureCache
from headstart.data import decode_bytes
from headstart.features import Decoder, clean_view, extract_features, extract_views
from headstart.preprocess import decoder_id


def _paths(root):
    return sorted(root.rglob("*.png"))


def _extract(backbone, paths, cache, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("batch_size", 4)
    return extract_features(backbone, paths, cache=cache, **kw)


@pytest.fixture
def counting(backbone):
    """Count backbone forwards (images) with a forward hook on the model (removed afterwards)."""
    calls = {"images": 0}

    def count(module, args):
        calls["images"] += len(args[0])

    handle = backbone.model.register_forward_pre_hook(count)
    yield calls
    handle.remove()


def test_second_run_does_no_forward(tree, backbone, cache, counting):
    first = _extract(backbone, _paths(tree), cache)
    assert first.n_computed == 12 and counting["images"] == 12 and first.ok.all()
    second = _extract(backbone, _paths(tree), cache)
    assert second.n_computed == 0 and second.n_cached == 12 and counting["images"] == 12
    np.testing.assert_array_equal(first.features, second.features)


def test_cached_rows_match_a_fresh_forward(tree, backbone, cache):
    cached = _extract(backbone, _paths(tree), cache)
    with FeatureCache(cache.root / "other", dtype="float32") as fresh_cache:
        fresh = _extract(backbone, _paths(tree), fresh_cache)
    # float16 storage: relative error well under 1e-2 of the feature scale
    assert np.abs(cached.features - fresh.features).max() <= 1e-2 * np.abs(fresh.features).max()


def test_adding_images_computes_only_those(tree, backbone, cache, counting):
    _extract(backbone, _paths(tree), cache)
    for i in range(3):
        make_image(tree / "red" / f"new_{i}.png", (200, 10, 10), seed=500 + i)
    result = _extract(backbone, _paths(tree), cache)
    assert result.n_computed == 3 and result.n_cached == 12 and counting["images"] == 15


def test_renamed_or_moved_file_still_hits(tree, backbone, cache, counting, tmp_path):
    _extract(backbone, _paths(tree), cache)
    moved = tmp_path / "moved"
    shutil.copytree(tree, moved)
    (moved / "red" / "red_0.png").rename(moved / "red" / "renamed.png")
    result = _extract(backbone, _paths(moved), cache)
    assert result.n_computed == 0 and counting["images"] == 12


def test_changed_image_bytes_invalidate(tree, backbone, cache, counting):
    before = _extract(backbone, _paths(tree), cache)
    target = tree / "red" / "red_0.png"
    make_image(target, (10, 200, 10), seed=99)  # same path, new content
    after = _extract(backbone, _paths(tree), cache)
    assert after.n_computed == 1
    index = _paths(tree).index(target)
    assert not np.allclose(before.features[index], after.features[index])


def test_changed_weights_invalidate(tree, backbone, cache, counting):
    _extract(backbone, _paths(tree), cache)
    other = create_backbone("tf_efficientnet_lite0", weights="random")
    result = _extract(other, _paths(tree), cache)
    assert result.n_computed == 12 and result.model_key != _extract(backbone, _paths(tree), cache).model_key


def test_changed_preprocessing_invalidates(tree, backbone, cache):
    a = _extract(backbone, _paths(tree), cache, precision="fp32")
    b = _extract(backbone, _paths(tree), cache, precision="bf16")
    assert a.model_key != b.model_key and b.n_computed == 12


def test_duplicate_contents_are_computed_once(tmp_path, backbone, cache, counting):
    a = make_image(tmp_path / "a.png", (1, 2, 3))
    b = tmp_path / "b.png"
    shutil.copy(a, b)
    result = _extract(backbone, [a, b], cache)
    assert result.n_computed == 1 and counting["images"] == 1
    np.testing.assert_array_equal(result.features[0], result.features[1])


def test_resume_after_interrupted_extraction(tmp_path, backbone, cache):
    root = make_tree(tmp_path / "d", per_class=8)
    paths = _paths(root)
    seen = {"batches": 0}

    def dies_on_third_batch(module, args):
        seen["batches"] += 1
        if seen["batches"] == 3:
            raise KeyboardInterrupt

    handle = backbone.model.register_forward_pre_hook(dies_on_third_batch)
    try:
        with pytest.raises(KeyboardInterrupt):
            _extract(backbone, paths, cache, batch_size=4, flush_every=100)
    finally:
        handle.remove()
    # the two finished batches were flushed on the way out, though flush_every was not reached
    resumed = _extract(backbone, paths, cache, batch_size=4)
    assert resumed.n_cached == 8 and resumed.n_computed == 8 and resumed.ok.all()
    with FeatureCache(tmp_path / "clean") as clean:
        uninterrupted = _extract(backbone, paths, clean, batch_size=4)
    np.testing.assert_array_equal(resumed.features, uninterrupted.features)


def test_no_half_written_shard_is_visible(tree, backbone, cache):
    _extract(backbone, _paths(tree), cache)
    assert not list((cache.root / "shards").rglob("*.tmp"))
    for shard in (cache.root / "shards").rglob("*.npy"):
        np.load(shard)  # every shard the index can point at is complete


def test_bad_files_are_reported_and_skipped(tree, backbone, cache):
    (tree / "red" / "empty.png").write_bytes(b"")
    truncated_jpeg(tree / "blue" / "cut.jpg")
    (tree / "blue" / "text.jpg").write_text("not an image")
    paths = sorted(p for p in tree.rglob("*") if p.is_file())
    result = _extract(backbone, paths, cache)
    bad = {p.split("/")[-1]: r for p, r in ((b.path, b.reason) for b in result.bad_files)}
    assert set(bad) == {"empty.png", "cut.jpg", "text.jpg"}
    assert "empty file" in bad["empty.png"] and "cannot decode" in bad["cut.jpg"]
    assert result.ok.sum() == 12 and not result.ok[[paths.index(tree / "red" / "empty.png")]].any()
    again = _extract(backbone, paths, cache)  # failures are remembered: no new decode attempt needed
    assert again.n_computed == 0 and {b.path for b in again.bad_files} == {b.path for b in result.bad_files}


def test_unreadable_path_is_reported(tmp_path, backbone, cache):
    good = make_image(tmp_path / "a.png", (1, 2, 3))
    result = _extract(backbone, [good, tmp_path / "gone.png"], cache)
    assert result.ok.tolist() == [True, False]
    assert result.bad_files[0].reason == "file not found"


def test_worker_processes_give_the_same_features(tree, backbone, tmp_path):
    with FeatureCache(tmp_path / "c0") as c0, FeatureCache(tmp_path / "c2") as c2:
        a = _extract(backbone, _paths(tree), c0, num_workers=0)
        b = _extract(backbone, _paths(tree), c2, num_workers=2)
    np.testing.assert_array_equal(a.features, b.features)


def _extract_decoded(backbone, paths, cache, decoder):
    """Clean-view features through ``decoder``."""
    return extract_views(backbone, paths, [clean_view(backbone.data_config)], cache=cache, num_workers=0,
                         progress=False, batch_size=4, decoder=decoder)


def test_transient_failure_is_not_remembered(tmp_path, backbone, cache):
    from headstart.data import ImageDecodeError

    image = make_image(tmp_path / "a.png", (9, 9, 9))

    def flaky(data, path):
        raise ImageDecodeError(f"{path}: cannot read file (I/O error)", permanent=False)

    assert not _extract_decoded(backbone, [image], cache, Decoder(decode=flaky)).ok[0]
    assert _extract(backbone, [image], cache).ok[0]


def test_decode_failures_are_tied_to_the_decoder(tmp_path, backbone, cache):
    broken = tmp_path / "b.jpg"
    broken.write_text("not an image")
    assert not _extract(backbone, [broken], cache).ok[0]
    assert cache.failures([cache.image_keys([broken])[0][0]], decoder_id())
    calls = []
    newer = Decoder(decode=lambda data, path: calls.append(path) or decode_bytes(data, path), name="a newer decoder")
    assert not _extract_decoded(backbone, [broken], cache, newer).ok[0]
    assert calls  # retried with the new decoder, not served from the old verdict


def test_same_size_same_mtime_rewrite_is_rehashed(tmp_path, backbone, cache):
    import os

    a = make_image(tmp_path / "a.bmp", (200, 0, 0), size=32)
    b = make_image(tmp_path / "b.bmp", (0, 0, 200), size=32)
    first = _extract(backbone, [a], cache)
    stat = a.stat()
    a.write_bytes(b.read_bytes())  # same size (BMP) ...
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the old mtime, as cp -p would leave
    second = _extract(backbone, [a], cache)
    assert second.n_computed == 1
    assert not np.allclose(first.features[0], second.features[0])


def test_missing_shard_is_recomputed(tree, backbone, cache):
    first = _extract(backbone, _paths(tree), cache)
    for shard in (cache.root / "shards").rglob("*.npy"):
        shard.unlink()
    with pytest.warns(CacheWarning, match="missing"):
        again = _extract(backbone, _paths(tree), cache)
    assert again.ok.all() and again.n_computed == 12
    np.testing.assert_array_equal(first.features, again.features)


def test_feature_is_filed_under_the_bytes_really_decoded(tmp_path, backbone, cache, monkeypatch):
    image = make_image(tmp_path / "a.png", (5, 100, 5))
    real_key = cache.image_keys([image])[0][0]
    real = cache.image_keys
    monkeypatch.setattr(cache, "image_keys", lambda paths: (["stale-hash"], {}))  # file changed after hashing
    result = _extract(backbone, [image], cache)
    assert result.ok[0]
    monkeypatch.setattr(cache, "image_keys", real)
    probe = _extract(backbone, [image], cache)
    assert probe.n_computed == 0 and np.array_equal(probe.features, result.features)
    # filed under the real content, not under the stale hash
    assert cache.locate([result.model_key], [real_key, "stale-hash"]).found.tolist() == [[True, False]]


def test_a_duplicate_of_a_file_that_changed_keeps_its_own_features(tmp_path, backbone, cache, monkeypatch):
    a = make_image(tmp_path / "a.png", (200, 20, 20))  # now holds other bytes than when it was hashed
    b = make_image(tmp_path / "b.png", (20, 20, 200))  # holds the bytes a held when it was hashed
    old_key = cache.image_keys([b])[0][0]
    real = cache.image_keys
    monkeypatch.setattr(cache, "image_keys", lambda paths: ([old_key, old_key], {}))
    both = _extract(backbone, [a, b], cache)
    monkeypatch.setattr(cache, "image_keys", real)
    assert both.ok.all() and both.n_computed == 2
    alone_a = _extract(backbone, [a], cache)
    alone_b = _extract(backbone, [b], cache)
    np.testing.assert_array_equal(both.features[0], alone_a.features[0])
    np.testing.assert_array_equal(both.features[1], alone_b.features[0])
    assert not np.allclose(both.features[0], both.features[1])


def test_bad_batch_size_is_a_usage_error(tree, backbone, cache):
    from headstart.errors import UsageError

    with pytest.raises(UsageError, match="batch_size"):
        _extract(backbone, _paths(tree), cache, batch_size=0)
    with pytest.raises(UsageError, match="num_workers"):
        _extract(backbone, _paths(tree), cache, num_workers=-1)


# ------------------------------------------------------------------------------------------- large photos


def large_jpeg(path, size=(2000, 1500), seed=0):
    """A smooth photo-like JPEG, large enough to be decoded at 1/2 scale for a 224 px model."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).resize(size, Image.BICUBIC).save(
        path, "JPEG", quality=90)
    return path


def _cosine(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_large_jpeg_features_match_a_full_decode_under_their_own_key(tmp_path, backbone, cache):
    from headstart.preprocess import resize_size

    paths = [large_jpeg(tmp_path / "big.jpg"), make_image(tmp_path / "small.png", (90, 20, 20))]
    sizes = []

    def recording(data, path, min_size=None):
        sizes.append(min_size)
        return decode_bytes(data, path, min_size)

    drafted = extract_views(backbone, paths, [clean_view(backbone.data_config)], cache=cache, num_workers=0,
                            progress=False, decoder=Decoder(decode=recording))
    full = extract_views(backbone, paths, [clean_view(backbone.data_config, draft=False)], cache=cache,
                         num_workers=0, progress=False)
    assert sizes == [resize_size(backbone.data_config)] * 2
    assert drafted.model_key != full.model_key and full.n_computed == 2  # nothing reused across the two
    assert _cosine(drafted.features[0, 0], full.features[0, 0]) >= 0.99
    assert not np.array_equal(drafted.features[0], full.features[0])
    np.testing.assert_array_equal(drafted.features[1], full.features[1])  # a small image: the same pixels
    plain = _extract(backbone, paths, cache)  # extract_features is the drafted clean view
    assert plain.n_computed == 0 and plain.model_key == drafted.model_key


def test_a_view_sees_the_same_pixels_whatever_views_come_with_it(tmp_path, backbone, cache):
    from headstart.features import augmented_views
    from headstart.transforms import build_pipeline

    paths = [large_jpeg(tmp_path / "big.jpg", seed=1)]
    clean = clean_view(backbone.data_config)
    augmented = augmented_views(build_pipeline("light", size=224), backbone.data_config, 1)
    assert augmented[0].min_size is None  # random crops depend on the image size: every pixel
    both = extract_views(backbone, paths, [clean, *augmented], cache=cache, num_workers=0, progress=False)
    with FeatureCache(tmp_path / "c2") as other:
        alone = extract_views(backbone, paths, [clean], cache=other, num_workers=0, progress=False)
        aug_alone = extract_views(backbone, paths, augmented, cache=other, num_workers=0, progress=False)
    np.testing.assert_array_equal(both.features[:, 0], alone.features[:, 0])
    np.testing.assert_array_equal(both.features[:, 1], aug_alone.features[:, 0])
