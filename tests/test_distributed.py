"""torchrun on loopback, 2 CPU processes (gloo): sharded extraction equals one process byte for byte, a
killed rank resumes with only its missing rows, DDP fine-tuning equals one process on the same global
batch, and a fine-tuning run killed mid-way resumes the same run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tree

from headstart.cache import FeatureCache
from headstart.distributed import deal_by_hash

DIM = 1280


def torchrun(*args: str) -> list[str]:
    """``python -m torch.distributed.run`` with 2 processes on loopback, running ``headstart args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "headstart", *args]


def single(*args: str) -> list[str]:
    return [sys.executable, "-m", "headstart", *args]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HEADSTART_FLUSH_SECONDS": "0.2", "OMP_NUM_THREADS": "1", **extra}


def _features(data: Path, cache: Path, *more: str) -> list[str]:
    return ["features", str(data), "--cache-dir", str(cache), "--engine", "torch", "--precision", "fp32",
            "--batch-size", "4", "--workers", "0", "--json", "--quiet", *more]


def _run(command: list[str], **env: str) -> dict:
    done = subprocess.run(command, env=_env(**env), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout) if done.stdout.strip() else {}


def _rows(cache_dir: Path) -> dict[str, bytes]:
    with FeatureCache(cache_dir, memos={}) as cache:
        pairs = cache.index.db.execute("SELECT model_key, image FROM features ORDER BY image").fetchall()
        keys = {k for k, _ in pairs}
        assert len(keys) == 1, keys
        images = [i for _, i in pairs]
        rows = cache.read_locations(cache.locate_verified(list(keys), images, DIM), DIM)[:, 0]
        return {image: row.tobytes() for image, row in zip(images, rows)}


def test_deal_by_hash_is_balanced_and_order_free():
    keys = [f"{i:064x}" for i in range(11)] + [None]
    ranks = deal_by_hash(keys, 2)
    assert sorted(np.bincount(ranks[:-1]).tolist()) == [5, 6] and ranks[-1] == 0
    shuffled = keys[::-1]
    assert dict(zip(shuffled, deal_by_hash(shuffled, 2))) == dict(zip(keys, ranks))
    assert deal_by_hash(["a", "b", "a"], 2) == [0, 1, 0]  # one content, one rank


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """40 images and their rows computed by one process (the reference)."""
    root = tmp_path_factory.mktemp("photos")
    data = make_tree(root / "data", per_class=20)
    assert _run(single(*_features(data, root / "one")))["n_computed"] == 40
    return data, _rows(root / "one")


def test_sharded_extraction_equals_one_process(tmp_path, photos):
    data, reference = photos
    two = _run(torchrun(*_features(data, tmp_path / "two")))
    assert two["n_computed"] == 40 and two["n_bad"] == 0
    assert sorted(r["n_images"] for r in two["ranks"]) == [20, 20]  # balanced, disjoint (sums to 40)
    assert _rows(tmp_path / "two") == reference  # byte for byte


def _file_keys(data: Path) -> list[str]:
    with FeatureCache(data.parent / "hashes", memos={}) as cache:
        return cache.image_keys(sorted(data.rglob("*.png")))[0]


def _rank_pid(launcher: int, wanted: int) -> int | None:
    """The pid of the torchrun worker with ``RANK=wanted`` among ``launcher``'s children (Linux /proc)."""
    for task in Path(f"/proc/{launcher}/task").glob("*/children"):
        for pid in task.read_text().split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={wanted}".encode() in environ:
                return int(pid)
    return None


def _stored(cache_dir: Path, keys: set[str]) -> int:
    """How many of ``keys`` have a row in the cache, read from its index without opening the cache (which
    would check and repair it under the writers' feet)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{cache_dir / 'index.sqlite'}?mode=ro", uri=True)) as db:
            images = {i for (i,) in db.execute("SELECT image FROM features").fetchall()}
    except sqlite3.Error:  # not created yet
        return 0
    return len(images & keys)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the rank's process in /proc (Linux)")
def test_killed_rank_restarts_and_computes_only_its_missing_rows(tmp_path, photos):
    data, reference = photos
    keys = _file_keys(data)
    rank1 = {k for k, r in zip(keys, deal_by_hash(keys, 2)) if r == 1}
    cache = tmp_path / "shared"
    command = torchrun(*_features(data, cache, "--batch-size", "2"))
    command.insert(command.index("--standalone") + 1, "--max-restarts=1")  # torchrun's elastic restart
    launcher = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_with, deadline = None, time.monotonic() + 120
    while killed_with is None and time.monotonic() < deadline and launcher.poll() is None:
        done = _stored(cache, rank1)
        pid = _rank_pid(launcher.pid, 1) if done else None
        if pid is not None and 0 < done < len(rank1):
            os.kill(pid, signal.SIGKILL)
            killed_with = done
        time.sleep(0.05)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    assert killed_with is not None, "rank 1 finished before it could be killed; use more images"
    result = json.loads(out)
    second = {r["rank"]: r for r in result["ranks"]}[1]  # rank 1 after its restart
    assert second["n_cached"] >= killed_with > 0  # the rows it had flushed were kept ...
    assert second["n_computed"] == len(rank1) - second["n_cached"]  # ... and only the missing ones computed
    assert _rows(cache) == reference
