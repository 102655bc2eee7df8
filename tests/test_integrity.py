"""Self-checking saved data: what is damaged, deleted or mixed up is detected, named, and refused or recovered.

Sections:

* run folders -- ``run.json`` records the head's classes and a sha256 digest of every other file of the
  run; :func:`headstart.load_run` refuses a run whose parts disagree with one line naming the file and
  saying "train it again". One run per module is trained and copied for each test.
* the feature cache -- zeroed, truncated, bit-flipped and deleted shards (and their sidecars); garbage,
  truncated and emptied indexes; read-only folders; full disks; claims; ``headstart cache``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tree

import headstart
import headstart.cache.feature_cache as feature_cache_module
from headstart.cache import CacheWarning, FeatureCache
from headstart.cache.index import new_owner
from headstart.cache.pending import PendingRows
from headstart.errors import DiskFullError, RunError, UsageError
from headstart.heads import LinearHead
from headstart.runs import EnsembleRun, Run, combine_runs, load_run, write_run

# ------------------------------------------------------------------------------------------ run folders

HEAD = "head.safetensors"
HEAD_JSON = "head.safetensors.json"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two runs trained once per module: ``two`` (blue, red) and ``three`` (blue, green, red)."""
    root = tmp_path_factory.mktemp("runs")
    common = {"cache_dir": root / "cache", "num_workers": 0, "progress": False, "val_split": 0, "select": "none"}
    made = {}
    for name, classes in (("two", ("red", "blue")), ("three", ("red", "blue", "green"))):
        data = make_tree(root / f"data_{name}", per_class=3, classes=classes)
        headstart.train(data, root / name, **common)
        made[name] = root / name
    return made


@pytest.fixture
def run(runs, tmp_path) -> Path:
    """A fresh copy of the two-class run, to damage."""
    return Path(shutil.copytree(runs["two"], tmp_path / "run"))


def refused(path: Path, *fragments: str) -> str:
    """Load ``path``, expect one :class:`RunError` line naming the folder and ``fragments``; return it."""
    with pytest.raises(RunError) as caught:
        load_run(path)
    message = str(caught.value)
    assert "\n" not in message and message.endswith("train it again"), message
    assert f"run folder '{path}" in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def legacy(path: Path) -> Path:
    """``path`` as an older headstart wrote it: no digests in run.json."""
    edit_json(path / "run.json", lambda info: info.pop("artifacts"))
    return path


def test_a_run_records_every_file_and_the_heads_classes_and_loads_silently(run, capsys):
    info = json.loads((run / "run.json").read_text())
    files = {p.name for p in run.iterdir()} - {"run.json"}
    assert set(info["artifacts"]) == files and {HEAD, HEAD_JSON} <= files
    assert all(len(d["sha256"]) == 64 and d["bytes"] == (run / n).stat().st_size for n, d in info["artifacts"].items())
    assert info["class_names"] == json.loads((run / HEAD_JSON).read_text())["classes"] == ["blue", "red"]
    loaded = load_run(run)
    assert isinstance(loaded, Run) and loaded.class_names == ["blue", "red"]
    assert capsys.readouterr().err == ""


def test_zeroed_head_of_the_same_size_is_refused(run):
    size = (run / HEAD).stat().st_size
    (run / HEAD).write_bytes(bytes(size))
    refused(run, HEAD, "cannot be read as safetensors")


def test_truncated_head_is_refused(run):
    data = (run / HEAD).read_bytes()
    (run / HEAD).write_bytes(data[: len(data) // 2])
    refused(run, HEAD, "truncated")


def test_bit_flipped_head_is_refused(run):
    data = bytearray((run / HEAD).read_bytes())
    data[-1] ^= 0x01  # in the tensors: the file still loads
    (run / HEAD).write_bytes(bytes(data))
    refused(run, HEAD, "does not match the digest recorded in run.json")


def test_garbage_head_is_refused(run):
    (run / HEAD).write_bytes(b"not a safetensors file" * 10)
    refused(run, HEAD, "cannot be read as safetensors")


@pytest.mark.parametrize("name", [HEAD, HEAD_JSON, "metrics.json", "bad_files.json"])
def test_deleted_artifact_is_refused(run, name):
    (run / name).unlink()
    refused(run, f"{name} is missing")


def test_swapped_class_order_in_the_heads_json_is_refused(run):
    edit_json(run / HEAD_JSON, lambda meta: meta["classes"].reverse())
    refused(run, HEAD_JSON, "['red', 'blue']", "in another order")


def test_extra_class_in_run_json_is_refused(run):
    edit_json(run / "run.json", lambda info: info["class_names"].append("ghost"))
    refused(run, HEAD_JSON, "'ghost'", "other classes")


def test_head_json_that_is_not_json_is_refused(run):
    (run / HEAD_JSON).write_text("{ not json")
    refused(run, HEAD_JSON, "not valid JSON")


def test_edited_head_shape_is_refused(run):
    edit_json(run / HEAD_JSON, lambda meta: meta.update(n_features_in=meta["n_features_in"] - 1))
    refused(run, HEAD, "'1.weight' of shape (2, 1280)", "1279 features) needs (2, 1279)")


def test_head_with_values_that_are_not_finite_is_refused(run):
    from safetensors.torch import load_file, save_file

    tensors = load_file(run / HEAD)
    tensors["1.weight"][0, 0] = float("nan")
    save_file(tensors, run / HEAD)
    refused(run, HEAD, "not finite")


def test_head_tensors_of_another_shape_are_refused(run, runs):
    shutil.copy(runs["three"] / HEAD, run / HEAD)  # three classes' tensors under two classes' settings
    refused(run, HEAD, "of shape (3,", "needs (2,")


def test_head_of_a_run_with_other_classes_is_refused(run, runs):
    for name in (HEAD, HEAD_JSON):
        shutil.copy(runs["three"] / name, run / name)
    refused(run, HEAD_JSON, "'green'", "other classes")


def test_head_on_other_features_is_refused(run):
    rng = np.random.default_rng(0)
    LinearHead().fit(rng.normal(size=(8, 16)), ["blue", "red"] * 4).save(run / HEAD)
    refused(run, HEAD, "takes 16 features", "gives 1280")


def test_head_of_another_run_with_the_same_classes_and_shape_is_refused(run):
    rng = np.random.default_rng(0)
    LinearHead().fit(rng.normal(size=(8, 1280)), ["blue", "red"] * 4).save(run / HEAD)
    refused(run, "does not match the digest recorded in run.json")


def test_legacy_run_without_digests_loads_with_one_warning(run, capsys):
    loaded = load_run(legacy(run))
    assert loaded.class_names == ["blue", "red"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be verified" in err and str(run) in err


def test_legacy_run_still_gets_the_class_and_loading_checks(run, capsys):
    legacy(run)
    edit_json(run / HEAD_JSON, lambda meta: meta["classes"].reverse())
    refused(run, "in another order")
    edit_json(run / HEAD_JSON, lambda meta: meta["classes"].reverse())
    (run / "metrics.json").write_text("{ not json")
    refused(run, "metrics.json is damaged")


def test_digests_entry_that_was_edited_is_refused(run):
    edit_json(run / "run.json", lambda info: info["artifacts"].pop(HEAD))
    refused(run, f"records no digest for {HEAD}")
    edit_json(run / "run.json", lambda info: info.update(artifacts={"../elsewhere": {"sha256": "0", "bytes": 1}}))
    refused(run, "'artifacts' entry is malformed")


def test_fine_tuned_weights_in_the_run_are_verified(runs, tmp_path):
    source = Run.load(runs["two"])
    info = {k: v for k, v in source.info.items() if k not in ("format", "artifacts")}
    info["backbone"] = {**info["backbone"], "weights": "run:backbone.safetensors"}
    out = write_run(tmp_path / "tuned", info, source.head, {}, [], extra={"backbone.safetensors": b"weights" * 100})
    assert "backbone.safetensors" in json.loads((out / "run.json").read_text())["artifacts"]
    Run.load(out)
    (out / "backbone.safetensors").write_bytes(b"weights" * 50)
    refused(out, "backbone.safetensors does not match the digest", "350 bytes, not 700")
    edit_json(out / "run.json", lambda i: i["artifacts"].pop("backbone.safetensors"))
    refused(out, "records no digest for backbone.safetensors")


def test_a_run_whose_head_disagrees_with_its_classes_is_not_written(runs, tmp_path):
    source = Run.load(runs["two"])
    info = {**source.info, "class_names": ["red", "blue"]}
    with pytest.raises(RunError, match="same order"):
        write_run(tmp_path / "bad", info, source.head, {}, [])
    assert not (tmp_path / "bad").exists()


def test_ensemble_checks_its_members(runs, tmp_path, capsys):
    ensemble = tmp_path / "ens"
    combine_runs([runs["two"], runs["two"]], ensemble)
    assert isinstance(load_run(ensemble), EnsembleRun) and capsys.readouterr().err == ""
    damaged = Path(shutil.copytree(ensemble, tmp_path / "damaged"))
    (damaged / "members" / "1" / HEAD).write_bytes(bytes((damaged / "members" / "1" / HEAD).stat().st_size))
    refused(damaged / "members" / "1", HEAD)
    with pytest.raises(RunError, match=r"members/1'?: head\.safetensors"):
        load_run(damaged)
    mixed = Path(shutil.copytree(ensemble, tmp_path / "mixed"))
    shutil.rmtree(mixed / "members" / "0")
    shutil.copytree(runs["three"], mixed / "members" / "0")  # a member of another run
    refused(mixed, "members/0/run.json", "does not match the digest")
    edited = Path(shutil.copytree(ensemble, tmp_path / "edited"))
    edit_json(edited / "run.json", lambda info: info["class_names"].append("ghost"))
    refused(edited, "members/0 predicts the classes", "'ghost'")


def test_legacy_ensemble_warns_once(runs, tmp_path, capsys):
    ensemble = tmp_path / "ens"
    combine_runs([runs["two"], runs["two"]], ensemble)
    legacy(ensemble)
    for member in ("0", "1"):
        legacy(ensemble / "members" / member)
    load_run(ensemble)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"run folder '{ensemble}'" in err


def test_cli_predict_on_a_damaged_run_exits_1_with_one_line(run, tmp_path, run_cli):
    (run / HEAD).write_bytes(bytes((run / HEAD).stat().st_size))
    image = make_tree(tmp_path / "img", per_class=1) / "red" / "red_0.png"
    code, out, err = run_cli("predict", run, image, "--cache-dir", tmp_path / "c", "-q")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("headstart predict: error: run folder")
    assert HEAD in err and err.rstrip().endswith("train it again")


# ------------------------------------------------------------------------------------------------
# The feature cache: damaged shards, lost indexes, read-only folders, full disks, claims

DIM = 8


def _rows(n, seed):
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float16).astype(np.float32)


@pytest.fixture
def filled(cache):
    """Two shards: rows of img0..img3 and of img4..img5."""
    truth = {}
    for names, seed in ((["img0", "img1", "img2", "img3"], 0), (["img4", "img5"], 1)):
        rows = _rows(len(names), seed)
        cache.write("a", names, rows)
        truth.update(zip(names, rows))
    return cache, truth


IMAGES = [f"img{i}" for i in range(6)]


def _shard_of(cache, image):
    located = cache.locate(["a"], [image])
    return cache.root / "shards" / located.shards[located.index[0, 0]]


def _fresh(cache):
    """The same folder as a new process sees it: no memo, so every shard's checksum is checked again."""
    return FeatureCache(cache.root, memos={})


def _zero(path):
    path.write_bytes(bytes(path.stat().st_size))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # one bit of the last row: the header still parses, the shape is right
    path.write_bytes(bytes(data))


def _delete_sidecar(path):
    path.with_suffix(".json").unlink()


def _garble_sidecar(path):
    path.with_suffix(".json").write_text("{not json")


@pytest.mark.parametrize("damage, reason", [
    (_zero, "sha256"), (_truncate, "bytes"), (_flip, "sha256"), (lambda p: p.unlink(), "missing"),
    (_delete_sidecar, "checksum file is missing"), (_garble_sidecar, "checksum file is unreadable"),
])
def test_a_damaged_shard_is_named_dropped_and_never_served(filled, damage, reason):
    cache, truth = filled
    bad = _shard_of(cache, "img0")
    damage(bad)
    with _fresh(cache) as other:
        with pytest.warns(CacheWarning, match=f"{bad.name} cannot be used: .*{reason}.*computed again"):
            located = other.locate_verified(["a"], IMAGES, DIM)
        assert located.found.tolist() == [[False] * 4 + [True] * 2]  # the other shard is untouched
        np.testing.assert_array_equal(other.read_locations(located, DIM)[4:, 0], [truth["img4"], truth["img5"]])
        assert not bad.exists() and not bad.with_suffix(".json").exists()  # damaged files are deleted
        other.write("a", IMAGES[:4], _rows(4, 0))  # recomputed: served again
        again = other.locate_verified(["a"], IMAGES, DIM)
        np.testing.assert_array_equal(other.read_locations(again, DIM)[:, 0], [truth[i] for i in IMAGES])


def test_a_shard_damaged_after_it_was_checked_is_checked_again(filled):
    cache, _ = filled
    cache.read_locations(cache.locate_verified(["a"], IMAGES, DIM), DIM)  # checked and mapped
    bad = _shard_of(cache, "img4")
    cache.close()  # the maps go; the memo of checked shards stays, keyed by the file's stamp
    os.utime(bad)  # ... which changes with any rewrite
    _zero(bad)
    with FeatureCache(cache.root) as again, pytest.warns(CacheWarning, match="sha256"):
        assert again.locate_verified(["a"], IMAGES, DIM).found.tolist() == [[True] * 4 + [False] * 2]


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_an_unreadable_index_is_moved_aside_and_rebuilt_from_the_shards(filled, how):
    cache, truth = filled
    cache.close()
    index = cache.root / "index.sqlite"
    for suffix in ("-wal", "-shm"):
        (cache.root / f"index.sqlite{suffix}").unlink(missing_ok=True)
    if how == "garbage":
        index.write_bytes(b"this is not a database" * 100)
    elif how == "truncated":
        index.write_bytes(index.read_bytes()[:6000])
    else:
        index.write_bytes(b"")
    expect = "was empty although shards" if how == "empty" else "unreadable .* moved aside .* 6 rows of 2 shards"
    with pytest.warns(CacheWarning, match=expect), FeatureCache(cache.root, memos={}) as again:
        located = again.locate_verified(["a"], IMAGES, DIM)
        np.testing.assert_array_equal(again.read_locations(located, DIM)[:, 0], [truth[i] for i in IMAGES])
        assert again.stats()["models"] == 0 or again.stats()["rows"] == 6
    if how != "empty":
        assert len([p for p in cache.root.glob("index.sqlite.corrupt-*") if p.name[-1].isdigit()]) == 1
    with FeatureCache(cache.root, memos={}) as third:  # recovered once: no more warnings
        assert third.locate(["a"], IMAGES).found.all()


def test_a_rebuilt_index_knows_the_models(tmp_path):
    with FeatureCache(tmp_path / "c") as cache:
        cache.register_models([("a", {"backbone": "x"}, DIM)])
        cache.write("a", ["img0"], _rows(1, 0))
    (tmp_path / "c" / "index.sqlite").write_bytes(b"garbage" * 1000)
    with pytest.warns(CacheWarning, match="rebuilt"), FeatureCache(tmp_path / "c", memos={}) as again:
        assert again.index.descriptions(["a"]) == {"a": {"backbone": "x"}}


def test_a_read_only_folder_serves_reads_and_keeps_new_rows_in_a_temporary_overlay(filled, monkeypatch):
    cache, truth = filled
    cache.close()
    before = {p: p.stat().st_mtime_ns for p in cache.root.rglob("*")}
    monkeypatch.setattr(feature_cache_module, "writable", lambda folder: False)  # root may write anywhere
    with pytest.warns(CacheWarning, match="read-only"), FeatureCache(cache.root, memos={}) as ro:
        assert ro.read_only
        located = ro.locate_verified(["a"], [*IMAGES, "new"], DIM)
        assert located.found.tolist() == [[True] * 6 + [False]]
        ro.image_keys([str(cache.root / "index.sqlite")])  # the file-hash memo is written elsewhere too
        ro.write("a", ["new"], _rows(1, 7))
        located = ro.locate_verified(["a"], [*IMAGES, "new"], DIM)
        got = ro.read_locations(located, DIM)[:, 0]
        np.testing.assert_array_equal(got, [truth[i] for i in IMAGES] + [_rows(1, 7)[0]])
        overlay = ro._overlay
        assert overlay.exists()
    assert not overlay.exists()  # the overlay goes with the cache
    assert {p: p.stat().st_mtime_ns for p in cache.root.rglob("*")} == before  # nothing in the folder changed


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_really_read_only_folder(filled):
    cache, truth = filled
    cache.close()
    for path in [cache.root, *cache.root.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        with pytest.warns(CacheWarning, match="read-only"), FeatureCache(cache.root, memos={}) as ro:
            located = ro.locate_verified(["a"], IMAGES, DIM)
            np.testing.assert_array_equal(ro.read_locations(located, DIM)[:, 0], [truth[i] for i in IMAGES])
    finally:
        for path in [cache.root, *cache.root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_a_full_disk_names_the_folder_and_leaves_nothing_half_written(filled, monkeypatch):
    cache, _ = filled
    real_save = np.save

    def short_write(handle, array):
        real_save(handle, array[:1])
        raise OSError(f"{array.nbytes} requested and 128 written")  # numpy's own words, no errno

    monkeypatch.setattr(np, "save", short_write)
    files = sorted(cache.root.rglob("*"))
    with pytest.raises(DiskFullError, match=r"no space left on .*shards.*free space or use --cache-dir") as info:
        cache.write("a", ["img9"], _rows(1, 9))
    assert info.value.errno == errno.ENOSPC
    assert sorted(cache.root.rglob("*")) == files  # no temporary file, no sidecar, no index row
    assert not cache.locate(["a"], ["img9"]).found.any()


def test_a_full_disk_under_the_index(cache, monkeypatch):
    def full(*args):
        raise sqlite3.OperationalError("database or disk is full")

    class FullConnection:
        def __init__(self, db):
            self.db = db

        def execute(self, sql, *args):
            return self.db.execute(sql, *args)

        executemany = staticmethod(full)

        def close(self):
            self.db.close()

        @property
        def total_changes(self):
            return self.db.total_changes

    monkeypatch.setattr(cache.index, "db", FullConnection(cache.index.db))
    with pytest.raises(DiskFullError, match="no space left on"):
        cache.write("a", ["img9"], _rows(1, 9))


def test_rows_another_process_wrote_first_keep_their_place_and_no_orphan_is_left(filled):
    cache, truth = filled
    shards_before = sorted((cache.root / "shards").rglob("*.npy"))
    cache.write("a", IMAGES[:4], _rows(4, 5))  # the same images again (another process was first)
    assert sorted((cache.root / "shards").rglob("*.npy")) == shards_before  # the redundant shard is deleted
    located = cache.locate_verified(["a"], IMAGES, DIM)
    np.testing.assert_array_equal(cache.read_locations(located, DIM)[:4, 0], [truth[i] for i in IMAGES[:4]])


def test_claims_split_work_between_live_owners_and_die_with_their_process(cache):
    me, other = new_owner(), new_owner()
    assert cache.claim("job", ["x", "y"], me, ttl=60) == ["x", "y"]
    assert cache.claim("job", ["x", "y", "z"], other, ttl=60) == ["z"]  # x and y are mine
    assert cache.claim("other job", ["x"], other, ttl=60) == ["x"]  # claims are per job
    assert cache.claim("job", ["x"], other, ttl=0) == ["x"]  # an expired claim is free
    dead = f"{me.split(':')[0]}:999999999:dead"  # this host, no such process
    cache.claim("job", ["w"], dead, ttl=60)
    assert cache.claim("job", ["w"], me, ttl=60) == ["w"]  # a killed process's claims need not expire
    cache.release(other)
    assert cache.claim("job", ["x", "z"], me, ttl=60) == ["x", "z"]


def test_writing_releases_the_claims_of_what_was_written(cache):
    me, other = new_owner(), new_owner()
    cache.claim("job", ["x", "y"], me, ttl=60)
    cache.write("a", ["x"], _rows(1, 0), release=me)
    assert cache.claim("job", ["x", "y"], other, ttl=60) == ["x"]


def test_pending_rows_are_flushed_by_time_too(cache, monkeypatch):
    pending = PendingRows(cache, "decoder", DIM * 2)
    pending.rows.append(("a", "img0", _rows(1, 0)))
    pending.images = 1
    assert not pending.due(flush_every=256)
    pending.since -= 10.0  # ten seconds later
    assert pending.due(flush_every=256)
    pending.flush()
    assert cache.locate(["a"], ["img0"]).found.all()
    monkeypatch.setenv("HEADSTART_FLUSH_SECONDS", "0.5")
    assert PendingRows(cache, "decoder", DIM * 2).every == 0.5
    monkeypatch.setenv("HEADSTART_FLUSH_SECONDS", "-1")
    with pytest.raises(UsageError, match=r"HEADSTART_FLUSH_SECONDS is '-1'; expected a positive number"):
        PendingRows(cache, "decoder", DIM * 2)


def test_a_zeroed_shard_is_recomputed_not_served(tree, backbone, cache):
    """The reported silent wrong answer: a shard overwritten with zeros of the same size used to train a
    model to chance. Now the next run names it, recomputes its rows and gets the same features."""
    from headstart.features import extract_features

    paths = sorted(tree.rglob("*.png"))
    first = extract_features(backbone, paths, cache=cache, num_workers=0, progress=False, batch_size=4)
    for shard in (cache.root / "shards").rglob("*.npy"):
        _zero(shard)
    with _fresh(cache) as other, pytest.warns(CacheWarning, match="sha256 does not match"):
        again = extract_features(backbone, paths, cache=other, num_workers=0, progress=False, batch_size=4)
    assert again.n_computed == len(paths) and again.ok.all()
    np.testing.assert_array_equal(first.features, again.features)


def test_info_verify_prune_and_clear(filled):
    from headstart.cache import maintenance

    cache, _ = filled
    orphan = cache.root / "shards" / "a" / "0123.npy"
    orphan.write_bytes(b"x" * 10)
    (cache.root / "shards" / "a" / ".0123.npy.abc.tmp").write_bytes(b"half")
    young = maintenance.info(cache)
    assert young["rows"] == 6 and young["shards"] == 2 and young["orphan_shards"] == []  # may be about to commit
    found = maintenance.info(cache, min_age=0)
    assert found["orphan_shards"] == ["a/0123.npy"] and len(found["leftover_files"]) == 1
    assert maintenance.verify(cache) == {"root": str(cache.root), "index": "ok", "shards_checked": 2, "damaged": []}
    _zero(_shard_of(cache, "img4"))
    checked = maintenance.verify(cache)
    assert [d["reason"] for d in checked["damaged"]] == ["its sha256 does not match its checksum file"]
    assert cache.locate(["a"], IMAGES).found.tolist() == [[True] * 4 + [False] * 2]
    pruned = maintenance.prune(cache, min_age=0)
    assert pruned["removed_shards"] == 1 and not orphan.exists() and cache.locate(["a"], IMAGES[:4]).found.all()
    cache.close()
    assert maintenance.clear(cache.root)["bytes_freed"] > 0
    assert not list((cache.root).rglob("*.npy")) and not (cache.root / "index.sqlite").exists()


def test_the_cache_command(filled, run_cli):
    cache, _ = filled
    cache.close()
    root = str(cache.root)
    code, out, err = run_cli("cache", "info", "--cache-dir", root, "--json")
    assert code == 0, err
    assert json.loads(out)["rows"] == 6
    code, out, _ = run_cli("cache", "verify", "--cache-dir", root)
    assert code == 0 and "2 shards checked, 0 damaged" in out
    with FeatureCache(root, memos={}) as again:
        _flip(_shard_of(again, "img0"))
    code, out, _ = run_cli("cache", "verify", "--cache-dir", root)
    assert code == 1 and "1 damaged" in out and "sha256 does not match" in out
    code, _, err = run_cli("cache", "clear", "--cache-dir", root)
    assert code == 2 and "add --yes" in err
    assert run_cli("cache", "clear", "--cache-dir", root, "--yes")[0] == 0
    assert not list(cache.root.rglob("*.npy"))
