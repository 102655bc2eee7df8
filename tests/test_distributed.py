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
    """Batches of 16: one process forwards 16+16+8 images, each rank 16+4 (short batches padded to 16)."""
    return ["features", str(data), "--cache-dir", str(cache), "--engine", "torch", "--precision", "fp32",
            "--batch-size", "16", "--workers", "0", "--json", "--quiet", *more]


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
def test_sharded_extraction_survives_a_killed_rank_and_equals_one_process(tmp_path, photos):
    """Rank 1 is SIGKILLed once some of its rows are flushed; torchrun restarts the ranks; the restarted
    rank 1 finds its flushed rows and computes only the rest; the cache equals one process's byte for byte."""
    data, reference = photos
    keys = _file_keys(data)
    rank1 = {k for k, r in zip(keys, deal_by_hash(keys, 2)) if r == 1}
    cache = tmp_path / "shared"
    command = torchrun(*_features(data, cache))
    command.insert(command.index("--standalone") + 1, "--max-restarts=1")  # torchrun's elastic restart
    launcher = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_with, deadline = None, time.monotonic() + 120
    while killed_with is None and time.monotonic() < deadline and launcher.poll() is None:
        done = _stored(cache, rank1)
        pid = _rank_pid(launcher.pid, 1) if done else None
        if pid is not None and 0 < done < len(rank1):
            os.kill(pid, signal.SIGKILL)
            killed_with = done
        time.sleep(0.02)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    assert killed_with is not None, "rank 1 finished before it could be killed; use more images"
    result = json.loads(out)
    assert result["n_images"] == 40 and result["n_bad"] == 0
    assert sorted(r["n_images"] for r in result["ranks"]) == [20, 20]  # balanced and disjoint (sums to 40)
    second = {r["rank"]: r for r in result["ranks"]}[1]  # rank 1 after its restart
    assert second["n_cached"] >= killed_with > 0  # the rows it had flushed were kept ...
    assert second["n_computed"] == len(rank1) - second["n_cached"]  # ... and only the missing ones computed
    assert _rows(cache) == reference


def test_the_python_api_joins_torchrun_too(tmp_path, photos):
    """``headstart.extract`` in a script started by torchrun shares the work like the CLI does, and can be
    called again (a second process group in the same processes)."""
    data, reference = photos
    script = tmp_path / "extract.py"
    script.write_text("import json, os, sys, headstart\n"  # one file per rank: their stdout lines interleave
                      "outs = [headstart.extract(sys.argv[1], cache_dir=sys.argv[2], engine='torch', precision='fp32',"
                      " batch_size=16, num_workers=0, progress=False) for _ in range(2)]\n"  # 2 sessions, 1 process
                      "open(sys.argv[2] + '.rank' + os.environ['RANK'], 'w').write(json.dumps(outs))\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               str(data), str(tmp_path / "shared")]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):  # each rank returns the sums
        first, second = json.loads((tmp_path / f"shared.rank{rank}").read_text())
        assert first["n_computed"] == 40 and sorted(r["n_images"] for r in first["ranks"]) == [20, 20]
        assert second["n_computed"] == 0 and second["n_cached"] == 40  # a second process group, same process
    assert _rows(tmp_path / "shared") == reference


TRAIN = ("--freeze", "7", "--optimizer", "sgd", "--precision", "fp32", "--workers", "0", "--quiet", "--json")


def _train(data: Path, out: Path, cache: Path, *more: str) -> list[str]:
    return ["train", str(data), "--out", str(out), "--cache-dir", str(cache), *TRAIN, *more]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return {**load_file(str(run / "backbone.safetensors")), **load_file(str(run / "head.safetensors"))}


def _assert_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    """Parameters within ``atol``; batch-norm running statistics within 1e-5 + 1e-4 relative (one process
    sums a batch's float32 activations in float32, the ranks' global statistics are summed in float64:
    the single process's mean of ~2,000 values of magnitude ~10 is itself off by ~1e-5)."""
    import torch

    assert a.keys() == b.keys()
    bad = {}
    for k in a:
        stats = k.endswith(("running_mean", "running_var"))
        if not torch.allclose(a[k].double(), b[k].double(), rtol=1e-4 if stats else 1e-5, atol=1e-5 if stats else atol):
            bad[k] = float((a[k].double() - b[k].double()).abs().max())
    assert not bad, bad


def test_ddp_step_equals_one_process_on_the_same_global_batch(tmp_path, photos):
    """One SGD step on a global batch of 40 (20 per rank) with stages 8 and the tail trained (batch norm in
    training mode, statistics over the global batch): the weights match one process's."""
    data, _ = photos
    one = _run(single(*_train(data, tmp_path / "one", tmp_path / "c1", "--epochs", "1", "--batch-size", "40")))
    two = _run(torchrun(*_train(data, tmp_path / "two", tmp_path / "c2", "--epochs", "1", "--batch-size", "40")))
    assert one["history"][0]["train_loss"] == pytest.approx(two["history"][0]["train_loss"], abs=1e-6)
    _assert_close(_weights(tmp_path / "one"), _weights(tmp_path / "two"))


def test_ddp_resumes_after_a_kill_and_continues_the_same_run(tmp_path, photos):
    """torchrun fine-tuning killed (the whole group, SIGKILL) after its first epoch's checkpoint, then run
    again with --resume: it continues from epoch 2 and ends with one uninterrupted process's weights."""
    data, _ = photos
    more = ("--epochs", "2", "--batch-size", "6", "--val-split", "0.25")
    run, cache = tmp_path / "two", tmp_path / "c2"
    metrics = tmp_path / ".two.finetune" / "metrics.jsonl"
    launcher = subprocess.Popen(torchrun(*_train(data, run, cache, *more)), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 150
    while launcher.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            os.killpg(launcher.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    launcher.wait(timeout=60)
    assert launcher.returncode == -signal.SIGKILL, "the run ended before it could be killed; give it more epochs"
    assert not run.exists()
    resumed = _run(torchrun(*_train(data, run, cache, *more, "--resume")))
    alone = _run(single(*_train(data, tmp_path / "one", tmp_path / "c1", *more)))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    for a, b in zip(resumed["history"], alone["history"]):  # losses and validation reduced over the ranks
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_accuracy"] == b["val_accuracy"] and a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    _assert_close(_weights(run), _weights(tmp_path / "one"))


def _batch_norm_inputs():  # -> x, weight, bias and the upstream gradient: the same in every process
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, 3, 3, generator=g) * 3 + 1
    weight, bias = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    return x, weight, bias, torch.randn(12, 4, 3, 3, generator=g)


def _batch_norm_rank(rank: int, store: str, outs: list[str]) -> None:
    """One of 2 gloo ranks: its half of the batch through the global batch norm, forward and backward."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from headstart import distributed

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    try:
        x, weight, bias, upstream = _batch_norm_inputs()
        mine = x[rank * 6:(rank + 1) * 6].clone().requires_grad_(True)
        mean, var = torch.zeros(4), torch.ones(4)
        with distributed.global_batch_norm():
            y = F.batch_norm(mine, mean, var, weight, bias, training=True, momentum=0.1, eps=1e-5)
        (y * upstream[rank * 6:(rank + 1) * 6]).sum().backward()
        torch.save({"y": y.detach(), "grad": mine.grad, "mean": mean, "var": var}, outs[rank])
    finally:
        dist.destroy_process_group()


def test_global_batch_norm_and_its_gradient_equal_one_process_on_the_whole_batch(tmp_path):
    """Output, input gradient (which flows through the statistics of every rank's rows) and running
    statistics of 2 ranks with 6 rows each equal ``F.batch_norm`` on the 12 rows in one process."""
    import torch
    import torch.multiprocessing as mp
    import torch.nn.functional as F

    outs = [str(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    mp.start_processes(_batch_norm_rank, args=(str(tmp_path / "store"), outs), nprocs=2, start_method="spawn")
    x, weight, bias, upstream = _batch_norm_inputs()
    x.requires_grad_(True)
    mean, var = torch.zeros(4), torch.ones(4)
    y = F.batch_norm(x, mean, var, weight, bias, training=True, momentum=0.1, eps=1e-5)
    (y * upstream).sum().backward()
    got = [torch.load(o, weights_only=True) for o in outs]
    torch.testing.assert_close(torch.cat([g["y"] for g in got]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([g["grad"] for g in got]), x.grad, rtol=1e-4, atol=1e-5)
    for g in got:
        torch.testing.assert_close(g["mean"], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g["var"], var, rtol=1e-5, atol=1e-6)
