"""Four `headstart features` processes on the same images and cache: every image computed about once,
every row identical to a single process's, no orphan shard and no claim left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import make_tree

from headstart.cache import FeatureCache
from headstart.cache.maintenance import info, verify

WRITERS = 4


def _command(data, cache):
    return [sys.executable, "-m", "headstart", "features", str(data), "--cache-dir", str(cache), "--engine", "torch",
            "--batch-size", "8", "--workers", "0", "--json", "--quiet"]


def _rows(cache_dir):
    with FeatureCache(cache_dir, memos={}) as cache:
        pairs = cache.index.db.execute("SELECT model_key, image FROM features ORDER BY image").fetchall()
        keys = {k for k, _ in pairs}
        assert len(keys) == 1
        images = [i for _, i in pairs]
        return dict(zip(images, cache.read_locations(cache.locate_verified(list(keys), images, 1280), 1280)[:, 0]))


def test_four_writers_share_the_work(tmp_path):
    data = make_tree(tmp_path / "data", per_class=12)
    env = {**os.environ, "HEADSTART_FLUSH_SECONDS": "0.5"}
    writers = [subprocess.Popen(_command(data, tmp_path / "shared"), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(WRITERS)]
    results = []
    for writer in writers:
        out, err = writer.communicate(timeout=600)
        assert writer.returncode == 0, err[-2000:]
        results.append(json.loads(out))
    n_images = results[0]["n_images"]
    assert all(r["n_images"] == n_images and r["n_bad"] == 0 for r in results)  # complete, for every writer
    forwards = sum(r["n_computed"] for r in results)
    assert n_images <= forwards <= 1.25 * n_images, results
    alone = subprocess.run(_command(data, tmp_path / "alone"), env=env, capture_output=True, text=True, check=True)
    assert json.loads(alone.stdout)["n_computed"] == n_images
    shared, single = _rows(tmp_path / "shared"), _rows(tmp_path / "alone")
    assert shared.keys() == single.keys() and len(shared) == n_images
    assert all((shared[k] == single[k]).all() for k in shared)  # identical to one process's rows
    with FeatureCache(tmp_path / "shared", memos={}) as cache:
        found = info(cache, min_age=0)
        assert found["orphan_shards"] == [] and found["leftover_files"] == []
        assert verify(cache)["damaged"] == []
        assert cache.index.db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
