"""1 process against N torchrun processes on this machine: `headstart features` and one fine-tuning run.

Each setting starts from an empty cache on the same synthetic photos. Extraction reports the wall time
of the command (process start, import, hashing, extraction) and the extraction's own seconds (the
slowest rank's); fine-tuning (`--freeze 7`, the cut cache computed in parallel, then DDP) reports the
command's wall time and the seconds per epoch. One process uses every core ($OMP_NUM_THREADS unset);
torchrun gives each of its N processes one thread (its default), so on a machine with N cores both use
all of them, and the speed-up measures what sharding adds over intra-op threading.

    python benchmarks/distributed.py                       # 200 photos, 2 processes
    python benchmarks/distributed.py --images 64 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_photos(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` 160x160 noisy two-class JPEGs (distinct bytes: n distinct features)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / ("warm" if i % 2 else "cold")
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([200, 80, 40] if i % 2 else [40, 90, 200], dtype=np.int16)
        pixels = np.clip(base + rng.normal(0, 40, size=(160, 160, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def _launch(processes: int, args: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "headstart", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "-m", "headstart", *args]


def timed(processes: int, args: list[str]) -> tuple[dict, float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    start = time.perf_counter()
    done = subprocess.run(_launch(processes, args), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} with {processes} process(es) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout), wall


def measure(n_images: int, processes: int, epochs: int) -> dict:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="headstart-dist-") as tmp:
        root = Path(tmp)
        data = make_photos(root / "data", n_images)
        rows = {}
        for n in (1, processes):
            cache = root / f"cache{n}"
            feats, wall = timed(n, ["features", str(data), "--cache-dir", str(cache), "--json", "--quiet"])
            run, train_wall = timed(n, ["train", str(data), "--out", str(root / f"run{n}"), "--cache-dir",
                                        str(root / f"ft{n}"), "--freeze", "7", "--epochs", str(epochs),
                                        "--batch-size", "32", "--json", "--quiet"])
            rows[n] = {"features_wall_s": round(wall, 2), "features_s": feats["seconds"],
                       "images_per_second": round(n_images / feats["seconds"], 1),
                       "engine": feats["engine"], "precision": feats["precision"],
                       "train_wall_s": round(train_wall, 2), "cut_cache_s": run["cut_cache_seconds"],
                       "seconds_per_epoch": run["seconds_per_epoch"]}
    one, many = rows[1], rows[processes]
    speedup = {k: round(one[k] / many[k], 2) if many[k] else None
               for k in ("features_wall_s", "features_s", "train_wall_s", "cut_cache_s", "seconds_per_epoch")}
    return {"images": n_images, "processes": processes, "cores": os.cpu_count(), "epochs": epochs,
            "one": one, "many": many, "speedup": speedup,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}  # other work on the machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.images, args.processes, args.epochs)
    if args.json:
        print(json.dumps(result))
        return
    one, many, up = result["one"], result["many"], result["speedup"]
    print(f"{result['images']} photos, {result['cores']} cores, engine {one['engine']}, {one['precision']}; "
          f"1-minute load average {result['load_average'][0]} before, {result['load_average'][1]} after")
    print(f"{'':28}{'1 process':>12}{str(result['processes']) + ' processes':>14}{'speed-up':>10}")
    for key, label in (("features_wall_s", "features: command (s)"), ("features_s", "features: extraction (s)"),
                       ("train_wall_s", "train --freeze 7: command"), ("cut_cache_s", "  cut cache (s)"),
                       ("seconds_per_epoch", "  seconds per epoch")):
        print(f"{label:28}{one[key]:>12}{many[key]:>14}{up[key] if up[key] is not None else '-':>10}")


if __name__ == "__main__":
    main()
