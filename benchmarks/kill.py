"""Kill -9 trials: `headstart features` killed at a random moment, then run again, must give the same cache.

Each trial starts `headstart features` on a folder of synthetic photos with an empty cache, kills the
whole process group with SIGKILL at a seeded random moment of a reference run's duration, runs the
same command again to completion and compares every feature row with an uninterrupted reference
run, byte for byte. It also checks the index with SQLite's integrity check and every shard's
checksum (`headstart.cache.maintenance.verify`). Rows are flushed every 0.5 s here
($HEADSTART_FLUSH_SECONDS), so kills land between, during and after flushes.

    python benchmarks/kill.py                 # 26 trials, 120 images
    python benchmarks/kill.py --trials 2 --images 24 --json   # the CI variant (tests/test_resume.py)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

FLUSH_SECONDS = "0.5"


def make_photos(root: Path, n: int, seed: int) -> Path:
    """``n`` 96x96 noisy two-class photos (different bytes, so n distinct features)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / ("warm" if i % 2 else "cold")
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([200, 80, 40] if i % 2 else [40, 90, 200], dtype=np.int16)
        pixels = np.clip(base + rng.normal(0, 40, size=(96, 96, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def _command(data: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "headstart", "features", str(data), "--cache-dir", str(cache), "--engine", "torch",
            "--batch-size", "8", "--workers", "1", "--json", "--quiet"]


def _env() -> dict[str, str]:
    return {**os.environ, "HEADSTART_FLUSH_SECONDS": FLUSH_SECONDS}


def run_to_end(data: Path, cache: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    done = subprocess.run(_command(data, cache), env=_env(), capture_output=True, text=True, check=True)
    return json.loads(done.stdout), time.perf_counter() - start


def killed_at(data: Path, cache: Path, seconds: float) -> bool:
    """Start the command and SIGKILL its process group after ``seconds``; whether it was still running."""
    child = subprocess.Popen(_command(data, cache), env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        child.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        return True


def all_rows(cache_dir: Path) -> dict[tuple[str, str], bytes]:
    """Every (model key, image key) row of the cache, as bytes."""
    from headstart.cache import FeatureCache

    with FeatureCache(cache_dir, memos={}) as cache:
        pairs = cache.index.db.execute("SELECT model_key, image FROM features").fetchall()
        out = {}
        for key in {k for k, _ in pairs}:
            images = [i for k, i in pairs if k == key]
            dim = cache.index.db.execute("SELECT dim FROM models WHERE model_key = ?", (key,)).fetchone()[0]
            rows = cache.read_locations(cache.locate_verified([key], images, dim), dim)[:, 0]
            out.update({(key, image): row.tobytes() for image, row in zip(images, rows)})
    return out


def sound(cache_dir: Path) -> bool:
    from headstart.cache import FeatureCache
    from headstart.cache.maintenance import verify

    with FeatureCache(cache_dir, memos={}) as cache:
        report = verify(cache)
    return report["index"] == "ok" and not report["damaged"]


def trials(n_trials: int, n_images: int, seed: int) -> dict:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="headstart-kill-") as tmp:
        tmp_path = Path(tmp)
        data = make_photos(tmp_path / "data", n_images, seed)
        reference, seconds = run_to_end(data, tmp_path / "reference")
        truth = all_rows(tmp_path / "reference")
        rows = []
        for trial in range(n_trials):
            cache = tmp_path / f"trial{trial}"
            at = rng.uniform(0.2, 1.0) * seconds
            was_running = killed_at(data, cache, at)
            resumed, _ = run_to_end(data, cache)
            rows.append({"trial": trial, "kill_at_s": round(at, 2), "killed_while_running": was_running,
                         "rows_kept": resumed["n_cached"], "identical": all_rows(cache) == truth,
                         "sound": sound(cache)})
            print(f"trial {trial:2d}: kill at {at:5.2f}s  running={was_running!s:5}  kept {resumed['n_cached']:4d} "
                  f"rows  identical={rows[-1]['identical']}  sound={rows[-1]['sound']}", file=sys.stderr)
    return {"images": n_images, "reference_seconds": round(seconds, 2), "reference_rows": reference["n_computed"],
            "trials": rows, "n_trials": n_trials, "n_identical": sum(r["identical"] and r["sound"] for r in rows),
            "n_killed_while_running": sum(r["killed_while_running"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=26)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = trials(args.trials, args.images, args.seed)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['images']} images, reference run {result['reference_seconds']} s")
    print(f"  kill trials: {result['n_trials']}   killed while running: {result['n_killed_while_running']}   "
          f"identical and sound after resuming: {result['n_identical']}")


if __name__ == "__main__":
    main()
