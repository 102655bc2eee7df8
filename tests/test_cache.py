"""The feature cache's array interface: locating rows, the in-process location memo, gathering rows."""

from __future__ import annotations

import os

import numpy as np
import pytest

from headstart.cache import CacheWarning, FeatureCache, Locations, MissingShardError

DIM = 8


def _rows(n: int, offset: float) -> np.ndarray:
    return (np.arange(n * DIM, dtype=np.float32).reshape(n, DIM) + offset) / 8  # distinct, exact in float16


@pytest.fixture
def filled(cache: FeatureCache) -> tuple[FeatureCache, dict[tuple[str, str], np.ndarray]]:
    """Two model keys; key "a" spread over two shards, key "b" in one shard in another image order."""
    truth: dict[tuple[str, str], np.ndarray] = {}
    images = [f"img{i}" for i in range(6)]
    for key, batches in {"a": [images[:4], images[4:]], "b": [images[::-1]]}.items():
        for b, names in enumerate(batches):
            rows = _rows(len(names), 200 * (key == "b") + 100 * b)
            cache.write(key, names, rows)
            truth.update({(key, name): row for name, row in zip(names, rows)})
    return cache, truth


def test_read_locations_gathers_every_view_of_every_image(filled):
    cache, truth = filled
    images = ["img5", "img0", "nope", "img3", "img0", None]  # out of order, unknown, repeated, unreadable
    located = cache.locate(["a", "b"], images)
    assert located.found.tolist() == [[True, True, False, True, True, False]] * 2
    out = cache.read_locations(located, DIM)
    assert out.shape == (6, 2, DIM) and out.dtype == np.float32
    for i, image in enumerate(images):
        for v, key in enumerate(["a", "b"]):
            expected = truth.get((key, image), np.zeros(DIM, np.float32))
            np.testing.assert_array_equal(out[i, v], expected)


def test_read_locations_one_view_per_image_and_subsets(filled):
    cache, truth = filled
    images = [f"img{i}" for i in range(6)]
    located = cache.locate(["a", "b"], images)
    picked = located.pick([4, 1, 2], [1, 0, 1])
    np.testing.assert_array_equal(cache.read_locations(picked, DIM)[:, 0],
                                  [truth["b", "img4"], truth["a", "img1"], truth["b", "img2"]])
    taken = located.take([5, 0])
    np.testing.assert_array_equal(cache.read_locations(taken, DIM)[1], [truth["a", "img0"], truth["b", "img0"]])
    assert located[1][0] == (located.shards[located.index[1, 0]], int(located.rows[1, 0]))
    np.testing.assert_array_equal(cache.read_locations(located.pick([0, 1], [0, 0]), DIM)[:, 0],
                                  [truth["a", "img0"], truth["a", "img1"]])


def test_locate_answers_from_memory_the_second_time(filled, monkeypatch):
    cache, _ = filled
    images = ["img1", "img2", "img1"]  # the same content twice
    first = cache.locate(["a", "b"], images)

    def no_query(*args, **kwargs):
        raise AssertionError("the index was queried")

    monkeypatch.setattr(cache.index, "lookup", no_query)
    again = cache.locate(["a", "b"], images)
    np.testing.assert_array_equal(first.index, again.index)
    np.testing.assert_array_equal(first.rows, again.rows)
    with pytest.raises(AssertionError, match="queried"):  # an image not seen before still asks the index
        cache.locate(["a", "b"], ["img3"])


def test_a_vanished_shard_is_noticed_through_the_memo(filled):
    cache, truth = filled
    images = [f"img{i}" for i in range(6)]
    located = cache.locate(["a"], images)
    cache.read_locations(located, DIM)  # maps both shards
    gone = located.shards[located.index[0, 5]]
    (cache.root / "shards" / gone).unlink()
    assert cache.locate(["a"], images).found.all()  # plain locate answers from the memo, without the disk
    with pytest.warns(CacheWarning, match=f"{gone}.*missing"):  # noticed although this process had it mapped
        verified = cache.locate_verified(["a"], images, DIM)
    assert verified.found.tolist() == [[True] * 4 + [False] * 2]
    assert cache.locate(["a"], images).found.tolist() == [[True] * 4 + [False] * 2]  # memo and index forgot it
    again = cache.locate_verified(["a"], images, DIM)  # what is left is intact: nothing more is forgotten
    np.testing.assert_array_equal(again.index, verified.index)
    np.testing.assert_array_equal(cache.read_locations(again, DIM)[:4, 0], [truth["a", f"img{i}"] for i in range(4)])


def test_a_replaced_or_damaged_shard_is_forgotten_before_reading(filled):
    cache, _ = filled
    images = [f"img{i}" for i in range(6)]
    located = cache.locate(["b"], images)
    shard = cache.root / "shards" / located.shards[located.index[0, 0]]
    np.save(shard.with_suffix(".tmp.npy"), np.zeros((2, DIM), np.float16))  # too short for its six rows
    shard.with_suffix(".tmp.npy").replace(shard)
    with pytest.warns(CacheWarning, match=f"{shard.name}.*bytes"):
        verified = cache.locate_verified(["b"], images, DIM)
    assert not verified.found.any() and not cache.locate(["b"], images).found.any()
    assert cache.locate_verified(["a"], images, DIM).found.all()  # other shards are untouched


def test_another_process_reading_a_vanished_shard(filled):
    cache, _ = filled
    images = [f"img{i}" for i in range(6)]
    located = cache.locate(["a"], images)
    (cache.root / "shards" / located.shards[located.index[0, 0]]).unlink()
    with FeatureCache(cache.root, memos={}) as other:  # what a new process would see
        with pytest.raises(MissingShardError), pytest.warns(CacheWarning, match="missing"):
            other.read_locations(other.locate(["a"], images), DIM)
        assert other.locate(["a"], images).found.tolist() == [[False] * 4 + [True] * 2]


def test_caches_on_one_folder_share_the_memo(filled, monkeypatch):
    cache, _ = filled
    cache.locate(["a", "b"], ["img1"])
    with FeatureCache(cache.root) as other:
        monkeypatch.setattr(other.index, "lookup", lambda *a: pytest.fail("the index was queried"))
        assert other.locate(["a", "b"], ["img1"]).found.all()


def test_locations_of_nothing(cache):
    empty = cache.locate(["a"], [])
    assert isinstance(empty, Locations) and empty.index.shape == (1, 0)
    assert cache.read_locations(empty, DIM).shape == (0, 1, DIM)


def test_image_keys_are_the_same_for_relative_and_absolute_paths(tmp_path, cache, monkeypatch):
    (tmp_path / "a.bin").write_bytes(b"alpha")
    monkeypatch.chdir(tmp_path)
    relative = cache.image_keys(["a.bin"])[0]
    assert cache.image_keys([tmp_path / "a.bin"])[0] == relative
    assert relative[0] is not None


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links here")
def test_a_repointed_symlink_is_hashed_again(tmp_path, cache):
    import hashlib

    (tmp_path / "a.bin").write_bytes(b"alpha")
    (tmp_path / "b.bin").write_bytes(b"bravo")
    link = tmp_path / "link.bin"
    link.symlink_to(tmp_path / "a.bin")
    assert cache.image_keys([link])[0] == [hashlib.sha256(b"alpha").hexdigest()]
    link.unlink()
    link.symlink_to(tmp_path / "b.bin")
    assert cache.image_keys([link])[0] == [hashlib.sha256(b"bravo").hexdigest()]
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "a.bin").write_bytes(b"charlie")
    inner = tmp_path / "inner"
    inner.symlink_to(sub)
    # 'inner/../a.bin' is tmp_path/a.bin as the OS resolves it, although it reads like 'a.bin' next to 'inner'
    assert cache.image_keys([str(inner) + "/../a.bin"])[0] == [hashlib.sha256(b"alpha").hexdigest()]


def test_one_shard_can_hold_several_model_keys(cache):
    rows = _rows(4, 0)
    cache.write(["a", "b", "a", "b"], ["x", "x", "y", "y"], rows)  # both views of x, then both of y
    located = cache.locate(["a", "b"], ["y", "x"])
    assert len(set(located.index.ravel().tolist())) == 1  # one shard
    np.testing.assert_array_equal(cache.read_locations(located, DIM), [[rows[2], rows[3]], [rows[0], rows[1]]])
    with pytest.raises(ValueError, match="model keys"):
        cache.write(["a"], ["x", "y"], rows[:2])


def test_running_out_of_file_descriptors_does_not_forget_a_shard(filled, monkeypatch):
    import errno

    cache, truth = filled
    located = cache.locate(["a"], ["img0"])
    calls = []
    real_load = np.load

    def no_descriptors(*args, **kwargs):
        calls.append(args)
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(np, "load", no_descriptors)
    with pytest.raises(RuntimeError, match="ulimit"):
        cache.read_locations(located, DIM)
    assert len(calls) == 2  # the maps were let go and it was tried once more
    monkeypatch.setattr(np, "load", real_load)
    assert cache.locate(["a"], ["img0"]).found.all()  # the shard is still in the index
    np.testing.assert_array_equal(cache.read_locations(located, DIM)[0, 0], truth["a", "img0"])


def test_the_last_cache_on_a_folder_lets_its_memory_maps_go(filled):
    cache, _ = filled
    with FeatureCache(cache.root) as other:
        other.read_locations(other.locate(["a", "b"], ["img0"]), DIM)
        assert other._memo.maps  # mapped, and shared with `cache`
    assert cache._memo.maps  # `cache` is still open
    cache.close()
    assert not cache._memo.maps
    with FeatureCache(cache.root) as again:  # the location memo is still there
        assert again._memo is cache._memo and again._memo.located


def test_a_head_that_writes_into_its_input_gets_a_copy(tmp_path):
    from headstart.features import FeatureResult
    from headstart.inference import predict_proba_cached

    with FeatureCache(tmp_path / "c32", dtype="float32") as cache:
        rows = _rows(3, 0)
        cache.write("a", ["x", "y", "z"], rows)

        class Scribbler:  # e.g. a scikit-learn pipeline with StandardScaler(copy=False)
            classes_ = np.array([0, 1])

            def predict_proba(self, X):
                X -= X.mean(0)
                return np.tile([0.25, 0.75], (len(X), 1))

        located = cache.locate(["a"], ["x", "y", "z"])
        result = FeatureResult(features=np.zeros((3, 1, 0)), ok=np.ones(3, bool), locations=located, dim=DIM)
        np.testing.assert_allclose(predict_proba_cached(Scribbler(), cache, result), [[0.25, 0.75]] * 3)
        np.testing.assert_array_equal(cache.read_locations(located, DIM)[:, 0], rows)  # the shard is untouched


def test_image_keys_say_why_a_link_cannot_be_read(tmp_path, cache):
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    keys, errors = cache.image_keys([tmp_path / "broken.jpg", tmp_path / "loop.jpg", tmp_path / "gone.jpg"])
    assert keys == [None, None, None]
    assert errors == {0: "broken symbolic link (its target does not exist)", 1: "symbolic link loop",
                      2: "file not found"}
